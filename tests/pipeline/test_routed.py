"""The pipeline beside the router in one process (``backbone serve router pipeline``): its
hop calls go through the router's policy in-process, one gRPC leg each. Real servers on
port 0; the replicas are the pipeline tests' fake hops."""

from __future__ import annotations

import grpc

from backbone.v1 import pipeline_service_pb2 as pb
from backbone.v1 import pipeline_service_pb2_grpc as pb_grpc
from backbone.v1 import router_service_pb2 as rpb
from backbone.v1 import router_service_pb2_grpc as rpb_grpc
from server.router.hop import RouterHop
from server.servicers.pipeline import PipelineHop
from tests.conftest import make_config, running
from tests.pipeline.fakes import EmbedScript, HopScript, start_fake_hops

HOPS = ("embedding", "search", "rerank", "generation")


def question() -> pb.AnswerRequest:
    return pb.AnswerRequest(retrieve=pb.RetrieveRequest(query="what is green tea",
                                                        collection="docs", top_n=2),
                            skip_cache=True)


async def test_answer_goes_through_the_routers_policy_and_around_a_failing_replica():
    # Two replicas of every hop; the first one's rerank answers UNAVAILABLE every time.
    scripts = [(EmbedScript(), HopScript()), (EmbedScript(), HopScript())]
    scripts[0][1].rerank_failure = (grpc.StatusCode.UNAVAILABLE, "", None)
    fakes = [await start_fake_hops(*s) for s in scripts]
    config = make_config(router={"upstreams": {h: [f.address for f in fakes] for h in HOPS},
                                 "start_wait_s": 5, "hedge": False})
    try:
        async with running(config, [PipelineHop(), RouterHop()]) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.PipelineServiceStub(channel)
                answers = 0
                while answers < 30 and len(scripts[0][1].reranks) < 2:  # until it was tried
                    answers += 1
                    messages = [m async for m in stub.Answer(question(), timeout=10)]
                    final = messages[-1].final
                    assert not final.degradations, final
                    assert "".join(m.delta.text for m in messages if m.HasField("delta"))
                    assert len(messages[0].sources.sources) == 2
                listed = await rpb_grpc.RouterServiceStub(channel).ListEndpoints(
                    rpb.ListEndpointsRequest(), timeout=5)
    finally:
        for fake in fakes:
            await fake.stop()
    calls: dict[str, int] = {}
    failures: dict[str, int] = {}
    for ep in listed.endpoints:
        calls[ep.service] = calls.get(ep.service, 0) + ep.calls
        failures[ep.service] = failures.get(ep.service, 0) + ep.failures
    # Every hop call of the Answers was an attempt of the router's replica sets.
    assert calls["backbone.v1.EmbeddingService"] == answers
    assert sum(len(s[0].time_remaining) for s in scripts) == answers
    assert calls["backbone.v1.GenerationService"] >= answers
    # The failing replica's reranks were retried on the other one (Rerank is idempotent).
    bad_reranks = len(scripts[0][1].reranks)
    assert bad_reranks == 2, "the failing replica was picked"
    assert calls["backbone.v1.RerankService"] == answers + bad_reranks
    assert failures["backbone.v1.RerankService"] == bad_reranks
    assert len(scripts[1][1].reranks) == answers
