"""The rerank hop's policy with a recording fake engine (no model, no network).

The fake stands in for the model only to observe WHEN the hop calls it: bad input and
the REJECT policy must be refused before any engine work; concurrent requests must share
batches; a cancelled request's items must never reach the model.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.config import load_config
from server.engines.reranker import REJECT, Prepared, plan_pair
from server.errors import DeadlineTooShort, InvalidArgument, NotFound, Overloaded
from server.hop import HopContext
from server.servicers.rerank import RerankHop


async def queued_at_least(hop: RerankHop, n: int) -> None:
    """Yield to the loop until ``n`` items wait in the hop's batcher (bounded)."""
    async with asyncio.timeout(10):
        while hop._batcher.queued < n:
            await asyncio.sleep(0)


class FakeEngine:
    """Scores a document by its word overlap with the query; words are tokens."""

    name = "fake"
    window = 16

    def __init__(self) -> None:
        self.prepared = 0
        self.batches: list[list[tuple[str, str]]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def prepare(self, query, documents):
        self.prepared += 1
        q = query.split()
        items, truncated, tokens = [], [], []
        for doc in documents:
            d = doc.split()
            plan = plan_pair(len(q), len(d), self.window, 3)
            items.append((" ".join(q[: plan.query_keep]), " ".join(d[: plan.doc_keep])))
            truncated.append(plan.truncated)
            tokens.append(plan.query_keep + plan.doc_keep + 3)
        return Prepared(items=items, costs=tokens, truncated=truncated, pair_tokens=tokens)

    def run_batch(self, payloads):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(payloads))
        return [float(len(set(q.split()) & set(d.split()))) for q, d in payloads]

    def finish(self, prepared, outputs):
        return list(outputs)

    def close(self):
        pass


@pytest.fixture
async def hop():
    engine = FakeEngine()
    config = load_config(overrides={"rerank": {"max_documents": 50, "max_text_chars": 200,
                                               "max_wait_ms": 0}})
    hop = RerankHop(engine=engine)
    await hop.start(HopContext(config))
    engine.prepared, engine.batches = 0, []  # forget the start-up probe
    engine.entered.clear()  # the probe ran a batch: a test waits for its own
    yield hop, engine
    engine.gate = None
    await hop.stop()


async def test_results_best_first_with_index_and_truncation(hop):
    hop, engine = hop
    out = await hop.rerank("red apple", ["green pear", "red apple pie", "apple"], top_n=2)
    assert [(r.index, r.score) for r in out.results] == [(1, 2.0), (2, 1.0)]
    assert out.model == "fake" and out.truncated_pairs == 0 and out.batch_size >= 1
    long = await hop.rerank("red apple", ["red " * 30], top_n=0)
    assert long.truncated_pairs == 1 and long.results[0].truncated
    assert long.prompt_tokens == 16  # cut to the window


@pytest.mark.parametrize(
    ("query", "documents", "top_n", "reason"),
    [
        ("", ["a"], 0, "EMPTY_INPUT"),
        ("q", [], 0, "EMPTY_INPUT"),
        ("q", ["d"] * 100_000, 0, "TOO_MANY_INPUTS"),
        ("q", ["a"], 2, "INVALID_TOP_K"),
        ("q", ["x" * 201], 0, "INPUT_TOO_LARGE"),
    ],
)
async def test_bad_input_is_refused_before_any_engine_work(hop, query, documents, top_n, reason):
    hop, engine = hop
    with pytest.raises(InvalidArgument) as info:
        await hop.rerank(query, documents, top_n)
    assert info.value.reason == reason
    assert engine.prepared == 0 and engine.batches == []


async def test_unknown_model_is_refused_before_work(hop):
    hop, engine = hop
    with pytest.raises(NotFound):
        await hop.rerank("q", ["a"], 0, model="bge-reranker")
    assert engine.prepared == 0


async def test_reject_policy_refuses_before_compute(hop):
    hop, engine = hop
    with pytest.raises(InvalidArgument) as info:
        await hop.rerank("q", ["short", "long " * 40], 0, truncation=REJECT)
    assert info.value.reason == "INPUT_TOO_LARGE"
    assert engine.batches == []
    ok = await hop.rerank("q", ["short"], 0, truncation=REJECT)
    assert len(ok.results) == 1


async def test_concurrent_requests_share_batches(hop):
    hop, engine = hop
    engine.gate = threading.Event()
    # The first request occupies the engine; the others queue up behind it meanwhile.
    first = asyncio.ensure_future(hop.rerank("a b", ["a", "b"], 0))
    await asyncio.to_thread(engine.entered.wait, 10)
    others = [asyncio.ensure_future(hop.rerank(f"q{i}", [f"q{i}", "z", "y"], 0)) for i in range(4)]
    await queued_at_least(hop, 12)
    engine.gate.set()
    results = await asyncio.gather(first, *others)
    assert max(len(b) for b in engine.batches) == 12  # the 4 queued requests ran as one batch
    for i, out in enumerate(results[1:]):
        assert out.results[0].index == 0 and out.results[0].score == 1.0
        assert out.batch_size == 12


async def test_cancelled_request_never_reaches_the_model(hop):
    hop, engine = hop
    engine.gate = threading.Event()
    busy = asyncio.ensure_future(hop.rerank("a", ["a"], 0))
    await asyncio.to_thread(engine.entered.wait, 10)
    doomed = asyncio.ensure_future(hop.rerank("gone", ["never computed"], 0))
    await queued_at_least(hop, 1)
    doomed.cancel()
    engine.gate.set()
    await busy
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await hop.rerank("after", ["after"], 0)
    assert all(("gone", "never computed") not in b for b in engine.batches)


async def test_a_passed_deadline_is_dropped_before_compute(hop):
    hop, engine = hop
    with pytest.raises(DeadlineTooShort):
        await hop.rerank("late", ["late"], 0, deadline=time.monotonic() - 1)
    assert engine.batches == []


async def test_full_queue_refuses_at_once_without_work():
    engine = FakeEngine()
    hop = RerankHop(engine=engine)
    await hop.start(HopContext(load_config(overrides={"rerank": {"max_queue": 4}})))
    try:
        engine.batches = []
        with pytest.raises(Overloaded):
            await hop.rerank("q", ["a", "b", "c", "d", "e"], 0)
        assert engine.batches == []
        assert len((await hop.rerank("q", ["a", "b"], 0)).results) == 2
    finally:
        await hop.stop()
