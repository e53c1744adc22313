"""The Generator contract, run against every engine that loads on this machine.

Here that is vLLM (the CPU build) over the bundled SmolLM2; TensorRT-LLM skips with the
reason its import or GPU check gave. A GPU host runs the very same tests for CUDA vLLM
and TensorRT-LLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from transformers import AutoTokenizer

from server.engines.generator import ChatTurn, GenerationFinal, GenerationParams, TokenDelta
from tests.generation.conftest import wait_engine_idle

pytestmark = pytest.mark.generation

CHAT = (ChatTurn("user", "Name three colours of the rainbow."),)
GREEDY = GenerationParams(temperature=0.0, max_tokens=24)


async def run(generator, params=GREEDY, prompt="", messages=CHAT):
    """(prompt ids, deltas, final) of one generation."""
    ids = generator.prompt_token_ids(prompt, messages)
    events = [e async for e in generator.generate(uuid.uuid4().hex, ids, params)]
    deltas = [e for e in events[:-1]]
    assert all(isinstance(e, TokenDelta) for e in deltas), "deltas first"
    assert isinstance(events[-1], GenerationFinal), "then exactly one final"
    return ids, deltas, events[-1]


def joined(deltas) -> tuple[str, list[int]]:
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]


async def test_stream_shape_usage_and_determinism(any_generator):
    ids, deltas, final = await run(any_generator)
    text, tokens = joined(deltas)
    assert text.strip(), "greedy chat answer is not empty"
    assert final.prompt_tokens == len(ids)
    assert final.completion_tokens == len(tokens) <= GREEDY.max_tokens
    assert final.finish_reason in ("stop", "length")
    if final.finish_reason == "length":
        assert final.completion_tokens == GREEDY.max_tokens
    _, again, _ = await run(any_generator)
    assert joined(again) == (text, tokens), "greedy decoding is deterministic"


async def test_delta_text_is_the_detokenised_ids(any_generator):
    _, deltas, _ = await run(any_generator)
    text, tokens = joined(deltas)
    tokenizer = AutoTokenizer.from_pretrained(str(any_generator.model_dir))
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)


async def test_chat_template_is_rendered_with_generation_prompt(any_generator):
    tokenizer = AutoTokenizer.from_pretrained(str(any_generator.model_dir))
    ids = any_generator.prompt_token_ids("", CHAT)
    rendered = tokenizer.decode(ids)
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n"
                             "<|im_start|>assistant\n")
    raw = any_generator.prompt_token_ids("Hello world", ())
    assert tokenizer.decode(raw) == "Hello world"


async def test_max_tokens_ends_with_length(any_generator):
    params = GenerationParams(temperature=0.0, max_tokens=5)
    _, deltas, final = await run(any_generator, params, prompt="1, 2, 3, 4, 5,", messages=())
    assert final.finish_reason == "length"
    assert final.completion_tokens == 5 == len(joined(deltas)[1])


async def test_stop_string_ends_generation_and_is_not_returned(any_generator):
    params = GenerationParams(temperature=0.0, max_tokens=40)
    _, deltas, _ = await run(any_generator, params)
    full = joined(deltas)[0]
    assert len(full) > 30, full
    stop = full[20:24]
    _, deltas, final = await run(any_generator, GenerationParams(0.0, max_tokens=40, stop=(stop,)))
    assert joined(deltas)[0] == full[: full.index(stop)]
    assert final.finish_reason == "stop"


async def test_seeded_sampling_is_reproducible(any_generator):
    params = GenerationParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=2**64 - 1)
    first = joined((await run(any_generator, params))[1])
    second = joined((await run(any_generator, params))[1])
    assert first == second
    other = GenerationParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=7)
    assert joined((await run(any_generator, other))[1]) != first


async def test_every_sampling_knob_is_accepted(any_generator):
    params = GenerationParams(
        temperature=0.7, top_p=0.9, top_k=20, max_tokens=12, seed=3,
        repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5, stop=("\n\n",),
    )
    _, deltas, final = await run(any_generator, params)
    assert final.completion_tokens == len(joined(deltas)[1]) >= 1


async def test_closing_the_stream_early_aborts_it_in_the_engine(any_generator):
    ids = any_generator.prompt_token_ids("", CHAT)
    stream = any_generator.generate(uuid.uuid4().hex, ids, GenerationParams(0.0, max_tokens=200))
    async with contextlib.aclosing(stream) as events:
        seen = 0
        async for event in events:
            seen += isinstance(event, TokenDelta)
            if seen == 2:
                break
    await wait_engine_idle(any_generator)


async def test_abort_by_id_ends_the_stream_with_abort(any_generator):
    rid = uuid.uuid4().hex
    ids = any_generator.prompt_token_ids("", CHAT)
    first = asyncio.Event()
    events = []

    async def consume():
        async for event in any_generator.generate(rid, ids, GenerationParams(0.0, max_tokens=200)):
            events.append(event)
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 60)
    assert await any_generator.abort(rid) is True
    await asyncio.wait_for(task, 30)
    assert isinstance(events[-1], GenerationFinal)
    assert events[-1].finish_reason == "abort"
    assert events[-1].completion_tokens < 200
    assert await any_generator.abort(rid) is False
    await wait_engine_idle(any_generator)
