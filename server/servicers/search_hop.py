"""The search hop's core: lifecycle (collections, threads, snapshots) and the search path.

Plain Python over domain types: the servicer (``search.py``) converts wire messages in one
pass (``search_convert``) and makes one call here; this module never sees protobuf
requests. Blocking index calls run in a thread pool (searches concurrently; writes and
snapshots in one writer thread, since a collection serialises them anyway). Text queries
are embedded by the embedding hop (through ``server.upstream``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from backbone.v1 import common_pb2
from retrieval.chunking import TokenChunker, resolve_settings
from retrieval.collection import Collection, CollectionClosed
from retrieval.errors import RetrievalError
from retrieval.faiss_setup import init_worker, probe_faiss
from retrieval.ingest import Ingestor
from retrieval.backends import CollectionStore, open_store
from retrieval.manager import collection_not_found
from retrieval.types import Hit, SearchMode, SearchQuery
from router.batcher import BatchPolicy, DynamicBatcher
from server.calls import hop_timing
from server.config import Config, SearchConfig
from server.errors import InvalidArgument, Unavailable
from server.hop import HopContext
from server.upstream import Upstreams, timing_to_proto

log = logging.getLogger(__name__)

# Seconds between checks for collections whose log has grown enough to snapshot.
SNAPSHOT_CHECK_S = 1.0


class SearchCore:
    """Collections under ``search.data_dir``, their threads, snapshots and searches."""

    def __init__(self) -> None:
        self.manager: CollectionStore | None = None
        self._config: Config | None = None
        self._ctx: HopContext | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._snapshotter: asyncio.Task | None = None
        self._dense: DynamicBatcher[tuple[Collection, SearchQuery], list[Hit]] | None = None
        self._upstreams: Upstreams | None = None
        self._chunker: TokenChunker | None = None
        self._chunker_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, ctx: HopContext) -> None:
        """Open every collection (snapshot + log replay), probe FAISS, start snapshots."""
        self._ctx, self._config = ctx, ctx.config
        cfg = self.cfg
        self._readers = ThreadPoolExecutor(
            cfg.workers, "search-read", initializer=init_worker, initargs=(cfg.faiss_threads,)
        )
        self._writer = ThreadPoolExecutor(
            1, "search-write", initializer=init_worker, initargs=(cfg.faiss_build_threads,)
        )
        manager = open_store(cfg)  # [search] backend: FAISS on disk or Milvus
        await self.write(manager.load)
        await self.read(probe_faiss)
        self.manager = manager
        policy = BatchPolicy(
            max_batch_size=cfg.search_batch_max,
            max_wait_s=cfg.search_batch_wait_ms / 1000.0,
            token_budget=cfg.search_batch_max,  # every query costs 1
            max_queue=cfg.max_search_queue,
            max_queue_delay_s=cfg.max_queue_delay_ms / 1000.0,
            default_deadline_s=cfg.default_deadline_ms / 1000.0,
        )
        self._dense = DynamicBatcher(
            "search", functools.partial(_run_dense_batch, cfg.faiss_threads), policy
        )
        await self._dense.start()
        self._snapshotter = asyncio.create_task(self._snapshot_loop(), name="search-snapshots")

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

    @property
    def max_text_chars(self) -> int:
        """Longest query text accepted (the embedding hop's limit)."""
        return self._config.embedding.max_text_chars if self._config else 32768

    async def ingestor(self, collection: Collection, chunk_tokens: int, overlap_tokens: int) -> Ingestor:
        """An Ingestor for ``collection`` with the embedding model's chunker and settings."""
        embedder = self.embedding()
        _check_embedding_dimension(embedder.dimension, collection)
        chunker = await self.chunker(embedder.model_path)
        settings = resolve_settings(chunk_tokens, overlap_tokens, chunker.max_tokens)

        async def embed(texts: list[str]) -> np.ndarray:
            vectors = (await embedder.embed(texts)).vectors
            _check_embedding_dimension(vectors.shape[1], collection)
            return vectors

        return Ingestor(
            collection, chunker, settings, embed,
            run=self.write, batch_size=self.cfg.ingest_batch_size,
        )

    async def search_queries(
        self, prepared: Sequence[tuple[Collection, SearchQuery]], deadline: float | None = None
    ) -> tuple[list[list[Hit]], list[common_pb2.HopTiming]]:
        """Embed text queries (one batch), search each collection in one call.

        ``prepared`` holds validated queries (``search_convert.query_from_proto``) with
        their collection. ``deadline`` (a ``time.monotonic()`` instant): dense queries
        still queued then are dropped before compute with DEADLINE_EXCEEDED /
        DEADLINE_TOO_SHORT.
        """
        prepared = list(prepared)
        for collection, query in prepared:
            collection.check_filter_fields(query.conditions)
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
        timings.append(hop_timing(
            "search", queue_s=queue_s, compute_s=compute_s, total_s=total, batch_size=batch_size
        ))
        return results, timings


def _run_dense_batch(
    faiss_threads: int, items: list[tuple[Collection, SearchQuery]]
) -> list[list[Hit]]:
    """The batcher's work: each collection's dense queries in one ``Collection.search``."""
    init_worker(faiss_threads)  # the batcher's own thread: OpenMP settings are per thread
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
            f"the embedding model's dimension {dimension} differs from the collection's "
            f"{collection.spec.dimension}",
            reason="DIMENSION_MISMATCH",
            metadata={"expected": collection.spec.dimension, "got": dimension},
        )

