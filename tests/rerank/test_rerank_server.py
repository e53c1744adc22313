"""RerankService through a real grpc.aio server with the real default engine (bundled MiniLM)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from backbone.v1 import common_pb2
from backbone.v1 import rerank_service_pb2 as pb
from tests.rerank.conftest import error_reason

QUERY = "what is the capital of france"
DOCS = [
    "Bananas are an edible fruit produced by large herbaceous flowering plants.",
    "Paris is the capital and most populous city of France.",
    "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
]


async def test_documents_come_back_best_first_with_their_index(maxsim_stub):
    response = await maxsim_stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCS))
    indexes = [r.index for r in response.results]
    scores = [r.score for r in response.results]
    assert sorted(indexes) == [0, 1, 2] and indexes[0] == 1 and indexes[-1] == 0
    assert scores == sorted(scores, reverse=True)
    assert all(r.document == "" for r in response.results)  # not asked for
    assert response.model == "maxsim-all-MiniLM-L6-v2" and response.truncated_pairs == 0
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens
    timing = response.timings[0]
    assert timing.hop == "rerank" and timing.batch_size >= 1 and timing.total_us >= timing.compute_us


async def test_top_n_and_return_documents(maxsim_stub):
    response = await maxsim_stub.Rerank(
        pb.RerankRequest(query=QUERY, documents=DOCS, top_n=1, return_documents=True,
                         model="maxsim-all-MiniLM-L6-v2")
    )
    assert [(r.index, r.document) for r in response.results] == [(1, DOCS[1])]


async def test_over_long_pairs_are_truncated_and_reported(maxsim_stub, passages):
    long_doc = " ".join(passages[:6])  # well over the 256-token window
    response = await maxsim_stub.Rerank(
        pb.RerankRequest(query=QUERY, documents=[DOCS[1], long_doc, long_doc])
    )
    assert response.truncated_pairs == 2
    assert {r.index: r.truncated for r in response.results} == {0: False, 1: True, 2: True}
    # Identical documents score identically, whatever batch each one ran in.
    by_index = {r.index: r.score for r in response.results}
    assert by_index[1] == pytest.approx(by_index[2], abs=1e-5)


async def test_reject_policy_answers_input_too_large(maxsim_stub, passages):
    long_doc = " ".join(passages[:6])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await maxsim_stub.Rerank(pb.RerankRequest(
            query=QUERY, documents=[DOCS[0], long_doc],
            truncation=common_pb2.TRUNCATION_POLICY_REJECT,
        ))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "INPUT_TOO_LARGE"


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (pb.RerankRequest(query=QUERY), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_INPUT"),
        (pb.RerankRequest(query=QUERY, documents=["d"] * 100_000),
         grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_INPUTS"),
        (pb.RerankRequest(query="", documents=DOCS), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_INPUT"),
        (pb.RerankRequest(query=QUERY, documents=DOCS, top_n=4),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOP_K"),
        (pb.RerankRequest(query=QUERY, documents=["x" * 9000]),
         grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LARGE"),
        (pb.RerankRequest(query=QUERY, documents=DOCS, model="bge-reranker-base"),
         grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    ],
    ids=["no-documents", "100k-documents", "empty-query", "top-n-too-large", "long-doc", "model"],
)
async def test_bad_input_gets_status_and_reason_while_others_are_served(
    maxsim_stub, maxsim_server, request_, code, reason
):
    hop = maxsim_server.hops[0]
    batches_before = hop._batcher._batches
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await maxsim_stub.Rerank(request_, timeout=10)
    assert info.value.code() == code
    assert error_reason(info.value) == reason
    assert hop._batcher._batches == batches_before  # refused before any model work
    healthy = await maxsim_stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCS[:1]))
    assert len(healthy.results) == 1


async def test_in_process_rerank_for_the_pipeline(maxsim_server):
    hop = maxsim_server.hops[0]
    outcome = await hop.rerank(QUERY, DOCS, 2)
    assert [r.index for r in outcome.results][0] == 1 and len(outcome.results) == 2


async def test_many_concurrent_callers_all_answered(maxsim_stub):
    requests = [pb.RerankRequest(query=f"{QUERY} {i}", documents=DOCS) for i in range(12)]
    responses = await asyncio.gather(*(maxsim_stub.Rerank(r) for r in requests))
    assert all(r.results[0].index == 1 for r in responses)
    assert max(r.timings[0].batch_size for r in responses) > 1
