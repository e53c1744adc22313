"""GenerationService through a real grpc.aio server around the session's vLLM engine."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from backbone.v1 import generation_service_pb2 as pb
from backbone.v1 import generation_service_pb2_grpc
from server.servicers.generation import GenerationHop
from tests.conftest import REPO, make_config, running
from tests.generation.conftest import (
    DEFAULT_MODEL,
    TEST_ENGINE,
    CountingGenerator,
    collect,
    error_reason,
    stream_text,
    wait_engine_idle,
)

pytestmark = pytest.mark.generation

QUESTIONS = ("Why is the sky blue?", "Write a haiku about rain.")
RAW_PROMPTS = ("The capital of France is", "def fibonacci(n):")


def chat(text: str) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user", content=text)]


def greedy(max_tokens: int = 24) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, seed=0, max_tokens=max_tokens)


async def in_process(generator, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    """vLLM's own output for ``prompt`` (vLLM tokenises it), greedy."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, seed=0, max_tokens=max_tokens)
    final = None
    async for out in generator.llm.generate(prompt, params, f"ref-{uuid.uuid4().hex}"):
        final = out
    return final.outputs[0].text, list(final.outputs[0].token_ids)


async def test_greedy_output_through_the_server_equals_in_process_vllm(stub, vllm_generator):
    tokenizer = vllm_generator.llm.get_tokenizer()
    cases = [(pb.GenerateRequest(prompt=p, sampling=greedy()), p) for p in RAW_PROMPTS]
    for question in QUESTIONS:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        cases.append((pb.GenerateRequest(messages=chat(question), sampling=greedy()), rendered))
    for request, reference_prompt in cases:
        messages, final = await collect(stub.Generate(request))
        served = stream_text(messages)
        expected = await in_process(vllm_generator, reference_prompt, 24)
        assert served == expected, reference_prompt
        assert final.usage.completion_tokens == len(expected[1])


async def test_final_message_carries_usage_timings_and_ids(stub, vllm_generator):
    request = pb.GenerateRequest(
        messages=chat(QUESTIONS[0]), sampling=greedy(16), request_id="my-request-1"
    )
    messages, final = await collect(stub.Generate(request))
    assert {m.request_id for m in messages} == {"my-request-1"}
    text, ids = stream_text(messages)
    count = await stub.CountTokens(pb.CountTokensRequest(messages=chat(QUESTIONS[0])))
    assert final.usage.prompt_tokens == count.tokens > 10
    assert final.usage.completion_tokens == len(ids) == 16
    assert final.usage.total_tokens == final.usage.prompt_tokens + 16
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.model == DEFAULT_MODEL
    (timing,) = final.timings
    assert timing.hop == "generate" and timing.batch_size >= 1
    assert 0 < final.time_to_first_token_us < timing.total_us
    assert final.time_per_output_token_us > 0
    assert timing.compute_us > 0
    # Without a caller id the server assigns one, the same in every message.
    messages, _ = await collect(stub.Generate(pb.GenerateRequest(prompt="Hi", sampling=greedy(3))))
    ids = {m.request_id for m in messages}
    assert len(ids) == 1 and ids.pop()


async def test_list_models_and_count_tokens(stub, vllm_generator):
    (model,) = (await stub.ListModels(pb.ListModelsRequest())).models
    assert (model.name, model.engine, model.default, model.ready) == (DEFAULT_MODEL, "vllm", True, True)
    assert (model.max_context_tokens, model.max_tokens_cap) == (2048, 1024)
    count = await stub.CountTokens(pb.CountTokensRequest(prompt="Hello world"))
    assert (count.tokens, count.max_context_tokens) == (2, 2048)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CountTokens(pb.CountTokensRequest(prompt=""))
    assert error_reason(err.value) == "EMPTY_INPUT"


