"""Rerank quality on the MS MARCO subset: the default engine against the dense order.

For each of the 50 queries, the dense top-100 (the bundled MiniLM's sentence embeddings,
exact cosine search over the 5,000 passages, computed here in-process) is reranked through
a real server with the default engine, built from the default config. nDCG@10 after reranking is computed beside the
dense order's, in this test, and must not be lower. Queries without judgements count 0
for both orders. The table is printed (run with -s) for the README.
"""

from __future__ import annotations

import asyncio
import json
import math
import os

import grpc
import numpy as np
import pytest

from backbone.v1 import rerank_service_pb2 as pb
from backbone.v1 import rerank_service_pb2_grpc as pb_grpc
from server.servicers.rerank import RerankHop
from tests.conftest import make_config, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

CANDIDATES = 100


def ndcg_at_10(ranking: list[str], grades: dict[str, int], exponential: bool) -> float:
    """nDCG@10 with gain 2^g - 1 (exponential) or g (linear) and log2(rank + 1) discounts."""
    gain = (lambda g: 2.0**g - 1.0) if exponential else float
    dcg = sum(gain(grades.get(doc, 0)) / math.log2(i + 2) for i, doc in enumerate(ranking[:10]))
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:10]
    idcg = sum(gain(g) / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0



async def test_default_engine_reranking_is_not_worse_than_dense(msmarco):
    corpus, queries, qrels = msmarco.corpus, msmarco.queries, msmarco.qrels
    assert len(corpus) == 5000 and len(queries) == 50
    top = msmarco.exact_top(CANDIDATES)  # the bundled MiniLM's dense order, in-process

    # The hop builds its engine from the default config (document cache on, as served),
    # but with no wait ceiling (4 callers of 100 passages each queue several seconds of
    # cold work on 2 cores, and this test is about quality, not admission) and on every
    # core (the served default is one torch thread, for beside vLLM: 5,000 cold passages
    # on one took ~12 min of a CI run). torch's setting is process-wide: put back after.
    import torch

    threads_before = torch.get_num_threads()
    config = make_config(rerank={"max_queue_delay_ms": 0, "threads": os.cpu_count() or 1})
    try:
        await _rerank_all(config, corpus, queries, qrels, top)
    finally:
        torch.set_num_threads(threads_before)


async def _rerank_all(config, corpus, queries, qrels, top) -> None:  # noqa: ANN001
    """Rerank every query's dense top-100 through a real server and compare nDCG@10."""
    async with running(config, [RerankHop()]) as server:
        assert server.hops[0].model_name == "maxsim-all-MiniLM-L6-v2"
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RerankServiceStub(channel)
            gate = asyncio.Semaphore(4)

            async def rerank(row: np.ndarray, query: str) -> list[int]:
                async with gate:
                    response = await stub.Rerank(pb.RerankRequest(
                        query=query, documents=[corpus[j]["text"] for j in row]), timeout=1800)
                assert len(response.results) == CANDIDATES
                return [int(row[r.index]) for r in response.results]

            reranked = await asyncio.gather(*(rerank(top[i], q["text"]) for i, q in enumerate(queries)))

    rows = []
    for name, exponential in (("nDCG@10 (gain 2^g-1)", True), ("nDCG@10 (gain g)", False)):
        dense = [ndcg_at_10([corpus[j]["_id"] for j in top[i]], qrels.get(q["_id"], {}), exponential)
                 for i, q in enumerate(queries)]
        rr = [ndcg_at_10([corpus[j]["_id"] for j in reranked[i]], qrels.get(q["_id"], {}), exponential)
              for i, q in enumerate(queries)]
        rows.append((name, float(np.mean(dense)), float(np.mean(rr)),
                     sum(b > a + 1e-12 for a, b in zip(dense, rr)),
                     sum(b < a - 1e-12 for a, b in zip(dense, rr))))
    print("\n| metric (50 queries, dense top-100) | dense order | reranked (default engine) | queries up | queries down |")
    print("|---|---|---|---|---|")
    for name, dense_mean, rr_mean, up, down in rows:
        print(f"| {name} | {dense_mean:.4f} | {rr_mean:.4f} | {up} | {down} |")
    for name, dense_mean, rr_mean, _, _ in rows:
        assert rr_mean >= dense_mean, f"{name}: reranked {rr_mean:.4f} < dense {dense_mean:.4f}"
