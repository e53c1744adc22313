"""The semantic answer cache: its bounds and guard as policy (fake clock), its matching
with the real MiniLM embeddings (paraphrases hit, 20 near-miss pairs never do), and the
pipeline's use of it through real gRPC (a hit replays the answer fast and says so; a
write to the collection makes the next request a miss)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from backbone.v1 import generation_service_pb2 as gen_pb
from backbone.v1 import pipeline_service_pb2 as pb
from backbone.v1 import pipeline_service_pb2_grpc as pl_grpc
from backbone.v1 import rerank_service_pb2_grpc as rr_grpc
from backbone.v1 import generation_service_pb2_grpc as gen_grpc
from backbone.v1 import vector_search_service_pb2 as vs_pb
from backbone.v1 import vector_search_service_pb2_grpc as vs_grpc
from router.semantic_cache import CacheSettings, SemanticCache, lexically_compatible
from server.servicers.embedding import EmbeddingHop
from server.servicers.pipeline import PipelineHop
from server.servicers.search import SearchHop
from tests.conftest import running
from tests.pipeline.fakes import FakeGeneration, FakeRerank, HopScript, start_fake
from tests.search.conftest import search_config

GREEDY = gen_pb.SamplingParams(temperature=0.0, max_tokens=32)

PARAPHRASES = [
    ("What is the capital of France?", "what's the capital city of France"),
    ("How long does the Moon take to orbit the Earth?", "how long does it take the moon to orbit earth"),
    ("Who wrote Hamlet?", "who wrote the play Hamlet?"),
]

# (stored question, near miss): an entity, a number or a negation differs.
NEAR_MISSES = [
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("Who wrote Hamlet?", "Who wrote Macbeth?"),
    ("What is the population of Tokyo?", "What is the population of Osaka?"),
    ("How tall is Mount Everest?", "How tall is Mount Kilimanjaro?"),
    ("When did Apple release the first iPhone?", "When did Samsung release the first Galaxy?"),
    ("What is the boiling point of water?", "What is the boiling point of ethanol?"),
    ("How many moons does Jupiter have?", "How many moons does Saturn have?"),
    ("Is coffee safe during pregnancy?", "Is coffee not safe during pregnancy?"),
    ("Can dogs eat grapes?", "Can dogs not eat grapes?"),
    ("Is it safe to drink tap water in Paris?", "Is it unsafe to drink tap water in Paris?"),
    ("Why is the sky blue?", "Why isn't the sky blue?"),
    ("Does vitamin C prevent colds?", "Does vitamin C never prevent colds?"),
    ("Should I take ibuprofen with food?", "Should I take ibuprofen without food?"),
    ("How long should I boil an egg for 5 minutes?", "How long should I boil an egg for 10 minutes?"),
    ("What happened in 1969?", "What happened in 1989?"),
    ("Is 7 a prime number?", "Is 9 a prime number?"),
    ("What is the speed limit on highways with 2 lanes?", "What is the speed limit on highways with 3 lanes?"),
    ("How do I convert 100 dollars to euros?", "How do I convert 500 dollars to euros?"),
    ("What are the side effects of taking two aspirin?", "What are the side effects of taking three aspirin?"),
    ("What was the GDP of Italy in 2020?", "What was the GDP of Italy in 2021?"),
]


# ----------------------------------------------------------------- policy, fake clock


def _vec(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def test_exact_then_semantic_lookup_within_a_partition_only():
    cache = SemanticCache(CacheSettings(threshold=0.9))
    cache.store("p1", "What is tea?", _vec(1, 0), "answer", 10)
    assert cache.lookup_exact("p1", "  what is TEA ") is not None
    assert cache.lookup_exact("p2", "what is tea") is None
    assert cache.lookup_semantic("p1", "what is tea exactly", _vec(0.99, 0.05)) is not None
    assert cache.lookup_semantic("p1", "what is tea", _vec(0.5, 0.8)) is None  # below threshold
    assert cache.lookup_semantic("p2", "what is tea", _vec(1, 0)) is None
    assert (cache.stats.exact_hits, cache.stats.semantic_hits, cache.stats.misses) == (1, 1, 2)


def test_bounded_by_entries_bytes_and_age_least_recently_used_first():
    now = [0.0]
    cache = SemanticCache(CacheSettings(max_entries=2, max_bytes=100, ttl_s=10), clock=lambda: now[0])
    cache.store("p", "a", None, "A", 10)
    cache.store("p", "b", None, "B", 10)
    assert cache.lookup_exact("p", "a") is not None  # a is now the most recent
    cache.store("p", "c", None, "C", 10)  # evicts b
    assert cache.lookup_exact("p", "b") is None and cache.lookup_exact("p", "a") is not None
    cache.store("p", "big", None, "D", 95)  # over the bytes: evicts down to fit
    assert cache.bytes <= 100 and cache.stats.evictions >= 2
    now[0] = 11.0
    assert cache.lookup_exact("p", "big") is None and len(cache) == 0  # expired
    cache.store("p", "huge", None, "E", 101)  # larger than the cache: not kept
    assert len(cache) == 0


@pytest.mark.parametrize(("a", "b"), NEAR_MISSES)
def test_the_lexical_guard_rejects_near_misses(a, b):
    assert not lexically_compatible(a, b)


@pytest.mark.parametrize(("a", "b"), PARAPHRASES)
def test_the_lexical_guard_lets_paraphrases_through(a, b):
    assert lexically_compatible(a, b)


# ----------------------------------------------------------------- real embeddings


def test_with_minilm_paraphrases_hit_and_no_near_miss_does(minilm):
    stored = [a for a, _ in PARAPHRASES] + [a for a, _ in NEAR_MISSES]
    probes = [b for _, b in PARAPHRASES] + [b for _, b in NEAR_MISSES]
    vectors = minilm.embed(stored + probes)
    cache = SemanticCache()
    for question, vector in zip(stored, vectors[: len(stored)]):
        # One partition per pair: each probe can only match its own stored question.
        cache.store(question, question, vector, question, 100)
    hits = [
        cache.lookup_semantic(a, b, v) is not None
        for a, b, v in zip(stored, probes, vectors[len(stored):])
    ]
    assert hits[: len(PARAPHRASES)] == [True] * len(PARAPHRASES)
    assert not any(hits[len(PARAPHRASES):]), "a near miss was answered from the cache"
    # The guard, not the threshold, is what stops most of them: embeddings put them close.
    assert cache.stats.guard_rejections >= 10


# ----------------------------------------------------------------- through the pipeline


@pytest.fixture
async def cached_pipeline(minilm, tmp_path):
    """Embedding, search and pipeline in one process (real MiniLM and FAISS); rerank and
    generation are fakes over gRPC."""
    script = HopScript()
    fake = await start_fake([
        (rr_grpc.add_RerankServiceServicer_to_server, FakeRerank(script)),
        (gen_grpc.add_GenerationServiceServicer_to_server, FakeGeneration(script)),
    ])
    config = search_config(tmp_path)
    from server.config import load_config

    config = load_config(overrides={
        "server": {"port": 0, "metrics_port": 0, "grace_seconds": 2},
        "search": {"data_dir": config.search.data_dir, "faiss_threads": 1, "faiss_build_threads": 1},
        "upstream": {"rerank_address": fake.address, "generation_address": fake.address},
    })
    try:
        async with running(config, [EmbeddingHop(embedder=minilm), SearchHop(), PipelineHop()]) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                search = vs_grpc.VectorSearchServiceStub(channel)
                await search.CreateCollection(vs_pb.CreateCollectionRequest(name="docs", dimension=384))
                texts = ["Paris is the capital of France.", "Berlin is the capital of Germany."]
                vectors = minilm.embed(texts)
                await search.UpsertBatch(vs_pb.UpsertBatchRequest(collection="docs", points=[
                    vs_pb.Point(id=f"d{i}", vector={"values": v.tolist()}, payload=vs_pb.Payload(text=t))
                    for i, (t, v) in enumerate(zip(texts, vectors))
                ]))
                yield pl_grpc.PipelineServiceStub(channel), search, script
    finally:
        await fake.stop()


async def _ask(stub, question: str, sampling=GREEDY, skip_cache=False):
    request = pb.AnswerRequest(
        retrieve=pb.RetrieveRequest(query=question, collection="docs", top_n=2),
        sampling=sampling, skip_cache=skip_cache,
    )
    began = time.perf_counter()
    ttft = None
    messages = []
    async for message in stub.Answer(request, timeout=30):
        if message.WhichOneof("event") == "delta" and ttft is None:
            ttft = time.perf_counter() - began
        messages.append(message)
    return messages, ttft


async def test_the_same_question_twice_is_a_hit_replayed_as_a_stream(cached_pipeline):
    stub, _, script = cached_pipeline
    first, _ = await _ask(stub, "What is the capital of France?")
    second, ttft = await _ask(stub, "What is the capital of France?")
    assert not first[-1].final.cache_hit and second[-1].final.cache_hit
    assert len(script.generations) == 1  # the second was not generated
    assert [m.WhichOneof("event") for m in second] == [m.WhichOneof("event") for m in first]
    assert list(second[0].sources.sources) == list(first[0].sources.sources)
    assert [m.delta.text for m in second[1:-1]] == [m.delta.text for m in first[1:-1]]
    assert [t.hop for t in second[-1].final.timings] == ["pipeline"]
    # Loose (a shared machine): the replay's first token comes without any hop's work.
    # The README's figure comes from perf/pipeline_bench.py.
    print(f"\ncache hit TTFT {ttft * 1000:.1f} ms (client-measured, gRPC included)")
    assert ttft < 0.1


async def test_a_paraphrase_hits_and_a_write_to_the_collection_misses(cached_pipeline):
    stub, search, script = cached_pipeline
    await _ask(stub, "What is the capital of France?")
    para, _ = await _ask(stub, "what's the capital city of France")
    assert para[-1].final.cache_hit
    assert [t.hop for t in para[-1].final.timings] == ["embed", "pipeline"]
    near, _ = await _ask(stub, "What is the capital of Germany?")
    assert not near[-1].final.cache_hit
    await search.UpsertBatch(vs_pb.UpsertBatchRequest(collection="docs", points=[
        vs_pb.Point(id="d9", vector={"values": [0.1] * 384}, payload=vs_pb.Payload(text="Madrid."))
    ]))
    after, _ = await _ask(stub, "What is the capital of France?")
    assert not after[-1].final.cache_hit
    assert len(script.generations) == 3


async def test_sampled_or_skipping_requests_never_use_the_cache(cached_pipeline):
    stub, _, script = cached_pipeline
    sampled = gen_pb.SamplingParams(temperature=0.7)
    for _ in range(2):
        messages, _ = await _ask(stub, "What is the capital of France?", sampling=sampled)
        assert not messages[-1].final.cache_hit
    await _ask(stub, "What is the capital of France?")
    skipped, _ = await _ask(stub, "What is the capital of France?", skip_cache=True)
    assert not skipped[-1].final.cache_hit
    assert len(script.generations) == 4
