"""``model="auto"`` through a real server (grpc.aio on port 0): task rules, spill under
load, start-up checks, the ``backbone-route`` explanation and the explicit-model bypass.

Fake generators stand in for the engines: these tests make claims about routing policy,
not model output. Scores are pinned where a test needs one by a weights file whose
features-only model is a constant (``bias`` only), so a claim never hangs on a regex.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from backbone.v1 import generation_service_pb2 as pb
from backbone.v1 import generation_service_pb2_grpc
from server.config import ConfigError
from server.engines.generator import ChatTurn, GenerationFinal, GenerationParams, TokenDelta
from server.servicers.generation import ROUTE_METADATA, GenerationHop
from tests.conftest import make_config, running

DEFAULT = "smollm2-135m-instruct"
EXTRA = [{"name": "big"}, {"name": "coder"}]
TIERS = [
    {"name": "small", "cost": 1, "scores": [0.0, 0.5], "max_tokens_cap": 8},
    {"name": "large", "model": "big", "cost": 10, "scores": [0.5, 1.0], "max_running": 1},
    {"name": "code", "model": "coder", "cost": 4, "tasks": ["code"]},
]
CODE_PROMPT = "Write a Python function that reverses a linked list, with unit tests."


class FakeGenerator:
    """Answers every request with two tokens; ``gate`` (when set) holds each generation
    after its first token until it is set, and ``arrivals`` gets one item per held
    generation. Records the max_tokens each call got."""

    engine = "vllm"

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.arrivals: asyncio.Queue[str] = asyncio.Queue()
        self.max_tokens: list[int] = []

    async def start(self) -> None:
        """Nothing to load."""

    async def stop(self) -> None:
        """Nothing to release."""

    def prompt_token_ids(self, prompt: str, messages: Sequence[ChatTurn]) -> list[int]:
        text = prompt + "".join(m.content for m in messages)
        return list(range(max(1, len(text) // 4)))

    async def generate(
        self, request_id: str, ids: list[int], params: GenerationParams
    ) -> AsyncIterator[TokenDelta | GenerationFinal]:
        self.max_tokens.append(params.max_tokens)
        yield TokenDelta("a", (1,))
        if self.gate is not None:
            self.arrivals.put_nowait(request_id)
            await self.gate.wait()
        yield TokenDelta("b", (2,))
        yield GenerationFinal("length", len(ids), 2)

    async def abort(self, request_id: str) -> bool:
        return False

    def num_unfinished(self) -> int:
        return 0

    def healthy(self) -> bool:
        return True


def fakes() -> dict[str, FakeGenerator]:
    return {DEFAULT: FakeGenerator(), "big": FakeGenerator(), "coder": FakeGenerator()}


def config(tiers=TIERS, **routing):
    return make_config(
        generation={"extra_models": json.dumps(EXTRA)},
        routing={"tiers": json.dumps(tiers), "learned": "off", **routing},
    )


def constant_weights(tmp_path, bias: float) -> str:
    """A weights file whose features-only score is sigmoid(bias) for every prompt."""
    path = tmp_path / f"weights-{bias}.json"
    path.write_text(json.dumps({"features_only": {"bias": bias, "weights": {}},
                                "full": {"bias": bias, "weights": {}}}))
    return str(path)


async def generate(address: str, **fields) -> tuple[pb.GenerateFinal, dict | None]:
    """One Generate call: its final message and its parsed backbone-route (or None)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        call = stub.Generate(pb.GenerateRequest(**fields))
        messages = [m async for m in call]
        trailing = dict(await call.trailing_metadata() or ())
    assert messages[-1].HasField("final")
    route = trailing.get(ROUTE_METADATA)
    return messages[-1].final, (json.loads(route) if route is not None else None)


async def test_code_prompt_goes_to_the_code_tier():
    gens = fakes()
    async with running(config(), [GenerationHop(generators=gens)]) as server:
        final, route = await generate(server.address, model="auto", prompt=CODE_PROMPT)
        assert final.model == "coder"
        assert route["tier"] == "code" and route["model"] == "coder"
        assert route["task"] == "code" and "task" in route["reason"]
        # The caller's task hint routes a prompt with no code in it the same way.
        final, route = await generate(
            server.address, model="auto", prompt="Tell me about rivers.", task="code")
        assert (final.model, route["tier"]) == ("coder", "code")
    assert len(gens["coder"].max_tokens) == 2 + 1  # two requests + the start-up probe


async def test_simple_and_complex_prompts_take_different_tiers():
    async with running(config(), [GenerationHop(generators=fakes())]) as server:
        simple, simple_route = await generate(
            server.address, model="auto",
            messages=[pb.ChatMessage(role="user", content="What is the capital of France?")])
        hard, hard_route = await generate(
            server.address, model="auto",
            messages=[pb.ChatMessage(
                role="user", content="Prove that the square root of 2 is irrational.")])
    assert (simple.model, simple_route["tier"]) == (DEFAULT, "small")
    assert (hard.model, hard_route["tier"]) == ("big", "large")
    assert simple_route["score"] < 0.5 <= hard_route["score"]


