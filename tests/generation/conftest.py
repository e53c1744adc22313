"""Fixtures of the generation tests: ONE real vLLM engine per session over the bundled
SmolLM2-135M-Instruct, shared by the engine conformance tests, the in-process
reference and every server (real grpc.aio servers on port 0 around ``GenerationHop``).

Engines are parametrized over every engine the project has; an engine whose import or
hardware check fails is skipped with its reason (TensorRT-LLM here: no GPU), so a GPU
host runs the same tests for TensorRT-LLM and CUDA vLLM.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from backbone.v1 import generation_service_pb2 as pb
from backbone.v1 import generation_service_pb2_grpc
from server.config import load_config
from server.engines.generator import (
    ChatTurn,
    GenerationEvent,
    GenerationParams,
    ModelSpec,
    model_specs,
)
from server.engines import registry
from server.servicers.generation import GenerationHop
from tests.conftest import error_reason, make_config, running

DEFAULT_MODEL = "smollm2-135m-instruct"
# A small KV cache and batch: plenty for the tests, modest memory.
TEST_ENGINE = {"kv_cache_gib": 1.0, "max_running": 32}



def engine_spec(engine: str) -> ModelSpec:
    """The default model's spec from the default config, on ``engine``."""
    config = load_config(overrides={"generation": {**TEST_ENGINE, "engine": engine}})
    return model_specs(config.generation)[0]


# Package scope: one engine for every generation test, stopped when they are done so its
# worker's memory and spinning threads do not weigh on the rest of the suite.
@pytest.fixture(scope="package")
async def vllm_generator():
    """The one vLLM engine of the generation tests (started once, stopped after them)."""
    reason = registry.unavailable_reason(registry.GENERATION, "vllm")
    if reason:
        pytest.skip(reason)
    from server.engines.vllm_engine import VllmGenerator

    generator = VllmGenerator(engine_spec("vllm"))
    await generator.start()
    try:
        yield generator
    finally:
        await generator.stop()


@pytest.fixture(scope="package")
async def trtllm_generator():
    """TensorRT-LLM over the same model, on hosts where it loads (a GPU host)."""
    reason = registry.unavailable_reason(registry.GENERATION, "tensorrt_llm")
    if reason:
        pytest.skip(f"engine tensorrt_llm cannot load here: {reason}")
    from server.engines.trtllm_engine import TrtLlmGenerator

    generator = TrtLlmGenerator(engine_spec("tensorrt_llm"))
    await generator.start()
    try:
        yield generator
    finally:
        await generator.stop()


# Engine name -> its session fixture; a test checks that it covers every engine.
ENGINE_FIXTURES = {"vllm": "vllm_generator", "tensorrt_llm": "trtllm_generator"}


@pytest.fixture(params=sorted(ENGINE_FIXTURES))
def any_generator(request):
    """Each engine of the project that loads here; the others skip with their reason."""
    return request.getfixturevalue(ENGINE_FIXTURES[request.param])


class CountingGenerator:
    """Delegates to a real generator and counts calls, to prove that bad input was
    refused before any tokenizer or engine work."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.engine = inner.engine
        self.tokenize_calls = 0
        self.generate_calls = 0

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    def prompt_token_ids(self, prompt: str, messages: Sequence[ChatTurn]) -> list[int]:
        self.tokenize_calls += 1
        return self.inner.prompt_token_ids(prompt, messages)

    def generate(
        self, request_id: str, ids: list[int], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        self.generate_calls += 1
        return self.inner.generate(request_id, ids, params)

    async def abort(self, request_id: str) -> bool:
        return await self.inner.abort(request_id)

    def num_unfinished(self) -> int:
        return self.inner.num_unfinished()

    def healthy(self) -> bool:
        return self.inner.healthy()


@dataclasses.dataclass
class GenServer:
    """A running generation server and what the tests look into."""

    address: str
    hop: GenerationHop
    counting: CountingGenerator


@pytest.fixture(scope="package")
async def gen_server(vllm_generator):
    """A real server around the session's engine, with the default config's caps."""
    counting = CountingGenerator(vllm_generator)
    hop = GenerationHop(generators={DEFAULT_MODEL: counting})
    async with running(make_config(generation=dict(TEST_ENGINE)), [hop]) as server:
        yield GenServer(server.address, hop, counting)


@pytest.fixture
async def stub(gen_server):
    """A GenerationService stub on a fresh channel to the session server."""
    async with grpc.aio.insecure_channel(gen_server.address) as channel:
        yield generation_service_pb2_grpc.GenerationServiceStub(channel)


async def collect(call) -> tuple[list[pb.GenerateResponse], pb.GenerateFinal]:
    """Every message of a Generate stream, and its final message."""
    messages = [m async for m in call]
    assert messages and messages[-1].HasField("final"), "the stream ends with a final"
    assert all(m.HasField("delta") for m in messages[:-1]), "deltas, then one final"
    return messages, messages[-1].final


def stream_text(messages: Sequence[pb.GenerateResponse]) -> tuple[str, list[int]]:
    """Concatenated delta text and token ids."""
    text = "".join(m.delta.text for m in messages if m.HasField("delta"))
    ids = [t for m in messages if m.HasField("delta") for t in m.delta.token_ids]
    return text, ids


async def wait_engine_idle(generator, timeout: float = 10.0) -> None:
    """Wait until the engine tracks no request; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        core_busy = False
        if hasattr(generator, "engine_core_has_work"):
            core_busy = await generator.engine_core_has_work()
        if generator.num_unfinished() == 0 and not core_busy:
            return
        assert loop.time() < deadline, (
            f"engine still busy after {timeout}s: unfinished={generator.num_unfinished()} "
            f"core_has_work={core_busy}"
        )
        await asyncio.sleep(0.01)
