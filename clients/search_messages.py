"""Python views of ``VectorSearchService`` messages: result dataclasses, filter conditions,
and the request builders / response parsers shared by the sync and async search clients.

Enums travel as short lower-case names: metrics "cosine", "inner_product", "l2"; index
kinds "flat", "ivf_flat", "ivf_pq", "hnsw"; search modes "dense", "keyword", "hybrid"
("" or None: the server's default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from backbone.v1 import common_pb2
from backbone.v1 import vector_search_service_pb2 as pb
from google.protobuf import json_format, struct_pb2

from clients.common import Timing, parse_timings

#: Documents per IngestRequest message (the server bounds a message's size, not a call's).
DOCS_PER_MESSAGE = 32


def _names(enum: Any, prefix: str) -> dict[str, int]:
    return {
        name[len(prefix):].lower(): value
        for name, value in enum.items()
        if not name.endswith("_UNSPECIFIED")
    }


#: Short name -> wire value, from the generated enums (so a new value needs no edit here).
METRICS: dict[str, int] = _names(pb.Metric, "METRIC_")
INDEX_KINDS: dict[str, int] = _names(pb.IndexKind, "INDEX_KIND_")
SEARCH_MODES: dict[str, int] = _names(pb.SearchMode, "SEARCH_MODE_")


def enum_value(table: dict[str, int], name: str | None, what: str) -> int:
    """The wire value of a short enum name; "" or None is UNSPECIFIED (server default)."""
    if not name:
        return 0
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(table)}, not {name!r}") from None


def enum_name(table: dict[str, int], value: int) -> str:
    """The short name of a wire value ("" for UNSPECIFIED or a value this client lacks)."""
    return next((name for name, v in table.items() if v == value), "")


# ------------------------------------------------------------------------- data


@dataclass(frozen=True)
class IndexParams:
    """Index build parameters (0: the server's default)."""

    nlist: int = 0
    pq_m: int = 0
    hnsw_m: int = 0
    ef_construction: int = 0


@dataclass(frozen=True)
class CollectionInfo:
    """A collection's settings and current size."""

    name: str
    dimension: int
    metric: str
    index_kind: str
    points: int
    trained: bool
    disk_bytes: int
    index_params: IndexParams


@dataclass(frozen=True)
class Point:
    """A stored point: id, vector (None when not asked for), payload text and metadata."""

    id: str
    vector: np.ndarray | None = None
    text: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """One search result; ``text``/``metadata`` empty and ``vector`` None unless asked."""

    id: str
    score: float
    text: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class SearchResult:
    """The hits of one query, best first, and the hops' timings."""

    hits: tuple[Hit, ...]
    timings: tuple[Timing, ...]


@dataclass(frozen=True)
class UpsertResult:
    """Points written (inserted or replaced) by an upsert."""

    upserted: int
    timings: tuple[Timing, ...]


@dataclass(frozen=True)
class IngestResult:
    """Documents and chunks stored by an ingest call, with the windows used."""

    documents: int
    chunks: int
    chunk_tokens: int
    overlap_tokens: int
    timings: tuple[Timing, ...]


@dataclass(frozen=True)
class Document:
    """A document to ingest: chunked, embedded and stored by the server."""

    id: str
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


# Filter conditions; a search's ``filter`` is a sequence of them, all of which must hold.
@dataclass(frozen=True)
class Eq:
    """``field`` equals ``value`` (a string, number or bool)."""

    field: str
    value: str | float | bool


@dataclass(frozen=True)
class In:
    """``field`` is one of ``values``."""

    field: str
    values: Sequence[str | float | bool]


@dataclass(frozen=True)
class Range:
    """``field`` is within the given bounds (None: unbounded on that side)."""

    field: str
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None


Condition = Eq | In | Range


@dataclass(frozen=True)
class Query:
    """One query of a batch (``search_batch``): a vector or a text, and its options."""

    collection: str
    vector: Sequence[float] | np.ndarray | None = None
    text: str | None = None
    top_k: int = 10
    filter: Sequence[Condition] = ()
    mode: str | None = None
    with_payload: bool = False
    with_vector: bool = False
    nprobe: int = 0
    ef_search: int = 0
    rrf_k: int = 0
    candidates: int = 0


# --------------------------------------------------------------------- builders


def to_value(value: Any) -> struct_pb2.Value:
    """A JSON scalar as a protobuf Value (bool before number: bool is an int)."""
    out = struct_pb2.Value()
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, (int, float)):
        out.number_value = float(value)
    else:
        out.string_value = str(value)
    return out


def build_filter(conditions: Iterable[Condition]) -> pb.Filter:
    """The wire Filter of these conditions."""
    flt = pb.Filter()
    for cond in conditions:
        wire = flt.must.add(field=cond.field)
        if isinstance(cond, Eq):
            wire.equals.CopyFrom(to_value(cond.value))
        elif isinstance(cond, In):
            getattr(wire, "in").values.extend(to_value(v) for v in cond.values)  # "in": keyword
        else:
            for bound in ("gte", "gt", "lte", "lt"):
                if getattr(cond, bound) is not None:
                    setattr(wire.range, bound, float(getattr(cond, bound)))
            wire.range.SetInParent()  # an unbounded range is still a range test
    return flt