async def test_saturated_expensive_tier_spills_a_borderline_request(tmp_path):
    gens = fakes()
    weights = constant_weights(tmp_path, 0.2)  # score 0.55: within 0.1 of "small"
    cfg = config(weights_file=weights, spill_margin=0.1)
    async with running(cfg, [GenerationHop(generators=gens)]) as server:
        gens["big"].gate = asyncio.Event()
        held = asyncio.create_task(generate(server.address, model="auto", prompt="first"))
        await gens["big"].arrivals.get()  # "large" now runs its max_running=1
        final, route = await generate(server.address, model="auto", prompt="second")
        assert final.model == DEFAULT
        assert route["tier"] == "small" and route["spilled"] is True
        assert "saturated" in route["reason"] and "spilled" in route["reason"]
        gens["big"].gate.set()
        first, first_route = await held
    assert first.model == "big" and first_route["spilled"] is False


async def test_saturated_tier_keeps_a_request_far_from_the_boundary(tmp_path):
    gens = fakes()
    cfg = config(weights_file=constant_weights(tmp_path, 2.0), spill_margin=0.1)  # 0.88
    async with running(cfg, [GenerationHop(generators=gens)]) as server:
        gens["big"].gate = asyncio.Event()
        held = asyncio.create_task(generate(server.address, model="auto", prompt="first"))
        await gens["big"].arrivals.get()
        second = asyncio.create_task(generate(server.address, model="auto", prompt="second"))
        await gens["big"].arrivals.get()  # the second one reached "big" too: it queued
        gens["big"].gate.set()
        await held
        final, r2 = await second
    assert final.model == "big" and r2["spilled"] is False and "queued" in r2["reason"]


async def test_backbone_route_is_present_and_parses_on_every_auto_response():
    requests = [
        {"prompt": "hi"},
        {"prompt": CODE_PROMPT},
        {"prompt": "Compare REST and gRPC for internal services, with trade-offs."},
        {"messages": [pb.ChatMessage(role="system", content="Be brief."),
                      pb.ChatMessage(role="user", content="Define entropy.")]},
        {"prompt": "x " * 3000, "sampling": pb.SamplingParams(max_tokens=4)},
    ]
    async with running(config(), [GenerationHop(generators=fakes())]) as server:
        for fields in requests:
            final, route = await generate(server.address, model="auto", **fields)
            assert route is not None, fields
            assert set(route) >= {"tier", "model", "score", "features", "spilled", "reason"}
            assert route["model"] == final.model
            assert 0.0 <= route["score"] <= 1.0
            assert all({"name", "contribution"} <= set(f) for f in route["features"])


async def test_naming_a_model_bypasses_routing():
    gens = fakes()
    async with running(config(), [GenerationHop(generators=gens)]) as server:
        final, route = await generate(server.address, model="big", prompt=CODE_PROMPT)
        default, default_route = await generate(server.address, prompt=CODE_PROMPT)
    assert final.model == "big" and route is None
    assert default.model == DEFAULT and default_route is None
    assert len(gens["coder"].max_tokens) == 1  # only its start-up probe


async def test_a_tier_cap_bounds_the_completion():
    gens = fakes()
    async with running(config(), [GenerationHop(generators=gens)]) as server:
        await generate(server.address, model="auto", prompt="hi")
        await generate(server.address, model="auto", prompt="hi",
                       sampling=pb.SamplingParams(max_tokens=100))
        await generate(server.address, model=DEFAULT, prompt="hi",
                       sampling=pb.SamplingParams(max_tokens=100))
    assert gens[DEFAULT].max_tokens[1:] == [8, 8, 100]


async def test_unknown_tier_model_fails_at_start_with_a_clear_error():
    tiers = [{"name": "small", "scores": [0, 0.5]},
             {"name": "large", "model": "gpt-huge", "scores": [0.5, 1]}]
    hop = GenerationHop(generators=fakes())
    with pytest.raises(ConfigError, match=r"tier 'large' names model 'gpt-huge'.*served"):
        async with running(config(tiers=tiers), [hop]):
            pass


def test_bad_tier_tables_fail_when_the_config_loads():
    with pytest.raises(ConfigError, match="tile"):
        config(tiers=[{"name": "a", "scores": [0, 0.4]}, {"name": "b", "scores": [0.5, 1]}])
    with pytest.raises(ConfigError, match="unknown keys"):
        config(tiers=[{"name": "a", "scores": [0, 1], "colour": "red"}])
    with pytest.raises(ConfigError, match="duplicate"):
        config(tiers=[{"name": "a", "scores": [0, 0.5]}, {"name": "a", "scores": [0.5, 1]}])


async def test_no_tiers_means_the_default_model_and_says_so():
    async with running(config(tiers=[]), [GenerationHop(generators=fakes())]) as server:
        final, route = await generate(server.address, model="auto", prompt=CODE_PROMPT)
    assert final.model == DEFAULT and route["tier"] is None and "no routing" in route["reason"]
