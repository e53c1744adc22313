"""The Answer stream's order of work, on the policy alone (an in-memory ``Upstream``):
once the model's window is known the generation request starts before the sources are
handed over (their write overlaps the engine's prefill); a caller that leaves after the sources cancels that start and
closes the stream, leaving no task behind."""

from __future__ import annotations

import asyncio

import numpy as np

from router.hop_api import (
    Delta,
    Embedded,
    Finished,
    Found,
    HopTime,
    Ranked,
    Reranked,
    Searched,
    TokenCount,
)
from router.pipeline import AnswerSpec, Pipeline, retrieve_spec


class MemoryUpstream:
    """Four hops answering at once; the generation records when it starts and ends."""

    def __init__(self) -> None:
        self.generate_started = 0
        self.generate_closed = 0
        self.release = asyncio.Event()

    async def embed(self, texts, *, deadline):
        return Embedded(np.ones((len(texts), 4), np.float32), HopTime("embed", total_s=0.001))

    async def search(self, call, *, deadline):
        hits = [Found(f"p{i}", 1.0 - i / 10, f"passage {i}") for i in range(call.top_k)]
        return Searched(hits, [HopTime("search", total_s=0.001)])

    async def collection_version(self, name, *, deadline):
        return 1

    async def rerank(self, query, documents, top_n, *, deadline):
        return Reranked([Ranked(i, 1.0) for i in range(top_n)], HopTime("rerank", total_s=0.001))

    async def count_tokens(self, model, messages, *, deadline):
        return TokenCount(sum(len(c) for _, c in messages) // 4 + 4, 4096)

    async def generate(self, call, *, deadline):
        self.generate_started += 1
        try:
            await self.release.wait()  # the engine's prefill
            yield Delta("", (7,))  # a token that decodes to nothing yet (half a character)
            yield Delta("answer [1]", (1,))
            yield Finished("stop", 10, 1, "m", HopTime("generate", total_s=0.002))
        finally:
            self.generate_closed += 1


def spec() -> AnswerSpec:
    return AnswerSpec(retrieve_spec("what is it", "c", 5, 2, False, "dense", None))


async def test_generation_starts_before_the_sources_are_written():
    upstream = MemoryUpstream()
    pipeline = Pipeline(upstream)
    upstream.release.set()
    first = [e async for e in pipeline.answer(spec(), None)]  # learns the window
    assert isinstance(first[0], list) and type(first[-1]).__name__ == "AnswerFinal"
    upstream.release.clear()
    events = pipeline.answer(spec(), None)
    sources = await anext(events)
    assert [s.id for s in sources] == ["p0", "p1"]
    assert upstream.generate_started == 2, "the request is on its way before the sources go"
    upstream.release.set()
    rest = [e async for e in events]
    assert [type(e).__name__ for e in rest] == ["Delta", "Delta", "AnswerFinal"]
    assert rest[0] == Delta("", (7,)), "without a redactor every delta passes, empty ones too"
    assert upstream.generate_closed == 2


async def test_a_caller_leaving_after_the_sources_cancels_the_started_generation():
    upstream = MemoryUpstream()
    pipeline = Pipeline(upstream)
    upstream.release.set()
    _ = [e async for e in pipeline.answer(spec(), None)]
    upstream.release.clear()
    before = asyncio.all_tasks()
    events = pipeline.answer(spec(), None)
    await anext(events)
    await asyncio.sleep(0)
    assert upstream.generate_started == 2
    await events.aclose()  # the caller cancelled after the sources
    assert upstream.generate_closed == 2
    assert asyncio.all_tasks() == before
