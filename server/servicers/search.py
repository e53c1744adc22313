"""The search hop: ``VectorSearchService`` over ``retrieval`` collections.

The servicer is thin (protobuf <-> domain); validation of limits happens here before any
model or index work, the rest lives in ``retrieval``. Blocking index calls run in a thread
pool (searches concurrently; writes and snapshots in one writer thread, since a
collection serialises them anyway). Text queries are embedded by the embedding hop:
in-process when it runs in the same process, else over gRPC at
``search.embedding_address``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2

from backbone.v1 import (
    common_pb2,
    vector_search_service_pb2 as pb,
    vector_search_service_pb2_grpc as pb_grpc,
)
from retrieval import filters
from retrieval.chunking import TokenChunker, resolve_settings
from retrieval.collection import Collection, CollectionClosed
from retrieval.ingest import Document, Ingestor
from retrieval.manager import CollectionManager, collection_not_found
from retrieval.types import (
    MAX_CANDIDATES,
    MAX_EF_SEARCH,
    MAX_ID_BYTES,
    MAX_METADATA_BYTES,
    MAX_NPROBE,
    MAX_TEXT_BYTES,
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
from router.batcher import BatchPolicy, DynamicBatcher
from server.calls import deadline_of, hop_timing
from server.config import Config, SearchConfig
from retrieval.errors import RetrievalError
from server.errors import InvalidArgument, Unavailable
from server.hop import HopContext
from server.upstream import Upstreams, timing_to_proto

log = logging.getLogger(__name__)

MAX_SEARCHES_PER_BATCH = 256
MAX_IDS_PER_REQUEST = 10_000
MAX_DOCUMENTS_PER_MESSAGE = 256
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
# Seconds between checks for collections whose log has grown enough to snapshot.
SNAPSHOT_CHECK_S = 1.0

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
_METRIC_TO_PB = {v: k for k, v in _METRICS.items() if v is not None}
_KIND_TO_PB = {v: k for k, v in _KINDS.items() if v is not None}


# ------------------------------------------------------------------ conversions


def _enum(table: dict[int, Any], value: int, field: str) -> Any:
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
                f"condition on {cond.field!r} sets no test (equals, in or range)",
                reason="INVALID_FILTER",
            )
    return filters.make_filter(out)


def params_from_proto(params: pb.SearchParams) -> SearchParams:
    """Tunables within their bounds."""
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
    return SearchParams(params.nprobe, params.ef_search, params.rrf_k, params.candidates)


def hit_to_proto(hit: Hit) -> pb.Hit:
    """Wire hit."""
    out = pb.Hit(id=hit.id, score=hit.score)
    if hit.payload is not None:
        out.payload.CopyFrom(payload_to_proto(hit.payload))
    if hit.vector is not None:
        out.vector.values.extend(hit.vector.tolist())
    return out


# ------------------------------------------------------------------ the hop


def _init_worker(faiss_threads: int) -> None:
    """Set this thread's OpenMP thread count (0: every core); the setting is per thread."""
    import faiss

    faiss.omp_set_num_threads(faiss_threads if faiss_threads > 0 else os.cpu_count() or 1)


