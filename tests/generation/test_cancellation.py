"""200 streams cancelled at random points leave the engine clean.

Three ways to leave, mixed and concurrent: the client cancels the call after a random
number of deltas; the call's deadline (random, 10 ms to 1.5 s) runs out; a client
process holding 40 streams is killed with SIGKILL (its TCP connections just drop).
Afterwards the engine reports no unfinished request (frontend and engine core), every
admission slot is back, and a new request is served normally (same greedy output as
before the storm).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys

import grpc
import pytest

from backbone.v1 import generation_service_pb2 as pb
from tests.conftest import REPO, error_reason
from tests.generation.conftest import collect, stream_text, wait_engine_idle

pytestmark = pytest.mark.generation

CLIENT_CANCELS = 80
DEADLINES = 80
KILLED = 40
WAVE = 20
PROMPTS = (
    "Why is the sky blue?",
    "Explain photosynthesis to a child.",
    "List five fruits and their colours.",
    "Tell me a short story about a robot.",
)

# A client process: opens KILLED streams, reports once each has a token, then waits to die.
KILLED_CLIENT = """
import asyncio, sys
import grpc
from backbone.v1 import generation_service_pb2 as pb, generation_service_pb2_grpc as g

async def main(address, n):
    channel = grpc.aio.insecure_channel(address)
    stub = g.GenerationServiceStub(channel)
    calls = [stub.Generate(pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=f"Count to {i + 20}.")],
        sampling=pb.SamplingParams(max_tokens=200, temperature=0.8, seed=i))) for i in range(n)]
    for call in calls:
        await call.read()
    print("streaming", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def request(rng: random.Random) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=rng.randint(16, 128))
    if rng.random() < 0.5:
        sampling.temperature = 0.0
    else:
        sampling.seed = rng.randrange(1 << 32)
    return pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=rng.choice(PROMPTS))], sampling=sampling
    )


async def cancel_after_deltas(stub, rng: random.Random) -> str:
    call = stub.Generate(request(rng))
    wanted = rng.randint(0, 8)
    for _ in range(wanted):
        message = await call.read()
        if message is grpc.aio.EOF or message.HasField("final"):
            return "finished"
    call.cancel()
    return "cancelled"


async def run_out_of_deadline(stub, rng: random.Random) -> str:
    call = stub.Generate(request(rng), timeout=rng.uniform(0.01, 1.5))
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        # Ran out mid-stream, or refused at once because the deadline could not cover the
        # estimated time to first token (admission by deadline): either way nothing may be
        # left running in the engine.
        assert err.code() in (
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED
        ), err
        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert error_reason(err) == "OVERLOADED"
        return "deadline"
    return "finished"


async def killed_client(address: str, rng: random.Random) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_CLIENT, address, str(KILLED),
        cwd=REPO, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line.strip() == b"streaming"
        await asyncio.sleep(rng.uniform(0.0, 1.0))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    return "killed"


async def test_200_random_cancellations_leave_the_engine_clean(stub, gen_server, vllm_generator):
    rng = random.Random(20240605)
    probe = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=PROMPTS[0])],
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=24),
    )
    before = stream_text((await collect(stub.Generate(probe)))[0])

    jobs = [cancel_after_deltas] * CLIENT_CANCELS + [run_out_of_deadline] * DEADLINES
    rng.shuffle(jobs)
    killer = asyncio.create_task(killed_client(gen_server.address, rng))
    outcomes: list[str] = []
    for start in range(0, len(jobs), WAVE):
        wave = [job(stub, rng) for job in jobs[start : start + WAVE]]
        outcomes += await asyncio.gather(*wave)
    outcomes.append(await killer)
    assert len(outcomes) + KILLED - 1 == 200
    assert outcomes.count("cancelled") > CLIENT_CANCELS // 2
    assert outcomes.count("deadline") > DEADLINES // 4

    # Leaked sequences would still be decoding for tens of seconds; aborted ones are gone
    # within a scheduler step or two.
    await wait_engine_idle(vllm_generator, timeout=5)
    model = gen_server.hop.require_registry().default
    assert model.gate.in_flight == 0
    assert not gen_server.hop.require_registry().running
    assert gen_server.hop.healthy()

    after_messages, final = await collect(stub.Generate(probe))
    assert stream_text(after_messages) == before
    assert final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    await wait_engine_idle(vllm_generator)


async def test_a_stream_closed_after_its_final_sends_the_engine_no_abort(vllm_generator, monkeypatch):
    # Closing vLLM's generator before it returns aborts the request in the engine core
    # (an IPC round trip), needless once it finished; an early close still aborts.
    from server.engines.generator import ChatTurn, GenerationFinal, GenerationParams

    llm = vllm_generator.llm
    aborted: list[str] = []
    real_abort = llm.abort

    async def counting(request_id, *args, **kwargs):
        aborted.append(request_id)
        return await real_abort(request_id, *args, **kwargs)

    monkeypatch.setattr(llm, "abort", counting)
    ids = vllm_generator.prompt_token_ids("", (ChatTurn("user", PROMPTS[0]),))
    stream = vllm_generator.generate("finished-one", ids, GenerationParams(temperature=0.0, max_tokens=4))
    async for event in stream:
        if isinstance(event, GenerationFinal):
            break
    await stream.aclose()
    assert aborted == []
    stream = vllm_generator.generate("left-early", ids, GenerationParams(temperature=0.0, max_tokens=64))
    await anext(stream)
    await stream.aclose()
    assert "left-early" in aborted
    await wait_engine_idle(vllm_generator, timeout=5)
