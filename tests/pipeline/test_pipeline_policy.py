"""PipelineService policy over fake hops (real gRPC both ways): the order of the hops,
sources with both scores, the Answer stream, prompt packing, the deadline budget and
upstream statuses kept."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import json_format

from backbone.v1 import generation_service_pb2 as gen_pb
from backbone.v1 import pipeline_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2 as vs_pb
from router.prompt_packing import DEFAULT_SYSTEM_PROMPT
from tests.conftest import error_reason
from tests.pipeline.fakes import DIM, count_tokens, passage
from tests.pipeline.test_upstream import retry_delay_s

S = grpc.StatusCode


def retrieve(query="what is green tea", **kw) -> pb.RetrieveRequest:
    return pb.RetrieveRequest(query=query, collection="docs", **kw)


async def answer(stub, request: pb.AnswerRequest, timeout: float = 10):
    return [m async for m in stub.Answer(request, timeout=timeout)]


async def test_retrieve_embeds_searches_and_reranks(split):
    response = await split.stub.Retrieve(retrieve(search_top_k=8, top_n=3), timeout=10)
    # Dense: the pipeline embedded the query and searched by vector.
    [search] = split.hops.searches
    assert search.WhichOneof("query") == "vector" and len(search.vector.values) == DIM
    assert search.top_k == 8 and search.with_payload
    [rerank] = split.hops.reranks
    assert list(rerank.documents) == [passage(i) for i in range(8)] and rerank.top_n == 3
    # The fake reranker reverses the order: p7, p6, p5, with both scores and metadata.
    assert [s.id for s in response.sources] == ["p7", "p6", "p5"]
    top = response.sources[0]
    assert top.text == passage(7) and top.rerank_score == 7.0
    assert top.search_score == pytest.approx(0.93)
    assert json_format.MessageToDict(top.metadata) == {"rank": 7, "source": "fake"}
    assert [t.hop for t in response.timings] == ["embed", "search", "rerank", "pipeline"]
    assert not response.degradations


async def test_skip_rerank_keeps_search_order(split):
    response = await split.stub.Retrieve(retrieve(top_n=2, skip_rerank=True), timeout=10)
    assert [s.id for s in response.sources] == ["p0", "p1"]
    assert all(s.rerank_score == 0 for s in response.sources)
    assert not split.hops.reranks
    assert split.hops.searches[0].top_k == 50  # the default candidates


async def test_keyword_mode_searches_by_text_without_embedding(split):
    flt = vs_pb.Filter(must=[vs_pb.Condition(field="lang", equals={"string_value": "en"})])
    await split.stub.Retrieve(retrieve(mode=vs_pb.SEARCH_MODE_KEYWORD, filter=flt), timeout=10)
    [search] = split.hops.searches
    assert search.text == "what is green tea" and search.mode == vs_pb.SEARCH_MODE_KEYWORD
    assert search.filter == flt
    assert not split.embed.time_remaining  # no embed call


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (retrieve(query=""), "EMPTY_INPUT"),
        (retrieve(search_top_k=1001), "INVALID_TOP_K"),
        (retrieve(search_top_k=5, top_n=6), "INVALID_TOP_K"),
        (pb.RetrieveRequest(query="q"), "EMPTY_INPUT"),
    ],
)
async def test_bad_requests_are_refused_before_any_hop(split, request_, reason):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await split.stub.Retrieve(request_, timeout=10)
    assert info.value.code() == S.INVALID_ARGUMENT and error_reason(info.value) == reason
    assert not split.hops.searches and not split.embed.time_remaining


async def test_answer_streams_sources_deltas_and_a_final(split):
    request = pb.AnswerRequest(
        retrieve=retrieve(search_top_k=6, top_n=3), model="auto",
        sampling=gen_pb.SamplingParams(temperature=0.0, max_tokens=64),
        history=[gen_pb.ChatMessage(role="user", content="hi"),
                 gen_pb.ChatMessage(role="assistant", content="hello")],
    )
    messages = await answer(split.stub, request)
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds == ["sources", "delta", "delta", "delta", "final"]
    retrieved = await split.stub.Retrieve(retrieve(search_top_k=6, top_n=3), timeout=10)
    assert list(messages[0].sources.sources) == list(retrieved.sources)
    assert "".join(m.delta.text for m in messages[1:-1]) == "Green tea is unoxidised [1]."
    final = messages[-1].final
    assert final.finish_reason == gen_pb.FINISH_REASON_STOP
    assert final.model == "fake-small"  # "auto" passed through; the hop's choice reported
    assert [t.hop for t in final.timings] == ["embed", "search", "rerank", "generate", "pipeline"]
    assert final.usage.completion_tokens == 3 and final.sources_used == 3
    assert not final.cache_hit and not final.degradations
    # The prompt: the default system prompt with the sources numbered in rank order,
    # the history, then the question; model and sampling passed through.
    gen = split.hops.generations[0]
    assert gen.model == "auto" and gen.sampling.max_tokens == 64
    roles = [m.role for m in gen.messages]
    assert roles == ["system", "user", "assistant", "user"]
    system = gen.messages[0].content
    assert system.startswith(DEFAULT_SYSTEM_PROMPT)
    assert system.index(f"[1] {passage(5)}") < system.index(f"[2] {passage(4)}") < system.index(f"[3] {passage(3)}")
    assert gen.messages[-1].content == "what is green tea"


async def test_sources_are_cut_or_dropped_to_fit_the_window(split):
    # 64 output tokens kept back; a window that holds about two and a half passages.
    split.hops.max_context_tokens = 64 + 40 + 2 * 22 + 30
    request = pb.AnswerRequest(
        retrieve=retrieve(top_n=5, skip_rerank=True),
        sampling=gen_pb.SamplingParams(max_tokens=64), system_prompt="Cite [n].",
    )
    messages = await answer(split.stub, request)
    final = messages[-1].final
    assert len(messages[0].sources.sources) == 5  # the sources message is Retrieve's
    gen = split.hops.generations[0]
    assert count_tokens(gen.messages) <= split.hops.max_context_tokens - 64
    assert 1 <= final.sources_used < 5
    system = gen.messages[0].content
    assert f"[{final.sources_used + 1}]" not in system
    assert any(d.startswith("sources_dropped") for d in final.degradations)


async def test_a_deadline_too_short_for_rerank_skips_it_and_says_so(split):
    split.hops.rerank_delay_s = 2.0  # would blow the deadline if it ran
    began = time.monotonic()
    response = await split.stub.Retrieve(retrieve(search_top_k=50, top_n=3), timeout=0.4)
    assert time.monotonic() - began < 0.4
    assert not split.hops.reranks
    assert response.degradations == ["rerank_skipped: deadline"]
    assert [s.id for s in response.sources] == ["p0", "p1", "p2"]


async def test_a_deadline_too_short_for_anything_is_refused_at_once(split):
    began = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await answer(split.stub, pb.AnswerRequest(retrieve=retrieve()), timeout=0.5)
    assert time.monotonic() - began < 0.3
    assert info.value.code() == S.DEADLINE_EXCEEDED
    assert error_reason(info.value) == "DEADLINE_TOO_SHORT"
    assert not split.embed.time_remaining and not split.hops.searches


async def test_an_upstream_overload_reaches_the_caller_with_its_pushback(split):
    split.hops.rerank_failure = (S.RESOURCE_EXHAUSTED, "OVERLOADED", 0.75)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await split.stub.Retrieve(retrieve(), timeout=10)
    assert info.value.code() == S.RESOURCE_EXHAUSTED
    assert error_reason(info.value) == "OVERLOADED" and retry_delay_s(info.value) == 0.75


async def test_upstream_calls_carry_the_callers_remaining_deadline(split):
    await split.stub.Retrieve(retrieve(skip_rerank=True), timeout=3.0)
    [remaining] = split.embed.time_remaining
    assert 2.0 < remaining < 3.05