class SearchHop:
    """Serves VectorSearchService from the collections under ``search.data_dir``."""

    name = "search"
    service_names = ("backbone.v1.VectorSearchService",)

    def __init__(self) -> None:
        self.manager: CollectionManager | None = None
        self._config: Config | None = None
        self._ctx: HopContext | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._snapshotter: asyncio.Task | None = None
        self._dense: DynamicBatcher[tuple[Collection, SearchQuery], list[Hit]] | None = None
        self._upstreams: Upstreams | None = None
        self._chunker: TokenChunker | None = None
        self._chunker_lock = asyncio.Lock()

    # -- Hop protocol ----------------------------------------------------------------

    async def start(self, ctx: HopContext) -> None:
        """Open every collection (snapshot + log replay), probe FAISS, start snapshots."""
        self._ctx, self._config = ctx, ctx.config
        cfg = self.cfg
        self._readers = ThreadPoolExecutor(
            cfg.workers, "search-read", initializer=_init_worker, initargs=(cfg.faiss_threads,)
        )
        self._writer = ThreadPoolExecutor(
            1, "search-write", initializer=_init_worker, initargs=(cfg.faiss_build_threads,)
        )
        manager = CollectionManager(cfg.data_dir, durable=cfg.durable)
        await self.write(manager.load)
        await self.read(_probe_faiss)
        self.manager = manager
        policy = BatchPolicy(
            max_batch_size=cfg.search_batch_max,
            max_wait_s=cfg.search_batch_wait_ms / 1000.0,
            token_budget=cfg.search_batch_max,  # every query costs 1
            max_queue=cfg.max_search_queue,
        )
        self._dense = DynamicBatcher(
            "search", functools.partial(_run_dense_batch, cfg.faiss_threads), policy
        )
        await self._dense.start()
        self._snapshotter = asyncio.create_task(self._snapshot_loop(), name="search-snapshots")

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register VectorSearchService."""
        pb_grpc.add_VectorSearchServiceServicer_to_server(VectorSearchServicer(self), server)

    def healthy(self) -> bool:
        """False once the snapshot task or the search batcher has died."""
        return (
            self._snapshotter is not None
            and not self._snapshotter.done()
            and self._dense is not None
            and self._dense.healthy()
        )

    async def stop(self) -> None:
        """Stop snapshots, snapshot and close every collection, release threads."""
        if self._snapshotter is not None:
            self._snapshotter.cancel()
            await asyncio.gather(self._snapshotter, return_exceptions=True)
        if self._dense is not None:
            await self._dense.stop()
        if self.manager is not None:
            await self.write(self.manager.close)
        if self._upstreams is not None:
            await self._upstreams.close()
        for pool in (self._readers, self._writer):
            if pool is not None:
                pool.shutdown(wait=True)

    # -- helpers -----------------------------------------------------------------------

    @property
    def cfg(self) -> SearchConfig:
        """The search section of the config."""
        assert self._config is not None
        return self._config.search

    def collection(self, name: str) -> Collection:
        """The named collection (NOT_FOUND / COLLECTION_NOT_FOUND when unknown)."""
        if self.manager is None:
            raise Unavailable("search hop is not started")
        return self.manager.get(name)

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking read (search, get) in a reader thread."""
        return await self._in(self._readers, fn, *args)

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking write (upsert, delete, snapshot) in the writer thread."""
        return await self._in(self._writer, fn, *args)

    async def timed_read(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
        """Like :meth:`read`, plus seconds queued and seconds computing."""
        submitted = time.perf_counter()

        def call() -> tuple[Any, float, float]:
            started = time.perf_counter()
            result = fn(*args)
            return result, started - submitted, time.perf_counter() - started

        return await self.read(call)

    async def _in(self, pool: ThreadPoolExecutor | None, fn: Callable, *args: Any) -> Any:
        if pool is None:
            raise Unavailable("search hop is not started")
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except CollectionClosed as closed:
            raise collection_not_found(str(closed)) from None

    def embedding(self) -> Any:
        """The embedding hop through the one upstream path (``server.upstream``):
        in-process when present, else the configured address."""
        assert self._ctx is not None
        if self._upstreams is None:
            self._upstreams = Upstreams(self._ctx)
        return self._upstreams.embedding

    async def chunker(self, model_path: str) -> TokenChunker:
        """The token chunker of the embedding model (loaded once)."""
        async with self._chunker_lock:
            if self._chunker is None:
                self._chunker = await asyncio.to_thread(TokenChunker.from_model_path, model_path)
            return self._chunker

    async def _snapshot_loop(self) -> None:
        assert self.manager is not None
        while True:
            await asyncio.sleep(SNAPSHOT_CHECK_S)
            for collection in self.manager.snapshot_due(
                self.cfg.snapshot_min_log_bytes, self.cfg.snapshot_log_ratio
            ):
                try:
                    await self.write(collection.snapshot)
                except RetrievalError:  # deleted meanwhile
                    continue

    # -- the search core (also the in-process API for the pipeline) --------------------

    def prepare(self, request: pb.SearchRequest) -> tuple[Collection, SearchQuery]:
        """Validate a SearchRequest (everything checkable before embedding) into a query."""
        collection = self.collection(request.collection)
        spec = collection.spec
        top_k = check_top_k(request.top_k, self.cfg.max_top_k)
        mode = _enum(_MODES, request.mode, "mode")
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
            limit = self._config.embedding.max_text_chars if self._config else 32768
            if len(text) > limit:
                raise InvalidArgument(
                    f"query text exceeds {limit} characters", reason="INPUT_TOO_LARGE",
                    metadata={"limit": limit},
                )
        conditions = conditions_from_proto(request.filter)
        collection.check_filter_fields(conditions)
        query = SearchQuery(
            k=top_k, vector=vector, text=text, mode=mode, conditions=conditions,
            params=params_from_proto(request.params),
            with_payload=request.with_payload, with_vector=request.with_vector,
        )
        return collection, query

    async def search(
        self, requests: Sequence[pb.SearchRequest], deadline: float | None = None
    ) -> tuple[list[pb.SearchResponse], list[common_pb2.HopTiming]]:
        """Validate, embed text queries (one batch), search each collection in one call.

        ``deadline`` (a ``time.monotonic()`` instant): dense queries still queued then are
        dropped before compute with DEADLINE_EXCEEDED / DEADLINE_TOO_SHORT.
        """
        prepared = [self.prepare(r) for r in requests]
        timings: list[common_pb2.HopTiming] = []
        needs_vector = [
            i for i, (_, q) in enumerate(prepared)
            if q.vector is None and q.mode is not SearchMode.KEYWORD
        ]
        if needs_vector:
            embedder = self.embedding()
            for i in needs_vector:
                _check_embedding_dimension(embedder.dimension, prepared[i][0])
            texts = [prepared[i][1].text for i in needs_vector]
            embedded = await embedder.embed(texts, deadline=deadline)
            vectors = embedded.vectors
            timings.append(timing_to_proto(embedded.timing))
            for row, i in enumerate(needs_vector):
                collection, query = prepared[i]
                _check_embedding_dimension(vectors.shape[1], collection)
                prepared[i] = (collection, dataclasses.replace(query, vector=vectors[row]))
        search_began = time.perf_counter()
        results: list[list[Hit]] = [[] for _ in prepared]
        # Dense queries go through the batcher (concurrent calls share FAISS searches);
        # keyword and hybrid ones (BM25, possibly a lazy rebuild) run in reader threads.
        dense = [i for i, (_, q) in enumerate(prepared) if q.mode is SearchMode.DENSE]
        other: dict[str, list[int]] = {}
        for i, (collection, query) in enumerate(prepared):
            if query.mode is not SearchMode.DENSE:
                other.setdefault(collection.spec.name, []).append(i)
        runs: list[Any] = [
            self.timed_read(prepared[idx[0]][0].search, [prepared[i][1] for i in idx])
            for idx in other.values()
        ]
        if dense:
            assert self._dense is not None
            runs.append(
                self._dense.submit([prepared[i] for i in dense], [1] * len(dense), deadline)
            )
        outcomes = await asyncio.gather(*runs)
        queue_s = compute_s = 0.0
        batch_size = len(prepared)
        for idx, (hits, queued, computed) in zip(other.values(), outcomes):
            queue_s, compute_s = max(queue_s, queued), compute_s + computed
            for i, found in zip(idx, hits, strict=True):
                results[i] = found
        if dense:
            hits, batch_timing = outcomes[-1]
            queue_s = max(queue_s, batch_timing.queue_s)
            compute_s += batch_timing.compute_s
            batch_size = max(batch_size, batch_timing.batch_size)
            for i, found in zip(dense, hits, strict=True):
                results[i] = found
        total = time.perf_counter() - search_began
        timings.append(hop_timing("search", queue_s=queue_s, compute_s=compute_s, total_s=total, batch_size=batch_size))
        responses = [pb.SearchResponse(hits=[hit_to_proto(h) for h in found]) for found in results]
        return responses, timings


def _run_dense_batch(
    faiss_threads: int, items: list[tuple[Collection, SearchQuery]]
) -> list[list[Hit]]:
    """The batcher's work: each collection's dense queries in one ``Collection.search``."""
    _init_worker(faiss_threads)  # the batcher's own thread: OpenMP settings are per thread
    groups: dict[int, list[int]] = {}
    for i, (collection, _) in enumerate(items):
        groups.setdefault(id(collection), []).append(i)
    out: list[list[Hit]] = [[] for _ in items]
    for idx in groups.values():
        collection = items[idx[0]][0]
        for i, hits in zip(idx, collection.search([items[i][1] for i in idx]), strict=True):
            out[i] = hits
    return out


def _check_embedding_dimension(dimension: int | None, collection: Collection) -> None:
    if dimension is not None and dimension != collection.spec.dimension:
        raise InvalidArgument(
            f"the embedding model's dimension {dimension} differs from collection "
            f"{collection.spec.name!r}'s {collection.spec.dimension}",
            reason="DIMENSION_MISMATCH",
            metadata={"expected": collection.spec.dimension, "got": dimension},
        )


def _probe_faiss() -> None:
    """Build a tiny index and check that it finds its own vector (FAISS works here)."""
    import faiss

    vectors = np.eye(4, dtype=np.float32)
    index = faiss.IndexFlatIP(4)
    index.add(vectors)
    _, labels = index.search(vectors[2:3], 1)
    if int(labels[0, 0]) != 2:
        raise RuntimeError("FAISS probe failed")


# ------------------------------------------------------------------ the servicer


class VectorSearchServicer(pb_grpc.VectorSearchServiceServicer):
    """Thin servicer: protobuf in, ``SearchHop``/``retrieval`` core, protobuf out."""

    def __init__(self, hop: SearchHop) -> None:
        self._hop = hop

    async def CreateCollection(self, request, context):  # noqa: N802 - gRPC method name
        """Create a collection (defaults filled in)."""
        params = request.index_params
        spec = make_spec(
            request.name,
            request.dimension,
            _enum(_METRICS, request.metric, "metric"),
            _enum(_KINDS, request.index_kind, "index_kind"),
            nlist=params.nlist, pq_m=params.pq_m, hnsw_m=params.hnsw_m,
            ef_construction=params.ef_construction,
        )
        hop = self._hop
        if hop.manager is None:
            raise Unavailable("search hop is not started")
        collection = await hop.write(hop.manager.create, spec)
        return pb.CreateCollectionResponse(collection=await hop.read(info_to_proto, collection))

    async def ListCollections(self, request, context):  # noqa: N802
        """Every collection with its stats."""
        hop = self._hop
        if hop.manager is None:
            raise Unavailable("search hop is not started")
        collections = hop.manager.list()
        infos = await hop.read(lambda: [info_to_proto(c) for c in collections])
        return pb.ListCollectionsResponse(collections=infos)

    async def DescribeCollection(self, request, context):  # noqa: N802
        """One collection's config and stats."""
        collection = self._hop.collection(request.name)
        info = await self._hop.read(info_to_proto, collection)
        return pb.DescribeCollectionResponse(collection=info)

    async def DeleteCollection(self, request, context):  # noqa: N802
        """Delete a collection and its files."""
        hop = self._hop
        hop.collection(request.name)  # NOT_FOUND before touching anything
        await hop.write(hop.manager.delete, request.name)
        return pb.DeleteCollectionResponse()

    async def Upsert(self, request_iterator, context):  # noqa: N802
        """Client-streaming upsert; each message is validated whole, then made durable."""
        hop = self._hop
        began = time.perf_counter()
        name: str | None = None
        collection: Collection | None = None
        upserted = 0
        compute = 0.0
        async for message in request_iterator:
            if name is None:
                name = message.collection
                collection = hop.collection(name)
            elif message.collection != name:
                raise InvalidArgument(
                    "every message of an Upsert stream must name the same collection",
                    metadata={"field": "collection"},
                )
            assert collection is not None
            points = points_from_proto(
                message.points, collection.spec.dimension, hop.cfg.max_points_per_request
            )
            started = time.perf_counter()
            upserted += await hop.write(collection.upsert, points)
            compute += time.perf_counter() - started
        total = time.perf_counter() - began
        return pb.UpsertResponse(
            upserted=upserted, timings=[hop_timing("search", queue_s=0, compute_s=compute, total_s=total, batch_size=upserted)]
        )

    async def UpsertBatch(self, request, context):  # noqa: N802
        """Unary upsert of 1-1024 points, durable when it returns."""
        hop = self._hop
        began = time.perf_counter()
        collection = hop.collection(request.collection)
        if not request.points:
            raise InvalidArgument("points must not be empty", reason="EMPTY_INPUT")
        points = points_from_proto(
            request.points, collection.spec.dimension, hop.cfg.max_points_per_request
        )
        started = time.perf_counter()
        upserted = await hop.write(collection.upsert, points)
        now = time.perf_counter()
        return pb.UpsertBatchResponse(
            upserted=upserted,
            timings=[hop_timing("search", compute_s=now - started, total_s=now - began, batch_size=len(points))],
        )

    async def Delete(self, request, context):  # noqa: N802
        """Delete points by id (durably)."""
        collection = self._hop.collection(request.collection)
        ids = check_ids(request.ids)
        return pb.DeleteResponse(deleted=await self._hop.write(collection.delete, ids))

    async def Get(self, request, context):  # noqa: N802
        """Fetch points by id."""
        collection = self._hop.collection(request.collection)
        ids = check_ids(request.ids)
        found = await self._hop.read(
            lambda: collection.get(ids, with_vector=request.with_vector)
        )
        points = []
        for point in found:
            out = pb.Point(id=point.id, payload=payload_to_proto(point.payload))
            if point.vector is not None:
                out.vector.values.extend(point.vector.tolist())
            points.append(out)
        return pb.GetResponse(points=points)

    async def Search(self, request, context):  # noqa: N802
        """One search."""
        began = time.perf_counter()
        responses, timings = await self._hop.search([request], deadline_of(context))
        response = responses[0]
        _finish_timings(timings, began)
        response.timings.extend(timings)
        return response

    async def SearchBatch(self, request, context):  # noqa: N802
        """Many searches, embedded and searched in batches."""
        began = time.perf_counter()
        searches = list(request.searches)
        if not searches:
            raise InvalidArgument("searches must not be empty", reason="EMPTY_INPUT")
        if len(searches) > MAX_SEARCHES_PER_BATCH:
            raise InvalidArgument(
                f"at most {MAX_SEARCHES_PER_BATCH} searches", reason="TOO_MANY_INPUTS",
                metadata={"limit": MAX_SEARCHES_PER_BATCH},
            )
        responses, timings = await self._hop.search(searches, deadline_of(context))
        _finish_timings(timings, began)
        return pb.SearchBatchResponse(results=responses, timings=timings)

    async def Ingest(self, request_iterator, context):  # noqa: N802
        """Documents in; chunked, embedded and upserted; durable when it returns."""
        began = time.perf_counter()
        ingestor: Ingestor | None = None
        name = ""
        async for message in request_iterator:
            if ingestor is None:
                name = message.collection
                ingestor = await self._start_ingest(message)
            elif message.collection != name:
                raise InvalidArgument(
                    "every message of an Ingest stream must name the same collection",
                    metadata={"field": "collection"},
                )
            docs = documents_from_proto(message.documents)
            await ingestor.add(docs)
        if ingestor is None:
            raise InvalidArgument(
                "an Ingest stream needs at least one message", reason="EMPTY_INPUT"
            )
        stats = ingestor.stats
        total = time.perf_counter() - began
        return pb.IngestResponse(
            documents=stats.documents,
            chunks=stats.chunks,
            chunk_tokens=ingestor.settings.chunk_tokens,
            overlap_tokens=ingestor.settings.overlap_tokens,
            timings=[
                hop_timing("embed", queue_s=0, compute_s=stats.embed_s, total_s=stats.embed_s, batch_size=stats.chunks),
                hop_timing("search", queue_s=0, compute_s=stats.write_s, total_s=total, batch_size=stats.chunks),
            ],
        )

    async def _start_ingest(self, first: pb.IngestRequest) -> Ingestor:
        hop = self._hop
        collection = hop.collection(first.collection)
        embedder = hop.embedding()
        _check_embedding_dimension(embedder.dimension, collection)
        chunker = await hop.chunker(embedder.model_path)
        settings = resolve_settings(
            first.chunking.chunk_tokens, first.chunking.overlap_tokens, chunker.max_tokens
        )

        async def embed(texts: list[str]) -> np.ndarray:
            vectors = (await embedder.embed(texts)).vectors
            _check_embedding_dimension(vectors.shape[1], collection)
            return vectors

        return Ingestor(
            collection, chunker, settings, embed,
            run=hop.write, batch_size=hop.cfg.ingest_batch_size,
        )


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
        out.append(Document(doc.id, doc.text, struct_to_dict(doc.metadata)))
    return out


def _finish_timings(timings: list[common_pb2.HopTiming], began: float) -> None:
    """Stretch the "search" timing's total to the whole call as the hop saw it."""
    for t in timings:
        if t.hop == "search":
            t.total_us = int((time.perf_counter() - began) * 1e6)

