"""The index engine behind a collection: the ``VectorIndex`` protocol and its FAISS
implementation (flat, IVF-flat, IVF-PQ, HNSW), plus exact search over a subset of rows.

Labels are row numbers: the collection adds rows in order, so FAISS's sequential ids are
the rows (invariant: a trained index holds exactly rows ``0..ntotal-1``). Deleted and
replaced rows stay in the index and are excluded by an ID selector at search time.

When FAISS reports GPUs (a faiss-gpu build), flat and IVF indexes keep a GPU replica that
serves unfiltered searches; HNSW stays on the CPU. Only the CPU path runs on this machine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import faiss
import numpy as np

from retrieval.types import (
    DEFAULT_EF_SEARCH,
    DEFAULT_NPROBE,
    CollectionSpec,
    IndexKind,
    Metric,
)

# Points an IVF index with automatic nlist waits for before it trains.
AUTO_TRAIN_POINTS = 10_000
# FAISS wants about 39 training points per centroid.
POINTS_PER_CENTROID = 39
# Product quantisers use 8-bit codes (256 centroids per sub-quantiser).
PQ_BITS = 8


def faiss_metric(metric: Metric) -> int:
    """FAISS metric constant; cosine runs as inner product over normalised vectors."""
    return faiss.METRIC_L2 if metric is Metric.L2 else faiss.METRIC_INNER_PRODUCT


def train_threshold(spec: CollectionSpec) -> int:
    """Rows an IVF collection needs before it trains (0 for kinds without training)."""
    if not spec.kind.needs_training:
        return 0
    if spec.nlist:
        need = POINTS_PER_CENTROID * spec.nlist
    else:
        need = AUTO_TRAIN_POINTS
    if spec.kind is IndexKind.IVF_PQ:
        need = max(need, POINTS_PER_CENTROID * (1 << PQ_BITS))
    return need


def auto_nlist(n_points: int) -> int:
    """About 4*sqrt(n) lists, at most n/39 so each list trains well, at least 1."""
    return max(1, min(int(4 * math.sqrt(n_points)), n_points // POINTS_PER_CENTROID))


def exact_search(
    queries: np.ndarray, vectors: np.ndarray, k: int, metric: Metric
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest rows of ``vectors`` (positions into it) for each query."""
    k = min(k, vectors.shape[0])
    if k == 0:
        empty = np.empty((queries.shape[0], 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    return faiss.knn(queries, vectors, k, metric=faiss_metric(metric))


def selector_for(mask: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    """An ID selector admitting the rows where ``mask`` is true.

    Returns the selector and the bitmap it points into; keep both alive while searching.
    """
    bitmap = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(bitmap.shape[0], faiss.swig_ptr(bitmap)), bitmap


@runtime_checkable
class VectorIndex(Protocol):
    """What a collection needs from an index engine."""

    @property
    def trained(self) -> bool:
        """True once the index can take vectors and be searched."""

    @property
    def ntotal(self) -> int:
        """Vectors held (labels ``0..ntotal-1``)."""

    @property
    def nlist(self) -> int:
        """Inverted lists in effect (0 for non-IVF kinds or before training)."""

    def train(self, vectors: np.ndarray) -> None:
        """Train on ``vectors`` (IVF kinds); a no-op for kinds without training."""

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors; their labels continue from ``ntotal``."""

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        mask: np.ndarray | None = None,
        nprobe: int = 0,
        ef_search: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate k nearest labels (-1 for missing) restricted to ``mask`` rows."""

    def write(self, path: Path) -> None:
        """Serialise to ``path``."""


class FaissIndex:
    """A FAISS index of one kind, CPU master with an optional GPU replica."""

    def __init__(self, spec: CollectionSpec, index: faiss.Index | None = None) -> None:
        """Wrap ``index`` (a loaded one) or build an empty index for ``spec``."""
        self.spec = spec
        self._metric = faiss_metric(spec.metric)
        if index is None and not spec.kind.needs_training:
            index = self._build_untrained(spec.nlist)
        self._index: faiss.Index | None = index
        self._gpu: faiss.Index | None = None
        self._to_gpu()

    @classmethod
    def read(cls, spec: CollectionSpec, path: Path) -> FaissIndex:
        """Load an index written by :meth:`write`."""
        return cls(spec, faiss.read_index(str(path)))

    @property
    def trained(self) -> bool:
        """True once the index can take vectors and be searched."""
        return self._index is not None and self._index.is_trained

    @property
    def ntotal(self) -> int:
        """Vectors held."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def nlist(self) -> int:
        """Inverted lists in effect (0 for non-IVF kinds or before training)."""
        if self._index is None or not self.spec.kind.needs_training:
            return 0
        return int(faiss.extract_index_ivf(self._index).nlist)

    def train(self, vectors: np.ndarray) -> None:
        """Build and train the IVF index on ``vectors`` (nlist resolved now when auto)."""
        if not self.spec.kind.needs_training:
            return
        nlist = self.spec.nlist or auto_nlist(vectors.shape[0])
        index = self._build_untrained(nlist)
        index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        self._index = index
        self._to_gpu()

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors (labels continue from ``ntotal``)."""
        if not self.trained:
            raise RuntimeError("index is not trained")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._index.add(vectors)
        if self._gpu is not None:
            self._gpu.add(vectors)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        mask: np.ndarray | None = None,
        nprobe: int = 0,
        ef_search: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest labels per query; ``mask`` (over labels) restricts the candidates."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if mask is None and self._gpu is not None:
            return self._gpu.search(queries, k)
        sel, bitmap = selector_for(mask) if mask is not None else (None, None)
        params = self._params(k, sel, nprobe, ef_search)
        try:
            return self._index.search(queries, k, params=params)
        finally:
            del bitmap  # the selector points into it until the search returns

    def write(self, path: Path) -> None:
        """Serialise the CPU master to ``path``."""
        faiss.write_index(self._index, str(path))

    def _params(
        self, k: int, sel: faiss.IDSelector | None, nprobe: int, ef_search: int
    ) -> faiss.SearchParameters | None:
        kind = self.spec.kind
        if kind is IndexKind.HNSW:
            ef = max(ef_search or DEFAULT_EF_SEARCH, k)
            return faiss.SearchParametersHNSW(efSearch=ef, sel=sel) if sel else (
                faiss.SearchParametersHNSW(efSearch=ef)
            )
        if kind.needs_training:
            probe = min(nprobe or DEFAULT_NPROBE, self.nlist)
            return faiss.SearchParametersIVF(nprobe=probe, sel=sel) if sel else (
                faiss.SearchParametersIVF(nprobe=probe)
            )
        return faiss.SearchParameters(sel=sel) if sel else None

    def _build_untrained(self, nlist: int) -> faiss.Index:
        spec, d = self.spec, self.spec.dimension
        if spec.kind is IndexKind.FLAT:
            return faiss.IndexFlat(d, self._metric)
        if spec.kind is IndexKind.HNSW:
            index = faiss.IndexHNSWFlat(d, spec.hnsw_m, self._metric)
            index.hnsw.efConstruction = spec.ef_construction
            return index
        quantizer = faiss.IndexFlat(d, self._metric)
        if spec.kind is IndexKind.IVF_FLAT:
            index = faiss.IndexIVFFlat(quantizer, d, nlist, self._metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, spec.pq_m, PQ_BITS, self._metric)
        index.own_fields = True
        quantizer.this.disown()
        return index

    def _to_gpu(self) -> None:
        """Keep a GPU replica of flat/IVF indexes when FAISS sees GPUs (faiss-gpu only)."""
        self._gpu = None
        if (
            self._index is None
            or not self._index.is_trained
            or self.spec.kind is IndexKind.HNSW
            or not hasattr(faiss, "index_cpu_to_all_gpus")
            or faiss.get_num_gpus() == 0
        ):
            return
        self._gpu = faiss.index_cpu_to_all_gpus(self._index)
