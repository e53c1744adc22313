"""Generate through the router with the real vLLM engine: greedy output equals calling
the replica directly, and a caller that cancels through the router leaves no unfinished
request in the engine."""

from __future__ import annotations

import asyncio

import grpc

from backbone.v1 import generation_service_pb2 as pb
from backbone.v1 import generation_service_pb2_grpc
from tests.routing.conftest import router_for


def greedy_chat(question: str, tokens: int = 8) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=question)],
                              sampling=pb.SamplingParams(temperature=0.0, seed=0, max_tokens=tokens))


async def tokens_of(channel: grpc.aio.Channel, request: pb.GenerateRequest) -> tuple[list[int], str, int]:
    """Token ids, text and finish reason of one Generate stream."""
    ids, text, finish = [], [], None
    async for m in generation_service_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=120):
        if m.HasField("delta"):
            ids.extend(m.delta.token_ids)
            text.append(m.delta.text)
        else:
            finish = m.final.finish_reason
    return ids, "".join(text), finish


async def test_greedy_output_through_the_router_equals_the_replica_and_cancels_leave_nothing(gen_server):
    async with router_for({"generation": [gen_server.address]}) as (_server, routed), \
            grpc.aio.insecure_channel(gen_server.address) as direct:
        for question in ("What is the capital of France?", "Name three colours."):
            request = greedy_chat(question)
            through, own = await tokens_of(routed, request), await tokens_of(direct, request)
            assert through == own
            assert len(through[0]) == 8 and through[1]

        # callers that leave after the first token: the router cancels the replica's call,
        # which aborts the sequence in the engine
        stub = generation_service_pb2_grpc.GenerationServiceStub(routed)
        for _ in range(3):
            call = stub.Generate(greedy_chat("Tell me a long story.", 200), timeout=120)
            first = await call.read()
            assert first.HasField("delta")
            call.cancel()
        engine = gen_server.counting
        for _ in range(500):
            if engine.num_unfinished() == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.num_unfinished() == 0
