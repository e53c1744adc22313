"""One collection: a point table, a FAISS index, a BM25 index, a write-ahead log and
snapshots, with thread-safe reads and durable writes.

Concurrency invariants:

* ``_write_mutex`` serialises writers and snapshots, so log order is apply order;
* the log append (and its fsync) happens under ``_write_mutex`` only, so searches keep
  running during it; applying to memory holds ``_rw`` exclusive, searches hold it shared,
  so every search sees the state between two whole writes;
* a write is acknowledged (the method returns) only after its log record is durable.

Files in the collection directory: ``collection.msgpack`` (the spec), ``wal/`` segments,
``snap-<seq>/`` snapshots (``state.msgpack``, ``vectors.npy``, ``index.faiss``).
All methods are blocking; the async servicer runs them in threads.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from retrieval import snapshot as snap
from retrieval.snapshot import dir_bytes
from retrieval.fusion import FusionDefaults, fuse
from retrieval.index import FaissIndex, exact_search, train_threshold
from retrieval.keyword import KeywordIndex
from retrieval.points import PointTable
from retrieval.rwlock import ReadWriteLock
from retrieval.types import (
    DEFAULT_CANDIDATES,
    CollectionSpec,
    Hit,
    Metric,
    Payload,
    Point,
    SearchMode,
    SearchQuery,
    StoredPoint,
    normalize_rows,
)
from retrieval.wal import WriteAheadLog

log = logging.getLogger(__name__)

SPEC_FILE = "collection.msgpack"
# Filtered/unfiltered searches over at most this many allowed rows run exactly.
EXACT_MAX_ROWS = 2048
# A snapshot compacts the table when dead rows exceed this share of all rows.
COMPACT_DEAD_FRACTION = 0.25


class CollectionClosed(RuntimeError):
    """The collection was deleted or closed while a call was using it."""


@dataclass(frozen=True)
class CollectionStats:
    """Live statistics of a collection."""

    spec: CollectionSpec
    points: int
    trained: bool
    disk_bytes: int
    nlist: int


class Collection:
    """A durable, searchable collection of points."""

    def __init__(self, directory: Path, spec: CollectionSpec, *, durable: bool = True) -> None:
        """Use :meth:`open` (or the manager); this only sets up empty state."""
        self.directory = Path(directory)
        self.spec = spec
        self._table = PointTable(spec.dimension)
        self._index = FaissIndex(spec)
        self._keyword: KeywordIndex | None = None
        self._keyword_lock = threading.Lock()
        self._version = 0
        # The public version starts at a random base per opened instance, so a collection
        # deleted and created again (or reopened) never repeats an earlier version.
        self._version_base = secrets.randbits(31) << 32
        self._rw = ReadWriteLock()
        self._write_mutex = threading.Lock()
        self._wal = WriteAheadLog(self.directory / "wal", durable=durable)
        self._snapshot_seq = 0
        self._snapshot_bytes = 0
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def open(cls, directory: Path, *, durable: bool = True) -> Collection:
        """Load the newest snapshot and replay the log after it."""
        directory = Path(directory)
        spec = CollectionSpec.from_dict(
            msgpack.unpackb((directory / SPEC_FILE).read_bytes(), raw=False)
        )
        coll = cls(directory, spec, durable=durable)
        snap.remove_leftovers(directory)
        latest = snap.latest_snapshot(directory)
        if latest is not None:
            coll._load_snapshot(*latest)
        replayed = 0
        for record in coll._wal.replay(coll._snapshot_seq):
            coll._apply(record)
            replayed += 1
        if replayed:
            log.info("collection %s: replayed %d log records", spec.name, replayed)
        return coll

    def close(self, *, snapshot: bool = False) -> None:
        """Stop taking writes (optionally snapshotting first) and close the log."""
        if snapshot and not self._closed:
            self.snapshot()
        with self._write_mutex:
            self._closed = True
            self._wal.close()

    # ---------------------------------------------------------------- writes

    def upsert(self, points: Sequence[Point]) -> int:
        """Insert or replace points durably; within one call the last point of an id wins.

        Points must already be validated (dimension, finiteness, sizes).
        """
        if not points:
            return 0
        last: dict[str, Point] = {}
        for point in points:
            last.pop(point.id, None)
            last[point.id] = point
        unique = list(last.values())
        vectors = np.stack([p.vector for p in unique]).astype(np.float32, copy=False)
        if self.spec.metric is Metric.COSINE:
            vectors = normalize_rows(vectors)
        record = {
            "op": "u",
            "ids": [p.id for p in unique],
            "vec": np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
            "texts": [p.payload.text for p in unique],
            "metas": [p.payload.metadata for p in unique],
        }
        with self._write_mutex:
            self._check_open()
            self._wal.append(record)
            self._apply(record)
        return len(unique)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete points durably; returns how many existed."""
        with self._write_mutex:
            self._check_open()
            existing = [i for i in dict.fromkeys(ids) if i in self._table.row_of]
            if not existing:
                return 0
            record = {"op": "d", "ids": existing}
            self._wal.append(record)
            self._apply(record)
            return len(existing)

    def _apply(self, record: dict[str, Any]) -> None:
        """Apply one log record to memory (exclusive against searches)."""
        with self._rw.write():
            if record["op"] == "u":
                vectors = np.frombuffer(record["vec"], dtype="<f4").reshape(
                    -1, self.spec.dimension
                )
                self._table.append(record["ids"], vectors, record["texts"], record["metas"])
                self._index_new_rows(vectors)
            elif record["op"] == "d":
                self._table.delete(record["ids"])
            self._version += 1
            if self._keyword is not None:  # kept fresh inside the write (module docstring)
                self._keyword.sync(self._table.texts, self._table.live)

    def _index_new_rows(self, vectors: np.ndarray) -> None:
        if self._index.trained:
            self._index.add(vectors)
            return
        # IVF before training: rows wait in the table (searched exactly) until enough
        # exist; then train once and add every row so that labels stay rows.
        if self._table.n_live >= train_threshold(self.spec):
            self._index.train(self._table.vectors[self._table.live_rows()])
            self._index.add(self._table.vectors)

    def _check_open(self) -> None:
        if self._closed:
            raise CollectionClosed(self.spec.name)

    # ---------------------------------------------------------------- reads

    def get(self, ids: Sequence[str], *, with_vector: bool = False) -> list[StoredPoint]:
        """Points by id in request order; unknown ids are skipped."""
        out = []
        with self._rw.read():
            table = self._table
            for point_id in ids:
                row = table.row_of.get(point_id)
                if row is None:
                    continue
                vector = table.vectors[row].copy() if with_vector else None
                out.append(StoredPoint(point_id, self._payload(row), vector))
        return out

    def check_filter_fields(self, conditions: Sequence[Any]) -> None:
        """INVALID_FILTER when a condition names a field this collection never had.

        Lock-free: the set of known fields only grows, and a membership test is atomic.
        """
        self._table.meta_index.check_fields(conditions)

    def search(self, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
        """Run queries (validated; vectors of the right dimension) against one state.

        Dense queries sharing a filter and tunables run as one batched index search.
        """
        with self._rw.read():
            for query in queries:
                self._table.meta_index.check_fields(query.conditions)
            dense = self._dense_batches(queries)
            results = []
            for i, query in enumerate(queries):
                if query.mode is SearchMode.DENSE:
                    rows, scores = dense[i]
                elif query.mode is SearchMode.KEYWORD:
                    rows, scores = self._keyword_search(query, query.k)
                else:
                    rows, scores = self._hybrid(query, dense[i])
                results.append(self._hits(query, rows, scores))
            return results

    @property
    def version(self) -> int:
        """Changes on every write (upsert, delete); caches key answers by it."""
        return self._version_base + self._version

    def stats(self) -> CollectionStats:
        """Points, training state, disk usage."""
        with self._rw.read():
            points, trained = self._table.n_live, self._index.trained
            nlist = self._index.nlist or self.spec.nlist
        return CollectionStats(self.spec, points, trained, dir_bytes(self.directory), nlist)

    def _payload(self, row: int) -> Payload:
        return Payload(self._table.texts[row], self._table.metas[row])

    def _hits(self, query: SearchQuery, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        table = self._table
        return [
            Hit(
                id=table.ids[row],
                score=float(score),
                payload=self._payload(row) if query.with_payload else None,
                vector=table.vectors[row].copy() if query.with_vector else None,
            )
            for row, score in zip(rows.tolist(), scores.tolist(), strict=True)
        ]

    def _allowed(self, conditions: tuple[Any, ...]) -> tuple[np.ndarray | None, int]:
        """Mask of rows a search may return (None: every row) and how many that is."""
        table = self._table
        if not conditions and table.n_dead == 0:
            return None, table.n_rows
        mask = table.live.copy()
        if conditions:
            mask &= table.meta_index.mask(conditions, table.n_rows)
        return mask, int(mask.sum())

    def _dense_batches(
        self, queries: Sequence[SearchQuery]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        groups: dict[Any, list[int]] = {}
        for i, query in enumerate(queries):
            if query.mode is SearchMode.KEYWORD:
                continue
            k = query.k
            if query.mode is SearchMode.HYBRID:
                k = max(query.params.candidates or DEFAULT_CANDIDATES, query.k)
            p = query.params
            # repr, not the tuple: Equals(f, True) == Equals(f, 1.0) in Python, but they
            # are different filters (booleans are not numbers).
            groups.setdefault((repr(query.conditions), k, p.nprobe, p.ef_search), []).append(i)
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for (_, k, nprobe, ef), members in groups.items():
            conditions = queries[members[0]].conditions
            vectors = np.stack([queries[i].vector for i in members]).astype(np.float32)
            if self.spec.metric is Metric.COSINE:
                vectors = normalize_rows(vectors)
            found = self._dense_search(vectors, k, conditions, nprobe, ef)
            out.update(zip(members, found, strict=True))
        return out

    def _dense_search(
        self, queries: np.ndarray, k: int, conditions: tuple[Any, ...], nprobe: int, ef: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query (rows, scores), exactly min(k, allowed rows) hits."""
        mask, n_allowed = self._allowed(conditions)
        k = min(k, n_allowed)
        if k == 0:
            empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
            return [empty] * queries.shape[0]
        if not self._index.trained or n_allowed <= EXACT_MAX_ROWS:
            return self._exact(queries, k, mask)
        scores, labels = self._index.search(
            queries, k, mask=mask, nprobe=nprobe, ef_search=ef
        )
        out = []
        for qi in range(queries.shape[0]):
            keep = labels[qi] >= 0
            if int(keep.sum()) < k:
                # The ANN walk found fewer than k allowed rows (a selective filter):
                # answer this query exactly so the contract of k hits holds.
                out.append(self._exact(queries[qi : qi + 1], k, mask)[0])
            else:
                out.append((labels[qi][keep].astype(np.int64), scores[qi][keep]))
        return out

    def _exact(
        self, queries: np.ndarray, k: int, mask: np.ndarray | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        vectors = self._table.vectors
        rows = np.flatnonzero(mask) if mask is not None else None
        subset = vectors[rows] if rows is not None else vectors
        scores, positions = exact_search(queries, subset, k, self.spec.metric)
        out = []
        for qi in range(queries.shape[0]):
            keep = positions[qi] >= 0
            pos = positions[qi][keep]
            found = rows[pos] if rows is not None else pos.astype(np.int64)
            out.append((found, scores[qi][keep]))
        return out

    def _keyword_search(self, query: SearchQuery, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._keyword_index()
        mask, n_allowed = self._allowed(query.conditions)
        if n_allowed == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        return index.search([query.text], k, mask)[0]

    def _keyword_index(self) -> KeywordIndex:
        """The BM25 index, built on the first keyword search and then kept fresh by
        every write (``_apply`` syncs it), so later searches never rebuild it."""
        with self._keyword_lock:
            if self._keyword is None:
                index = KeywordIndex(stem=self.spec.stemming)
                index.sync(self._table.texts, self._table.live)
                self._keyword = index
            return self._keyword

    def _hybrid(
        self, query: SearchQuery, dense: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        params, defaults = query.params, FusionDefaults()
        candidates = max(params.candidates or DEFAULT_CANDIDATES, query.k)
        keyword = self._keyword_search(query, candidates)
        method = params.fusion or defaults.method
        weight = defaults.weight_for(method) if params.dense_weight is None else params.dense_weight
        rows, scores = dense
        if not self.spec.metric.higher_is_closer:
            scores = -scores  # L2 distances: fusion wants higher-is-better
        return fuse(
            (rows, scores), keyword, method, weight, params.rrf_k or defaults.rrf_k, query.k
        )

    # ---------------------------------------------------------------- snapshots

    @property
    def log_bytes(self) -> int:
        """Bytes of log written since the last snapshot (roughly)."""
        return self._wal.size_bytes

    def needs_snapshot(self, min_log_bytes: int, log_ratio: float = 1.0) -> bool:
        """True when the log outgrew ``min_log_bytes`` and ``log_ratio`` x the last snapshot."""
        size = self._wal.size_bytes
        return (
            not self._closed
            and size >= min_log_bytes
            and size >= log_ratio * self._snapshot_bytes
        )

    def snapshot(self) -> bool:
        """Write a snapshot of the current state and drop the log it covers.

        Blocks writers (not searches) while it runs. Returns False when nothing changed.
        """
        with self._write_mutex:
            if self._closed:
                return False
            seq = self._wal.last_seq
            if seq == self._snapshot_seq:
                return False
            if self._table.n_dead > COMPACT_DEAD_FRACTION * max(1, self._table.n_rows):
                self._compact()
            path = snap.write_snapshot(self.directory, seq, self._snapshot_files())
            self._wal.rotate()
            self._wal.drop_through(seq)
            snap.remove_older_than(self.directory, seq)
            self._snapshot_seq = seq
            self._snapshot_bytes = dir_bytes(path)
            return True

    def _snapshot_files(self) -> dict[str, snap.FileWriter]:
        table = self._table

        def write_state(path: Path) -> None:
            state = {
                "format": 1,
                "ids": table.ids,
                "texts": table.texts,
                "metas": table.metas,
                "known_fields": sorted(table.meta_index.known_fields),
                "trained": self._index.trained,
            }
            with open(path, "wb") as fh:
                msgpack.pack(state, fh, use_bin_type=True)

        def write_vectors(path: Path) -> None:
            with open(path, "wb") as fh:
                np.save(fh, table.vectors)

        files: dict[str, snap.FileWriter] = {
            "state.msgpack": write_state,
            "vectors.npy": write_vectors,
        }
        if self._index.trained:
            files["index.faiss"] = self._index.write
        return files

    def _load_snapshot(self, seq: int, path: Path) -> None:
        with open(path / "state.msgpack", "rb") as fh:
            state = msgpack.unpack(fh, raw=False)
        vectors = np.load(path / "vectors.npy")
        table = PointTable(self.spec.dimension)
        ids: list[str | None] = state["ids"]
        # Rebuild rows in order, runs of live rows at once, so row numbers match labels.
        start = 0
        while start < len(ids):
            alive = ids[start] is not None
            end = start
            while end < len(ids) and (ids[end] is not None) == alive:
                end += 1
            if alive:
                table.append(
                    ids[start:end], vectors[start:end],
                    state["texts"][start:end], state["metas"][start:end],
                )
            else:
                table.append_dead(vectors[start:end])
            start = end
        table.meta_index.add_known_fields(state["known_fields"])
        self._table = table
        index_path = path / "index.faiss"
        if index_path.exists():
            self._index = FaissIndex.read(self.spec, index_path)
        if self._index.ntotal != (table.n_rows if self._index.trained else 0):
            log.warning("collection %s: index does not match the table; rebuilding", self.spec.name)
            self._rebuild_index()
        self._snapshot_seq = seq
        self._snapshot_bytes = dir_bytes(path)

    def _compact(self) -> None:
        """Drop dead rows and rebuild the index over the live ones (renumbers rows)."""
        with self._rw.write():
            old = self._table
            rows = old.live_rows()
            table = PointTable(self.spec.dimension)
            table.meta_index.add_known_fields(old.meta_index.known_fields)
            row_list = rows.tolist()
            table.append(
                [old.ids[r] for r in row_list],
                old.vectors[rows],
                [old.texts[r] for r in row_list],
                [old.metas[r] for r in row_list],
            )
            self._table = table
            self._rebuild_index()
            self._version += 1
            if self._keyword is not None:  # compaction keeps live rows in order
                old_to_new = np.full(old.n_rows, -1, dtype=np.int64)
                old_to_new[rows] = np.arange(rows.shape[0], dtype=np.int64)
                self._keyword.remap(old_to_new, table.n_rows)

    def _rebuild_index(self) -> None:
        self._index = FaissIndex(self.spec)
        table = self._table
        if self._index.trained:
            self._index.add(table.vectors)
        elif table.n_live >= train_threshold(self.spec):
            self._index.train(table.vectors[table.live_rows()])
            self._index.add(table.vectors)