async def test_abort_rpc_ends_a_running_stream(stub, vllm_generator):
    call = stub.Generate(pb.GenerateRequest(
        messages=chat(QUESTIONS[0]), sampling=greedy(500), request_id="to-abort"))
    first = await call.read()
    assert first.HasField("delta")
    assert (await stub.Abort(pb.AbortRequest(request_id="to-abort"))).aborted
    rest = await read_rest(call)
    assert rest[-1].final.finish_reason == pb.FINISH_REASON_ABORT
    assert rest[-1].final.usage.completion_tokens < 500
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Abort(pb.AbortRequest(request_id="to-abort"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "REQUEST_NOT_FOUND"
    await wait_engine_idle(vllm_generator)


async def read_rest(call) -> list[pb.GenerateResponse]:
    """The remaining messages of a stream read with ``read()`` (not iterable after it)."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


def over_context_prompt() -> str:
    # ~2 tokens per repetition: well past the 2048-token context, under 65536 characters.
    return "blue sky " * 2000


BAD_INPUT = {
    "empty prompt": (pb.GenerateRequest(), "INVALID_ARGUMENT", "EMPTY_INPUT"),
    "prompt and messages": (
        pb.GenerateRequest(prompt="a", messages=chat("b")), "INVALID_ARGUMENT", "INVALID_INPUT"),
    "unknown model": (
        pb.GenerateRequest(model="gpt-9", prompt="a"), "NOT_FOUND", "MODEL_NOT_FOUND"),
    "max_tokens above the cap": (
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(max_tokens=1025)),
        "INVALID_ARGUMENT", "CONTEXT_LENGTH_EXCEEDED"),
    "max_tokens zero": (
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(max_tokens=0)),
        "INVALID_ARGUMENT", "INVALID_SAMPLING"),
    "temperature 5": (
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(temperature=5)),
        "INVALID_ARGUMENT", "INVALID_SAMPLING"),
    "top_p zero": (
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_p=0)),
        "INVALID_ARGUMENT", "INVALID_SAMPLING"),
    "top_k 5000": (
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_k=5000)),
        "INVALID_ARGUMENT", "INVALID_SAMPLING"),
    "NaN penalty": (
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(presence_penalty=float("nan"))),
        "INVALID_ARGUMENT", "INVALID_SAMPLING"),
    "nine stop strings": (
        pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(stop=["x"] * 9)),
        "INVALID_ARGUMENT", "INVALID_SAMPLING"),
    "unknown role": (
        pb.GenerateRequest(messages=[pb.ChatMessage(role="wizard", content="a")]),
        "INVALID_ARGUMENT", "INVALID_INPUT"),
    "prompt over max_prompt_chars": (
        pb.GenerateRequest(prompt="x" * 65537), "INVALID_ARGUMENT", "INPUT_TOO_LARGE"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
async def test_bad_input_is_refused_before_any_work(case, stub, gen_server):
    request, code, reason = BAD_INPUT[case]
    counting: CountingGenerator = gen_server.counting
    before = (counting.tokenize_calls, counting.generate_calls)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(request))
    assert err.value.code() == grpc.StatusCode[code]
    assert error_reason(err.value) == reason
    assert (counting.tokenize_calls, counting.generate_calls) == before


@pytest.mark.parametrize("explicit_max_tokens", [False, True])
async def test_prompt_over_the_context_is_refused_before_the_engine(
    explicit_max_tokens, stub, gen_server
):
    sampling = pb.SamplingParams(max_tokens=1000) if explicit_max_tokens else None
    prompt = over_context_prompt() if not explicit_max_tokens else "word " * 1100
    counting: CountingGenerator = gen_server.counting
    generated = counting.generate_calls
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=sampling)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "CONTEXT_LENGTH_EXCEEDED"
    assert counting.generate_calls == generated, "refused before any engine work"


async def test_full_queue_answers_overloaded_fast(vllm_generator):
    config = make_config(generation={**TEST_ENGINE, "max_running": 1, "max_waiting": 1})
    hop = GenerationHop(generators={DEFAULT_MODEL: vllm_generator})
    async with running(config, [hop]) as server, grpc.aio.insecure_channel(server.address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        long = pb.GenerateRequest(messages=chat(QUESTIONS[0]), sampling=greedy(500))
        calls = [stub.Generate(long) for _ in range(2)]
        for call in calls:
            assert (await call.read()).HasField("delta")
        gate = hop.require_registry().default.gate
        assert gate.in_flight == 2 and gate.waiting == 1
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub.Generate(long))
        assert time.perf_counter() - started < 1.0, "refused without waiting"
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(err.value) == "OVERLOADED"
        for call in calls:
            call.cancel()
    await wait_engine_idle(vllm_generator)
    assert gate.in_flight == 0


async def test_several_models_are_selected_by_name(vllm_generator):
    extra = [{"name": "smol-short", "max_tokens_cap": 8, "max_context_tokens": 512}]
    config = make_config(generation={**TEST_ENGINE, "extra_models": extra})
    # Both names share the session's one engine; each keeps its own caps.
    hop = GenerationHop(generators={DEFAULT_MODEL: vllm_generator, "smol-short": vllm_generator})
    async with running(config, [hop]) as server, grpc.aio.insecure_channel(server.address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        models = (await stub.ListModels(pb.ListModelsRequest())).models
        assert [(m.name, m.default, m.max_tokens_cap) for m in models] == [
            (DEFAULT_MODEL, True, 1024), ("smol-short", False, 8)]
        assert hop.healthy()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub.Generate(
                pb.GenerateRequest(model="smol-short", prompt="Hi", sampling=greedy(16))))
        assert error_reason(err.value) == "CONTEXT_LENGTH_EXCEEDED"
        _, final = await collect(stub.Generate(
            pb.GenerateRequest(model="smol-short", prompt="Hi", sampling=greedy(8))))
        assert final.model == "smol-short" and final.usage.completion_tokens <= 8
        _, final = await collect(stub.Generate(
            pb.GenerateRequest(model="", prompt="Hi", sampling=greedy(16))))
        assert final.model == DEFAULT_MODEL
        count = await stub.CountTokens(pb.CountTokensRequest(model="smol-short", prompt="Hi"))
        assert count.max_context_tokens == 512


async def test_cli_streams_the_answer(stub, gen_server):
    request = pb.GenerateRequest(messages=chat(QUESTIONS[0]), sampling=greedy(20))
    expected, _ = stream_text((await collect(stub.Generate(request)))[0])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BACKBONE_ADDRESS", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", "generate", QUESTIONS[0],
        "--address", gen_server.address, "--max-tokens", "20", "--temperature", "0",
        "--seed", "0", "--stats",
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert out.decode() == expected + "\n"
    assert "completion_tokens=20" in err.decode()