def build_create_request(
    name: str, dimension: int, metric: str | None, index_kind: str | None,
    index_params: IndexParams | None,
) -> pb.CreateCollectionRequest:
    """The CreateCollectionRequest."""
    p = index_params or IndexParams()
    return pb.CreateCollectionRequest(
        name=name, dimension=dimension,
        metric=enum_value(METRICS, metric, "metric"),
        index_kind=enum_value(INDEX_KINDS, index_kind, "index_kind"),
        index_params=pb.IndexParams(
            nlist=p.nlist, pq_m=p.pq_m, hnsw_m=p.hnsw_m, ef_construction=p.ef_construction
        ),
    )


def point_to_proto(point: Point) -> pb.Point:
    """A Point as sent in an upsert."""
    out = pb.Point(id=point.id, payload=pb.Payload(text=point.text))
    if point.vector is not None:
        out.vector.values.extend(np.asarray(point.vector, dtype=np.float32).tolist())
    if point.metadata:
        out.payload.metadata.update(dict(point.metadata))
    return out


def build_points(points: Iterable[Point]) -> list[pb.Point]:
    """Points as sent in an upsert."""
    return [point_to_proto(p) for p in points]


def build_search_request(query: Query) -> pb.SearchRequest:
    """The SearchRequest of one query; exactly one of vector and text must be given."""
    if (query.vector is None) == (query.text is None):
        raise ValueError("give a query vector or a query text, not both or neither")
    request = pb.SearchRequest(
        collection=query.collection, top_k=query.top_k,
        filter=build_filter(query.filter),
        params=pb.SearchParams(
            nprobe=query.nprobe, ef_search=query.ef_search,
            rrf_k=query.rrf_k, candidates=query.candidates,
        ),
        with_payload=query.with_payload, with_vector=query.with_vector,
        mode=enum_value(SEARCH_MODES, query.mode, "mode"),
    )
    if query.text is not None:
        request.text = query.text
    else:
        request.vector.values.extend(np.asarray(query.vector, dtype=np.float32).tolist())
    return request


def build_ingest_messages(
    collection: str, documents: Iterable[Document], chunk_tokens: int, overlap_tokens: int
) -> Iterable[pb.IngestRequest]:
    """The messages of one Ingest call: ``DOCS_PER_MESSAGE`` documents each, lazily."""
    chunking = pb.ChunkingParams(chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
    batch: list[pb.Document] = []
    for doc in documents:
        wire = pb.Document(id=doc.id, text=doc.text)
        if doc.metadata:
            wire.metadata.update(dict(doc.metadata))
        batch.append(wire)
        if len(batch) == DOCS_PER_MESSAGE:
            yield pb.IngestRequest(collection=collection, documents=batch, chunking=chunking)
            batch = []
    if batch:
        yield pb.IngestRequest(collection=collection, documents=batch, chunking=chunking)


# ---------------------------------------------------------------------- parsers


def _struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct) if struct.fields else {}


def _vector(vector: common_pb2.Vector, present: bool) -> np.ndarray | None:
    return np.asarray(vector.values, dtype=np.float32) if present else None


def parse_collection(info: pb.CollectionInfo) -> CollectionInfo:
    """CollectionInfo message -> CollectionInfo."""
    p = info.index_params
    return CollectionInfo(
        name=info.name, dimension=info.dimension,
        metric=enum_name(METRICS, info.metric),
        index_kind=enum_name(INDEX_KINDS, info.index_kind),
        points=info.points, trained=info.trained, disk_bytes=info.disk_bytes,
        index_params=IndexParams(p.nlist, p.pq_m, p.hnsw_m, p.ef_construction),
    )


def parse_point(point: pb.Point) -> Point:
    """Point message -> Point."""
    return Point(
        id=point.id, vector=_vector(point.vector, point.HasField("vector")),
        text=point.payload.text, metadata=_struct(point.payload.metadata),
    )


def parse_search_response(response: pb.SearchResponse) -> SearchResult:
    """SearchResponse -> SearchResult."""
    hits = tuple(
        Hit(
            id=h.id, score=h.score, text=h.payload.text, metadata=_struct(h.payload.metadata),
            vector=_vector(h.vector, h.HasField("vector")),
        )
        for h in response.hits
    )
    return SearchResult(hits, parse_timings(response.timings))


def parse_upsert_response(response: pb.UpsertResponse | pb.UpsertBatchResponse) -> UpsertResult:
    """UpsertResponse / UpsertBatchResponse -> UpsertResult."""
    return UpsertResult(response.upserted, parse_timings(response.timings))


def parse_ingest_response(response: pb.IngestResponse) -> IngestResult:
    """IngestResponse -> IngestResult."""
    return IngestResult(
        response.documents, response.chunks, response.chunk_tokens, response.overlap_tokens,
        parse_timings(response.timings),
    )


@dataclass(frozen=True)
class SearchBatchResult:
    """One SearchResult per query of a batch, in order, and the batch's timings."""

    results: tuple[SearchResult, ...]
    timings: tuple[Timing, ...]


def parse_search_batch_response(response: pb.SearchBatchResponse) -> SearchBatchResult:
    """SearchBatchResponse -> SearchBatchResult."""
    return SearchBatchResult(
        tuple(parse_search_response(r) for r in response.results),
        parse_timings(response.timings),
    )


def build_upsert_messages(
    collection: str, batches: Iterable[Sequence[Point]]
) -> Iterable[pb.UpsertRequest]:
    """One UpsertRequest per batch of points, lazily (a streaming Upsert's messages)."""
    for batch in batches:
        yield pb.UpsertRequest(collection=collection, points=build_points(batch))
