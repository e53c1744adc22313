"""Conformance of every loadable ``VectorIndex`` engine (FAISS kinds on this machine)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import FaissIndex, VectorIndex, exact_search
from retrieval.types import IndexKind, Metric, make_spec

ENGINES = [
    make_spec("flat", 16, Metric.L2, IndexKind.FLAT),
    make_spec("hnsw", 16, Metric.INNER_PRODUCT, IndexKind.HNSW),
    make_spec("ivf", 16, Metric.L2, IndexKind.IVF_FLAT, nlist=4),
    make_spec("pq", 16, Metric.L2, IndexKind.IVF_PQ, nlist=4, pq_m=4),
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((12_000, 16)).astype(np.float32)


@pytest.mark.parametrize("spec", ENGINES, ids=[s.name for s in ENGINES])
def test_engine_contract(spec, data, tmp_path):
    index = FaissIndex(spec)
    assert isinstance(index, VectorIndex)
    assert index.trained is not spec.kind.needs_training
    if not index.trained:
        index.train(data)
        assert index.trained and index.nlist == 4
    index.add(data[:6000])
    index.add(data[6000:])
    assert index.ntotal == 12_000
    queries = data[:50]
    _, labels = index.search(queries, 5, nprobe=4, ef_search=64)
    if spec.kind is not IndexKind.IVF_PQ:  # PQ codes are lossy
        _, exact = exact_search(queries, data, 5, spec.metric)
        assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(labels, exact)]) >= 0.9
    # A mask restricts results to the rows it admits.
    mask = np.zeros(12_000, dtype=bool)
    mask[::7] = True
    _, masked = index.search(queries, 5, mask=mask, nprobe=4)
    assert all(m < 0 or m % 7 == 0 for m in masked.ravel())
    # Written and read back, it answers the same.
    index.write(tmp_path / "index.faiss")
    again = FaissIndex.read(spec, tmp_path / "index.faiss")
    _, labels_again = again.search(queries, 5, nprobe=4, ef_search=64)
    assert again.ntotal == 12_000 and np.array_equal(labels, labels_again)
