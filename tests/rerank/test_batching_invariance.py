"""Scores through the server equal in-process scores of the same pairs, whatever the batch.

Many concurrent callers send mixed-length requests (some pairs truncated) to a real server;
the batcher packs their items together however it likes. Every score must equal, to 1e-5:
- for both engines, the same pairs scored in-process one item at a time (no padding at all);
- for the cross-encoder, ``CrossEncoder.predict`` on the same pairs;
- for the default engine, an independent reference built from sentence-transformers'
  public ``encode`` (sentence embedding cosine + MeanMaxSim over content token embeddings).
"""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
import pytest

from backbone.v1 import rerank_service_pb2 as pb
from backbone.v1 import rerank_service_pb2_grpc as pb_grpc
from server.engines.reranker import score_in_process
from server.servicers.rerank import RerankHop
from tests.conftest import make_config, running

TOLERANCE = 1e-5
QUERIES = [
    "what is the capital of france",
    "how long does it take to boil an egg",
    "symptoms of vitamin d deficiency",
    "define photosynthesis",
]


def make_requests(passages: list[str], count: int, seed: int) -> list[tuple[str, list[str]]]:
    """Mixed requests: 1 to 6 documents cut at varied lengths, some over the window."""
    rng = random.Random(seed)
    long_doc = " ".join(passages[:6])
    requests = []
    for _ in range(count):
        query = rng.choice(QUERIES)
        if rng.random() < 0.1:
            query = " ".join([query] * 40)  # over half the window: the query is cut too
        docs = [rng.choice(passages)[: rng.choice([30, 120, 400, 2000])]
                for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.25:
            docs.insert(rng.randrange(len(docs) + 1), long_doc)
        requests.append((query, docs))
    return requests


async def serve_and_collect(engine, requests, **batching):
    """Send every request concurrently to a fresh server; the responses in order."""
    config = make_config(rerank={"max_batch_size": 16, "max_wait_ms": 5, "max_queue_delay_ms": 0, **batching})
    async with running(config, [RerankHop(engine=engine)]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.RerankServiceStub(channel)
            return await asyncio.gather(*(
                stub.Rerank(pb.RerankRequest(query=q, documents=d), timeout=300)
                for q, d in requests
            ))


def scores_by_index(response) -> np.ndarray:
    out = np.full(len(response.results), np.nan)
    for r in response.results:
        out[r.index] = r.score
    return out


@pytest.fixture(scope="module", params=["maxsim", "cross_encoder"])
def engine_name(request):
    return request.param


@pytest.fixture(scope="module")
def engine(engine_name, request):
    return request.getfixturevalue(f"{engine_name}_engine")


@pytest.fixture(scope="module")
async def served_maxsim(maxsim_engine, passages):
    """24 concurrent mixed requests through a default-engine server: (requests, responses)."""
    requests = make_requests(passages, count=24, seed=11)
    return requests, await serve_and_collect(maxsim_engine, requests)


@pytest.fixture(scope="module")
async def served_cross_encoder(cross_encoder_engine, passages):
    """The same through a cross-encoder server."""
    requests = make_requests(passages, count=24, seed=11)
    return requests, await serve_and_collect(cross_encoder_engine, requests)


@pytest.fixture(scope="module")
def served(engine_name, request):
    return request.getfixturevalue(f"served_{engine_name}")


async def test_concurrent_callers_were_batched_together(served):
    requests, responses = served
    assert len(responses) == len(requests)
    assert max(r.timings[0].batch_size for r in responses) > 1
    assert sum(r.truncated_pairs for r in responses) > 0  # the policy was exercised


async def test_server_scores_equal_one_item_at_a_time_in_process(served, engine):
    requests, responses = served
    for (query, docs), response in zip(requests, responses):
        got = scores_by_index(response)
        want = np.array(await asyncio.to_thread(score_in_process, engine, query, docs, 1))
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


async def test_scores_do_not_depend_on_batch_limits(engine, passages):
    """The same requests under other batch sizes and token budgets score the same."""
    requests = make_requests(passages, count=8, seed=5)
    wide = await serve_and_collect(engine, requests, max_batch_size=64)
    narrow = await serve_and_collect(engine, requests, max_batch_size=2, token_budget=300)
    assert max(r.timings[0].batch_size for r in wide) > 2
    assert max(r.timings[0].batch_size for r in narrow) <= 2
    for a, b in zip(wide, narrow):
        np.testing.assert_allclose(scores_by_index(a), scores_by_index(b), rtol=0, atol=TOLERANCE)


async def test_cross_encoder_equals_crossencoder_predict(served_cross_encoder, tiny_cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(tiny_cross_encoder_dir), device="cpu", local_files_only=True)
    requests, responses = served_cross_encoder
    pairs, got = [], []
    for (query, docs), response in zip(requests, responses):
        for r in response.results:
            if not r.truncated:  # over-long pairs follow our policy, not predict's
                pairs.append((query, docs[r.index]))
                got.append(r.score)
    assert len(pairs) > 50
    want = await asyncio.to_thread(model.predict, pairs, batch_size=7)
    assert np.std(want) > 1e-3  # the tiny model does tell documents apart
    np.testing.assert_allclose(np.array(got), want, rtol=0, atol=TOLERANCE)


async def test_default_engine_equals_a_sentence_transformers_reference(served_maxsim):
    from sentence_transformers import SentenceTransformer

    from server.engines.embedder import bundled_model_path

    model = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)

    def unit(x):
        x = np.asarray(x, dtype=np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def reference(query: str, doc: str) -> float:
        pooled = model.encode([query, doc], normalize_embeddings=True)
        q_tok, d_tok = (unit(t)[1:-1] for t in model.encode([query, doc], output_value="token_embeddings"))
        return float(pooled[0] @ pooled[1]) + float((q_tok @ d_tok.T).max(axis=1).mean())

    requests, responses = served_maxsim
    checked = 0
    for (query, docs), response in zip(requests, responses):
        for r in response.results:
            if not r.truncated and docs[r.index] and checked < 40:
                want = await asyncio.to_thread(reference, query, docs[r.index])
                assert r.score == pytest.approx(want, abs=TOLERANCE)
                checked += 1
    assert checked == 40


async def test_document_cache_changes_no_score(passages):
    """With the cache on, a document seen before costs no model time and scores the same."""
    from server.engines.maxsim_reranker import MaxSimReranker

    cached = MaxSimReranker(cache_bytes=64 << 20)
    docs = passages[:5]
    first = score_in_process(cached, QUERIES[0], docs)
    again = cached.prepare(QUERIES[1], docs)
    assert len(again.items) == 1  # only the query goes to the model
    second = score_in_process(cached, QUERIES[1], docs)
    uncached = MaxSimReranker(cache_bytes=0)
    np.testing.assert_allclose(first, score_in_process(uncached, QUERIES[0], docs, 5), atol=TOLERANCE)
    np.testing.assert_allclose(second, score_in_process(uncached, QUERIES[1], docs, 5), atol=TOLERANCE)
    assert cached.cache.hits >= 5
