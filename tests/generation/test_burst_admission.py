"""Admission by time to first token in front of the real vLLM engine, under a burst.

The session's server (real grpc.aio on port 0, real SmolLM2 on vLLM, ``max_running`` 32):
64 concurrent streams with 30 s deadlines are all served - half run, half wait in vLLM's
queue - and a stream that arrives while they are in flight with a deadline shorter than
its estimated time to first token is refused at once (RESOURCE_EXHAUSTED/OVERLOADED with
a RetryInfo), not after its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import time

import grpc
import pytest

from backbone.v1 import generation_service_pb2 as pb
from clients.errors import retry_after_s
from tests.generation.conftest import DEFAULT_MODEL, collect, error_reason

pytestmark = pytest.mark.generation

STREAMS = 64
QUESTIONS = (
    "Why is the sky blue?", "Name a fruit.", "What is rain?", "Say hello.",
    "Count to three.", "What is a cat?", "Give me a colour.", "What is two plus two?",
)


def request(index: int, max_tokens: int) -> pb.GenerateRequest:
    # Chat messages: a raw prompt makes SmolLM2 end at once (EOS), which would not load it.
    return pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=QUESTIONS[index % len(QUESTIONS)])],
        sampling=pb.SamplingParams(temperature=0.0, seed=0, max_tokens=max_tokens),
    )


async def served(stub, index: int, max_tokens: int) -> str:
    """One stream with a 30 s deadline; its outcome ("OK" or status/reason)."""
    try:
        _, final = await collect(stub.Generate(request(index, max_tokens), timeout=30.0))
    except grpc.aio.AioRpcError as err:
        return f"{err.code().name}/{error_reason(err)}"
    assert final.usage.completion_tokens >= 1
    return "OK"


async def wait_in_flight(gate, count: int, timeout: float = 30.0) -> None:
    """Until ``count`` requests hold a slot of ``gate`` (all admitted), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while gate.in_flight < count:
        assert loop.time() < deadline, f"only {gate.in_flight} of {count} admitted after {timeout}s"
        await asyncio.sleep(0.005)


@pytest.mark.slow
async def test_64_streams_with_30s_deadlines_are_all_served_and_a_short_one_is_refused_at_once(
    stub, gen_server
):
    model = gen_server.hop.require_registry().resolve(DEFAULT_MODEL)
    gate = model.gate
    # One stream alone first: the gate learns the prefill and decode rates from it.
    assert await served(stub, 0, 16) == "OK"
    assert gate.ttft.known and gate.max_running < STREAMS

    burst = [asyncio.create_task(served(stub, i, 8)) for i in range(STREAMS)]
    await wait_in_flight(gate, STREAMS)
    # Half the burst waits for a slot: a new stream's first token is that far away.
    estimate = gate.estimated_ttft_s(prompt_tokens=8)
    deadline = estimate / 3
    assert deadline > 0.02, f"estimated TTFT {estimate:.3f}s too small to test against"
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub.Generate(request(1, 16), timeout=deadline))
    elapsed = time.perf_counter() - started
    outcomes = collections.Counter(await asyncio.gather(*burst))

    err = info.value
    assert (err.code(), error_reason(err)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"), err
    assert elapsed < deadline / 2, f"refused after {elapsed * 1e3:.1f} ms, deadline {deadline * 1e3:.0f} ms"
    assert (retry_after_s(err) or 0) > 0, "the refusal says when to come back (RetryInfo)"
    assert outcomes == {"OK": STREAMS}, f"refusals or errors in the burst: {dict(outcomes)}"
