"""FAISS process setup: per-thread OpenMP thread counts and a start-up probe.

OpenMP settings are per thread, so every thread that calls FAISS (reader and writer pools,
the dense batcher's thread) runs :func:`init_worker` first.
"""

from __future__ import annotations

import os

import numpy as np


def init_worker(faiss_threads: int) -> None:
    """Set this thread's OpenMP thread count (0: every core); the setting is per thread."""
    import faiss

    faiss.omp_set_num_threads(faiss_threads if faiss_threads > 0 else os.cpu_count() or 1)


def probe_faiss() -> None:
    """Build a tiny index and check that it finds its own vector (FAISS works here)."""
    import faiss

    vectors = np.eye(4, dtype=np.float32)
    index = faiss.IndexFlatIP(4)
    index.add(vectors)
    _, labels = index.search(vectors[2:3], 1)
    if int(labels[0, 0]) != 2:
        raise RuntimeError("FAISS probe failed")
