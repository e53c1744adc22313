"""Protobuf <-> domain conversion of the search hop, in one pass per message.

Every wire message is validated and converted here (limits, enums, filters, payload
sizes), so the hop core and ``retrieval`` see only domain types: a ``SearchRequest``
becomes a ``SearchQuery`` in :func:`query_from_proto`, hits go back in :func:`hit_to_proto`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2

from backbone.v1 import vector_search_service_pb2 as pb
from retrieval import filters
from retrieval.collection import Collection
from retrieval.fusion import Fusion, FusionDefaults, check_weight
from retrieval.ingest import Document
from retrieval.types import (
    MAX_CANDIDATES,
    MAX_EF_SEARCH,
    MAX_ID_BYTES,
    MAX_METADATA_BYTES,
    MAX_NPROBE,
    MAX_TEXT_BYTES,
    CollectionSpec,
    Hit,
    IndexKind,
    Metric,
    Payload,
    Point,
    SearchMode,
    SearchParams,
    SearchQuery,
    check_id,
    check_top_k,
    check_vector,
    make_spec,
)
from server.decoding import check_struct_depth
from server.errors import InvalidArgument

MAX_SEARCHES_PER_BATCH = 256
MAX_IDS_PER_REQUEST = 10_000
MAX_DOCUMENTS_PER_MESSAGE = 256
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024

_METRICS = {
    pb.METRIC_UNSPECIFIED: None,
    pb.METRIC_COSINE: Metric.COSINE,
    pb.METRIC_INNER_PRODUCT: Metric.INNER_PRODUCT,
    pb.METRIC_L2: Metric.L2,
}
_KINDS = {
    pb.INDEX_KIND_UNSPECIFIED: None,
    pb.INDEX_KIND_FLAT: IndexKind.FLAT,
    pb.INDEX_KIND_IVF_FLAT: IndexKind.IVF_FLAT,
    pb.INDEX_KIND_IVF_PQ: IndexKind.IVF_PQ,
    pb.INDEX_KIND_HNSW: IndexKind.HNSW,
}
_MODES = {
    pb.SEARCH_MODE_UNSPECIFIED: SearchMode.DENSE,
    pb.SEARCH_MODE_DENSE: SearchMode.DENSE,
    pb.SEARCH_MODE_KEYWORD: SearchMode.KEYWORD,
    pb.SEARCH_MODE_HYBRID: SearchMode.HYBRID,
}
_FUSIONS = {
    pb.FUSION_METHOD_UNSPECIFIED: None,
    pb.FUSION_METHOD_RRF: Fusion.RRF,
    pb.FUSION_METHOD_CONVEX_MINMAX: Fusion.CONVEX_MINMAX,
    pb.FUSION_METHOD_CONVEX_ZSCORE: Fusion.CONVEX_ZSCORE,
}
_STEMMING = {
    pb.STEMMING_UNSPECIFIED: True,
    pb.STEMMING_ENGLISH: True,
    pb.STEMMING_NONE: False,
}
_METRIC_TO_PB = {v: k for k, v in _METRICS.items() if v is not None}
_KIND_TO_PB = {v: k for k, v in _KINDS.items() if v is not None}

def enum_value(table: dict[int, Any], value: int, field: str) -> Any:
    if value not in table:
        raise InvalidArgument(f"unknown {field} value {value}", metadata={"field": field})
    return table[value]


def info_to_proto(collection: Collection) -> pb.CollectionInfo:
    """CollectionInfo of a collection's current stats."""
    stats = collection.stats()
    spec = stats.spec
    return pb.CollectionInfo(
        name=spec.name,
        dimension=spec.dimension,
        metric=_METRIC_TO_PB[spec.metric],
        index_kind=_KIND_TO_PB[spec.kind],
        points=stats.points,
        trained=stats.trained,
        disk_bytes=stats.disk_bytes,
        version=collection.version,
        index_params=pb.IndexParams(
            nlist=stats.nlist,
            pq_m=spec.pq_m,
            hnsw_m=spec.hnsw_m if spec.kind is IndexKind.HNSW else 0,
            ef_construction=spec.ef_construction if spec.kind is IndexKind.HNSW else 0,
        ),
        stemming=pb.STEMMING_ENGLISH if spec.stemming else pb.STEMMING_NONE,
    )


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python values (numbers become floats)."""
    return json_format.MessageToDict(struct) if struct.fields else {}


def payload_from_proto(payload: pb.Payload) -> Payload:
    """Domain payload, after the 64 KiB limits on text and encoded metadata."""
    if len(payload.text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise InvalidArgument(
            f"payload text exceeds {MAX_TEXT_BYTES} bytes",
            reason="INPUT_TOO_LARGE", metadata={"limit": MAX_TEXT_BYTES},
        )
    if payload.metadata.ByteSize() > MAX_METADATA_BYTES:
        raise InvalidArgument(
            f"payload metadata exceeds {MAX_METADATA_BYTES} bytes",
            reason="INPUT_TOO_LARGE", metadata={"limit": MAX_METADATA_BYTES},
        )
    check_struct_depth(payload.metadata, "payload.metadata")
    return Payload(payload.text, struct_to_dict(payload.metadata))


def payload_to_proto(payload: Payload) -> pb.Payload:
    """Wire payload."""
    out = pb.Payload(text=payload.text)
    if payload.metadata:
        out.metadata.update(payload.metadata)
    return out


def points_from_proto(points: Sequence[pb.Point], dimension: int, limit: int) -> list[Point]:
    """Validated domain points (ids, dimension, finiteness, payload sizes)."""
    if len(points) > limit:
        raise InvalidArgument(
            f"at most {limit} points per message", reason="TOO_MANY_INPUTS",
            metadata={"limit": limit},
        )
    out = []
    for i, point in enumerate(points):
        check_id(point.id)
        vector = check_vector(
            np.asarray(point.vector.values, dtype=np.float32), dimension, f"points[{i}].vector"
        )
        out.append(Point(point.id, vector, payload_from_proto(point.payload)))
    return out


def check_ids(ids: Sequence[str]) -> list[str]:
    """1-10000 valid ids."""
    if not ids:
        raise InvalidArgument("ids must not be empty", reason="EMPTY_INPUT")
    if len(ids) > MAX_IDS_PER_REQUEST:
        raise InvalidArgument(
            f"at most {MAX_IDS_PER_REQUEST} ids", reason="TOO_MANY_INPUTS",
            metadata={"limit": MAX_IDS_PER_REQUEST},
        )
    for point_id in ids:
        check_id(point_id)
    return list(ids)


def _scalar(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null, struct, list, unset: rejected by make_filter


def conditions_from_proto(flt: pb.Filter) -> tuple[filters.Condition, ...]:
    """Domain conditions; INVALID_FILTER for a malformed filter."""
    out: list[filters.Condition] = []
    for cond in flt.must:
        test = cond.WhichOneof("test")
        if test == "equals":
            out.append(filters.Equals(cond.field, _scalar(cond.equals)))
        elif test == "in":
            values = tuple(_scalar(v) for v in getattr(cond, "in").values)
            out.append(filters.In(cond.field, values))
        elif test == "range":
            r = cond.range
            out.append(filters.Range(
                cond.field,
                gte=r.gte if r.HasField("gte") else None,
                gt=r.gt if r.HasField("gt") else None,
                lte=r.lte if r.HasField("lte") else None,
                lt=r.lt if r.HasField("lt") else None,
            ))
        else:
            raise InvalidArgument(
                "a filter condition sets no test (equals, in or range)",
                reason="INVALID_FILTER", metadata={"field": cond.field},
            )
    return filters.make_filter(out)


def params_from_proto(params: pb.SearchParams, defaults: FusionDefaults) -> SearchParams:
    """Tunables within their bounds; unset fusion settings take ``defaults``."""
    for name, value, limit in (
        ("nprobe", params.nprobe, MAX_NPROBE),
        ("ef_search", params.ef_search, MAX_EF_SEARCH),
        ("candidates", params.candidates, MAX_CANDIDATES),
        ("rrf_k", params.rrf_k, 1_000_000),
    ):
        if value > limit:
            raise InvalidArgument(
                f"params.{name} must be at most {limit}", metadata={"field": name, "limit": limit}
            )
    method = enum_value(_FUSIONS, params.fusion, "fusion") or defaults.method
    weight = (
        check_weight(params.dense_weight) if params.HasField("dense_weight")
        else defaults.weight_for(method)
    )
    return SearchParams(
        params.nprobe, params.ef_search, params.rrf_k or defaults.rrf_k, params.candidates,
        fusion=method, dense_weight=weight,
    )


def hit_to_proto(hit: Hit) -> pb.Hit:
    """Wire hit."""
    out = pb.Hit(id=hit.id, score=hit.score)
    if hit.payload is not None:
        out.payload.CopyFrom(payload_to_proto(hit.payload))
    if hit.vector is not None:
        out.vector.values.extend(hit.vector.tolist())
    return out


def spec_from_proto(request: pb.CreateCollectionRequest) -> CollectionSpec:
    """A validated collection spec with defaults filled in."""
    params = request.index_params
    return make_spec(
        request.name,
        request.dimension,
        enum_value(_METRICS, request.metric, "metric"),
        enum_value(_KINDS, request.index_kind, "index_kind"),
        nlist=params.nlist, pq_m=params.pq_m, hnsw_m=params.hnsw_m,
        ef_construction=params.ef_construction,
        stemming=enum_value(_STEMMING, request.stemming, "stemming"),
    )


def query_from_proto(
    request: pb.SearchRequest, spec: CollectionSpec, max_top_k: int, max_text_chars: int,
    defaults: FusionDefaults | None = None,
) -> SearchQuery:
    """Validate a SearchRequest (everything checkable before embedding) into a query.

    A text query in dense or hybrid mode comes back without a vector: the hop embeds it.
    Unset fusion settings are resolved here from ``defaults`` (the [search] config).
    """
    top_k = check_top_k(request.top_k, max_top_k)
    mode = enum_value(_MODES, request.mode, "mode")
    which = request.WhichOneof("query")
    if which is None:
        raise InvalidArgument("set a query: vector or text", reason="EMPTY_INPUT")
    vector = None
    text = ""
    if which == "vector":
        if mode is not SearchMode.DENSE:
            raise InvalidArgument(
                "keyword and hybrid search need a text query", metadata={"field": "mode"}
            )
        vector = check_vector(
            np.asarray(request.vector.values, dtype=np.float32), spec.dimension, "query vector"
        )
    else:
        text = request.text
        if not text.strip():
            raise InvalidArgument("query text is empty", reason="EMPTY_INPUT")
        if len(text) > max_text_chars:
            raise InvalidArgument(
                f"query text exceeds {max_text_chars} characters", reason="INPUT_TOO_LARGE",
                metadata={"limit": max_text_chars},
            )
    return SearchQuery(
        k=top_k, vector=vector, text=text, mode=mode,
        conditions=conditions_from_proto(request.filter),
        params=params_from_proto(request.params, defaults or FusionDefaults()),
        with_payload=request.with_payload, with_vector=request.with_vector,
    )


def response_from_hits(hits: Sequence[Hit]) -> pb.SearchResponse:
    """A SearchResponse of domain hits (timings are added by the caller)."""
    return pb.SearchResponse(hits=[hit_to_proto(h) for h in hits])


def documents_from_proto(documents: Sequence[pb.Document]) -> list[Document]:
    """Validated documents of one Ingest message."""
    if len(documents) > MAX_DOCUMENTS_PER_MESSAGE:
        raise InvalidArgument(
            f"at most {MAX_DOCUMENTS_PER_MESSAGE} documents per message",
            reason="TOO_MANY_INPUTS", metadata={"limit": MAX_DOCUMENTS_PER_MESSAGE},
        )
    out = []
    for i, doc in enumerate(documents):
        if not doc.text.strip():
            raise InvalidArgument(f"documents[{i}].text is empty", reason="EMPTY_INPUT")
        if len(doc.text.encode("utf-8")) > MAX_DOCUMENT_BYTES:
            raise InvalidArgument(
                f"documents[{i}].text exceeds {MAX_DOCUMENT_BYTES} bytes",
                reason="INPUT_TOO_LARGE", metadata={"limit": MAX_DOCUMENT_BYTES},
            )
        # Room for the "#<n>" chunk suffix within the id limit.
        if len(doc.id.encode("utf-8")) > MAX_ID_BYTES - 16:
            raise InvalidArgument(
                f"documents[{i}].id exceeds {MAX_ID_BYTES - 16} bytes",
                metadata={"limit": MAX_ID_BYTES - 16},
            )
        if doc.metadata.ByteSize() > MAX_METADATA_BYTES:
            raise InvalidArgument(
                f"documents[{i}].metadata exceeds {MAX_METADATA_BYTES} bytes",
                reason="INPUT_TOO_LARGE", metadata={"limit": MAX_METADATA_BYTES},
            )
        check_struct_depth(doc.metadata, f"documents[{i}].metadata")
        out.append(Document(doc.id, doc.text, struct_to_dict(doc.metadata)))
    return out

