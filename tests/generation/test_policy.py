"""The generation core's policy without an engine: validation, context fitting,
admission, model specs and selection, and slot release on every path.

A scripted generator (gated by asyncio.Events) stands in for the engine here: these
tests make claims about the policy only; the engine itself is tested in
test_engine_conformance.py and through the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import pytest

from server.config import load_config
from server.engines import registry
from server.engines.generator import (
    AdmissionGate,
    ChatTurn,
    GenerationFinal,
    GenerationParams,
    GenerationRequest,
    ModelLimits,
    ModelRegistry,
    ModelSpec,
    ServedModel,
    TokenDelta,
    fit_to_context,
    model_specs,
    validate_request,
)
from server.errors import InvalidArgument, NotFound, Overloaded, Unavailable
from tests.generation.conftest import ENGINE_FIXTURES

LIMITS = ModelLimits(max_tokens_cap=64, max_context_tokens=128, max_prompt_chars=100)


def reason_of(request: GenerationRequest) -> tuple[str, str] | None:
    try:
        validate_request(request, LIMITS)
    except InvalidArgument as err:
        return err.status, err.reason
    return None


def with_params(**params) -> GenerationRequest:
    return GenerationRequest("r", prompt="hi", params=GenerationParams(**params))


BAD = {
    "empty prompt": (GenerationRequest("r"), "EMPTY_INPUT"),
    "empty messages": (
        GenerationRequest("r", messages=(ChatTurn("user", ""),)), "EMPTY_INPUT"),
    "prompt and messages": (
        GenerationRequest("r", prompt="a", messages=(ChatTurn("user", "b"),)), "INVALID_INPUT"),
    "unknown role": (
        GenerationRequest("r", messages=(ChatTurn("robot", "b"),)), "INVALID_INPUT"),
    "too many messages": (
        GenerationRequest("r", messages=(ChatTurn("user", "b"),) * 257), "TOO_MANY_INPUTS"),
    "prompt too long": (GenerationRequest("r", prompt="x" * 101), "INPUT_TOO_LARGE"),
    "request id too long": (GenerationRequest("r" * 129, prompt="hi"), "INVALID_INPUT"),
    "temperature > 2": (with_params(temperature=2.5), "INVALID_SAMPLING"),
    "temperature < 0": (with_params(temperature=-0.1), "INVALID_SAMPLING"),
    "temperature NaN": (with_params(temperature=math.nan), "INVALID_SAMPLING"),
    "top_p 0": (with_params(top_p=0.0), "INVALID_SAMPLING"),
    "top_p > 1": (with_params(top_p=1.01), "INVALID_SAMPLING"),
    "top_k > 1000": (with_params(top_k=1001), "INVALID_SAMPLING"),
    "repetition 0": (with_params(repetition_penalty=0.0), "INVALID_SAMPLING"),
    "repetition inf": (with_params(repetition_penalty=math.inf), "INVALID_SAMPLING"),
    "presence -3": (with_params(presence_penalty=-3.0), "INVALID_SAMPLING"),
    "frequency 2.5": (with_params(frequency_penalty=2.5), "INVALID_SAMPLING"),
    "nine stops": (with_params(stop=("a",) * 9), "INVALID_SAMPLING"),
    "empty stop": (with_params(stop=("",)), "INVALID_SAMPLING"),
    "long stop": (with_params(stop=("x" * 129,)), "INVALID_SAMPLING"),
    "max_tokens 0": (with_params(max_tokens=0), "INVALID_SAMPLING"),
    "max_tokens over cap": (with_params(max_tokens=65), "CONTEXT_LENGTH_EXCEEDED"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_are_refused_with_their_reason(case):
    request, reason = BAD[case]
    assert reason_of(request) == ("INVALID_ARGUMENT", reason)


def test_edge_values_are_accepted():
    for request in (
        with_params(temperature=0.0, top_p=1.0, top_k=1000, max_tokens=64),
        with_params(temperature=2.0, repetition_penalty=2.0, presence_penalty=-2.0),
        with_params(stop=("x" * 128,) * 8, seed=2**64 - 1),
        GenerationRequest("r" * 128, messages=(ChatTurn("system", ""), ChatTurn("user", "x"))),
        GenerationRequest("", prompt="x" * 100),
    ):
        assert reason_of(request) is None, request


def test_fit_to_context():
    explicit = GenerationParams(max_tokens=30)
    assert fit_to_context(98, explicit, LIMITS) == 30
    assert fit_to_context(10, GenerationParams(), LIMITS) == 64  # default, capped
    assert fit_to_context(120, GenerationParams(), LIMITS) == 8  # default, shortened
    for prompt_tokens, params in ((99, explicit), (128, GenerationParams()), (500, explicit)):
        with pytest.raises(InvalidArgument) as err:
            fit_to_context(prompt_tokens, params, LIMITS)
        assert err.value.reason == "CONTEXT_LENGTH_EXCEEDED"


def test_admission_gate_refuses_fast_beyond_the_bound():
    gate = AdmissionGate(max_running=2, max_waiting=1)
    for _ in range(3):
        gate.acquire()
    assert gate.waiting == 1
    with pytest.raises(Overloaded) as err:
        gate.acquire()
    assert (err.value.status, err.value.reason) == ("RESOURCE_EXHAUSTED", "OVERLOADED")
    gate.release()
    gate.acquire()
    assert gate.in_flight == 3


def test_model_specs_default_and_extra_models():
    (only,) = model_specs(load_config().generation)
    assert only.name == "smollm2-135m-instruct" and only.engine == "vllm"

    extra = '[{"name": "short", "max_tokens_cap": 8, "max_waiting": 2}]'
    config = load_config(environ={"BACKBONE_GENERATION__EXTRA_MODELS": extra})
    default, short = model_specs(config.generation)
    assert short.limits.max_tokens_cap == 8 and short.max_waiting == 2
    # Unnamed fields default to the main section.
    assert short.limits.max_context_tokens == default.limits.max_context_tokens
    assert short.engine == default.engine

    tables = [{"name": "trt", "engine": "tensorrt_llm", "model_dir": "/m"}]
    config = load_config(overrides={"generation": {"extra_models": tables}})
    assert model_specs(config.generation)[1].engine == "tensorrt_llm"

    for bad in ('[{"name": "smollm2-135m-instruct"}]', '[{"name": "x", "engine": "tgi"}]',
                '[{"name": "x", "colour": 1}]', '[{"max_tokens_cap": 3}]'):
        config = load_config(environ={"BACKBONE_GENERATION__EXTRA_MODELS": bad})
        with pytest.raises(ValueError):
            model_specs(config.generation)


def test_every_engine_has_a_conformance_fixture():
    assert set(ENGINE_FIXTURES) == set(registry.names(registry.GENERATION))


# ---------------------------------------------------------------- the flow, scripted engine


class ScriptedGenerator:
    """Emits one delta, then waits on ``release`` before finishing; records aborts."""

    engine = "scripted"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.closed_early: list[str] = []
        self.seen_params: list[GenerationParams] = []

    def prompt_token_ids(self, prompt, messages):
        return list(range(len(prompt) or 3))

    async def generate(self, request_id, ids, params):
        self.seen_params.append(params)
        finished = False
        try:
            yield TokenDelta("a", (1,))
            self.started.set()
            await self.release.wait()
            yield TokenDelta("b", (2,))
            finished = True
            yield GenerationFinal("length", len(ids), 2)
        finally:
            if not finished:
                self.closed_early.append(request_id)

    async def abort(self, request_id):
        return False

    def num_unfinished(self):
        return 0

    def healthy(self):
        return True


def served(generator, **spec) -> ServedModel:
    model = ServedModel(ModelSpec(name="m", limits=LIMITS, **spec), generator)
    model.ready = True
    return model


async def test_stream_times_the_request_and_fills_max_tokens():
    gen = ScriptedGenerator()
    model = served(gen)
    gen.release.set()
    request = GenerationRequest("r1", prompt="hello")
    events = [e async for e in model.stream(request, time.perf_counter())]
    final = events[-1]
    assert [type(e) for e in events] == [TokenDelta, TokenDelta, GenerationFinal]
    assert final.prompt_tokens == 5 and final.completion_tokens == 2
    assert 0 < final.ttft_s <= final.total_s and final.tpot_s >= 0
    assert gen.seen_params[0].max_tokens == 64  # default, capped by the model
    assert model.gate.in_flight == 0


async def test_cancelled_stream_closes_engine_stream_and_frees_its_slot():
    gen = ScriptedGenerator()
    model = served(gen, max_running=1, max_waiting=0)
    registry = ModelRegistry([model])

    async def consume():
        stream = registry.stream(model, GenerationRequest("r2", prompt="x"), time.perf_counter())
        async with contextlib.aclosing(stream) as events:
            async for _ in events:
                pass

    task = asyncio.create_task(consume())
    await gen.started.wait()
    assert model.gate.in_flight == 1 and "r2" in registry.running
    # The one slot is taken: the next request is refused at once.
    with pytest.raises(Overloaded):
        await anext(model.stream(GenerationRequest("r3", prompt="x"), time.perf_counter()))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gen.closed_early == ["r2"]
    assert model.gate.in_flight == 0 and not registry.running


async def test_registry_selection_duplicates_and_abort():
    gen = ScriptedGenerator()
    first, second = served(gen), ServedModel(ModelSpec(name="other"), gen)
    registry = ModelRegistry([first, second])
    assert registry.resolve("") is first and registry.resolve("auto") is first
    assert registry.resolve("other") is second
    with pytest.raises(NotFound) as err:
        registry.resolve("gpt-5")
    assert err.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(NotFound) as err:
        await registry.abort("nothing-running")
    assert err.value.reason == "REQUEST_NOT_FOUND"
    with pytest.raises(InvalidArgument) as err:
        await registry.abort("")
    assert err.value.reason == "EMPTY_INPUT"

    stream = registry.stream(first, GenerationRequest("dup", prompt="x"), time.perf_counter())
    await anext(stream)
    with pytest.raises(InvalidArgument):
        await anext(registry.stream(first, GenerationRequest("dup", prompt="y"), 0.0))
    await stream.aclose()
    assert not registry.running


async def test_not_ready_model_is_unavailable():
    model = ServedModel(ModelSpec(name="m"), ScriptedGenerator())
    with pytest.raises(Unavailable):
        await anext(model.stream(GenerationRequest("r", prompt="x"), 0.0))


async def test_closing_a_suspended_stream_closes_the_engine_stream_at_once():
    # The shape of a client that vanishes while its server task waits in gRPC's send:
    # the handler's generator is suspended at a yield and gets closed (not cancelled).
    gen = ScriptedGenerator()
    model = served(gen)
    registry = ModelRegistry([model])
    stream = registry.stream(model, GenerationRequest("r4", prompt="x"), time.perf_counter())
    assert isinstance(await anext(stream), TokenDelta)
    await stream.aclose()
    assert gen.closed_early == ["r4"]
    assert model.gate.in_flight == 0 and not registry.running
