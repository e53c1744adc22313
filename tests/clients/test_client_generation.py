"""``client.generation``: every GenerationService RPC, sync and async, against a real
generation hop (validation, admission, registry, servicer) over engines that keep honest
books of unfinished requests; a cancelled stream must leave none behind."""

from __future__ import annotations

import asyncio
import json

import pytest

from clients import errors
from clients.client import AsyncClient, Client
from clients.generation import Delta, Final, Message
from server.servicers.generation import GenerationHop
from tests.clients.hop_fakes import HonestGenerator
from tests.conftest import make_config, running

DEFAULT = "smollm2-135m-instruct"  # the default config's model name
SECOND = "second"


@pytest.fixture(scope="module")
async def served():
    """A server with two models, each on its own honest engine."""
    engines = {DEFAULT: HonestGenerator(), SECOND: HonestGenerator()}
    extra = json.dumps([{"name": SECOND, "max_tokens_cap": 8, "max_context_tokens": 64}])
    config = make_config(generation={"extra_models": extra, "max_tokens_cap": 32})
    hop = GenerationHop(generators=engines)
    async with running(config, [hop]) as server:
        yield server, hop, engines


async def until_idle(engine: HonestGenerator) -> None:
    async with asyncio.timeout(10):
        await engine.idle.wait()
    assert engine.num_unfinished() == 0


async def test_async_stream_yields_deltas_then_the_final(served):
    server, _, _ = served
    async with AsyncClient(address=server.address) as client:
        stream = client.generation.generate("hello there", max_tokens=3, temperature=0.0)
        events = [e async for e in stream]
        trailers = await stream.trailing_metadata()
    assert [type(e) for e in events] == [Delta, Delta, Delta, Final]
    assert "".join(e.text for e in events[:-1]) == "t0 t1 t2 "
    assert events[0].token_ids == (100,)
    final = events[-1]
    assert stream.final == final and final.finish_reason == "length"
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (2, 3)
    assert final.model == DEFAULT and final.timings[0].hop == "generate"
    assert final.time_to_first_token_s > 0
    assert len(stream.request_id) == 32 and isinstance(trailers, tuple)


async def test_sync_chat_models_tokens_and_errors(served):
    server, _, _ = served

    def calls():
        with Client(address=server.address) as client:
            g = client.generation
            chat = [Message("system", "be brief"), ("user", "hi"), {"role": "user", "content": "x"}]
            events = list(g.generate(messages=chat, model=SECOND, max_tokens=2, stop=["."]))
            models = g.list_models()
            counted = g.count_tokens(messages=chat, model=SECOND)
            raw = g.count_tokens("one two three")
            with pytest.raises(errors.InvalidSamplingError):
                list(g.generate("x", temperature=5.0))
            with pytest.raises(errors.ModelNotFoundError):
                g.count_tokens("x", model="gpt-9")
            with pytest.raises(errors.ContextLengthExceededError):
                list(g.generate("x", model=SECOND, max_tokens=9))
            with pytest.raises(errors.RequestNotFoundError):
                g.abort("not-running")
            return events, models, counted, raw

    events, models, counted, raw = await asyncio.to_thread(calls)
    assert events[-1].model == SECOND and events[-1].usage.completion_tokens == 2
    assert [(m.name, m.default, m.ready) for m in models] == [(DEFAULT, True, True),
                                                              (SECOND, False, True)]
    assert models[1].max_tokens_cap == 8 and models[1].max_context_tokens == 64
    assert counted.tokens == 7 and counted.max_context_tokens == 64  # "role: content" words
    assert raw.tokens == 3


async def test_abort_by_request_id_ends_the_stream_with_abort(served):
    server, _, engines = served
    engine = engines[DEFAULT]
    async with AsyncClient(address=server.address) as client:
        stream = client.generation.generate("hold on", max_tokens=20, request_id="abort-me")
        events = stream.__aiter__()
        first = await anext(events)
        assert isinstance(first, Delta) and engine.num_unfinished() == 1
        assert await client.generation.abort("abort-me") is True
        rest = [e async for e in events]
    assert rest[-1].finish_reason == "abort" and rest[-1].usage.completion_tokens == 1
    assert engine.aborted[-1] == "abort-me"
    await until_idle(engine)


async def test_cancelled_async_stream_leaves_no_unfinished_request(served):
    server, hop, engines = served
    engine = engines[DEFAULT]
    engine.holding.clear()
    async with AsyncClient(address=server.address) as client:
        stream = client.generation.generate("hold please", max_tokens=20)
        events = stream.__aiter__()
        assert isinstance(await anext(events), Delta)
        await engine.holding.wait()
        assert engine.num_unfinished() == 1 and stream.request_id in hop.registry.running
        stream.cancel()
        assert [e async for e in events] == []  # ends quietly: we cancelled it
        assert stream.final is None
    await until_idle(engine)
    assert not hop.registry.running
    assert all(m.gate.in_flight == 0 for m in hop.registry.models.values())


async def test_cancelled_sync_stream_leaves_no_unfinished_request(served):
    server, hop, engines = served
    engine = engines[DEFAULT]
    engine.holding.clear()
    loop = asyncio.get_running_loop()
    holding = asyncio.Event()

    def consume():
        with Client(address=server.address) as client:
            stream = client.generation.generate("hold it", max_tokens=20)
            seen = []
            for event in stream:
                seen.append(event)
                loop.call_soon_threadsafe(holding.set)
                asyncio.run_coroutine_threadsafe(engine.holding.wait(), loop).result(10)
                stream.cancel()
            return seen, stream

    seen, stream = await asyncio.to_thread(consume)
    assert len(seen) == 1 and stream.cancelled and stream.final is None
    await until_idle(engine)
    assert not hop.registry.running


async def test_generate_command_streams_and_prints_stats(served, capsys):
    from clients import cli

    server, _, _ = served
    argv = ["generate", "hello world", "--address", server.address, "--raw",
            "--max-tokens", "2", "--temperature", "0", "--stats"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    out, err = capsys.readouterr()
    assert out == "t0 t1 \n"
    assert err.startswith("[length] model=smollm2-135m-instruct prompt_tokens=2 ")
    assert await asyncio.to_thread(cli.main, ["generate", "x", "--address", server.address,
                                              "--temperature", "9"]) == 1
    assert "INVALID_SAMPLING" in capsys.readouterr().err
