"""Policy tests of the dynamic batcher, with a fake blocking model gated by events."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from router.batcher import BatchPolicy, DynamicBatcher
from server.errors import DeadlineTooShort, Overloaded, Unavailable


class GatedModel:
    """A blocking run_batch that records batches and can be held at a gate."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[str]) -> list[str]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError("model exploded")
        return [s.upper() for s in items]


def taking(seconds: float, model):
    """``model`` (entered, maybe held at its gate), then ``seconds`` of compute."""
    def run(items):
        out = model(items)
        time.sleep(seconds)
        return out
    return run


async def wait_entered(model: GatedModel) -> None:
    await asyncio.to_thread(model.entered.wait, 10)


@pytest.fixture
async def make():
    batchers = []

    async def factory(model, run_alone=None, **policy):
        b = DynamicBatcher("t", model, BatchPolicy(**policy), run_alone=run_alone)
        await b.start()
        batchers.append(b)
        return b

    yield factory
    for b in batchers:
        await b.stop()


async def test_concurrent_requests_share_a_batch_and_keep_order(make):
    model = GatedModel()
    model.gate.clear()
    b = await make(model, max_batch_size=64, max_wait_s=0.0)
    first = asyncio.create_task(b.submit(["a"], [1]))
    await wait_entered(model)  # the engine is busy with "a"; the rest queue up behind it
    rest = [asyncio.create_task(b.submit([f"x{i}", f"y{i}"], [2, 2])) for i in range(10)]
    await asyncio.sleep(0)
    model.gate.set()
    assert (await first)[0] == ["A"]
    for i, task in enumerate(rest):
        out, timing = await task
        assert out == [f"X{i}", f"Y{i}"]
        assert timing.batch_size == 20
    assert [len(x) for x in model.batches] == [1, 20]


async def test_batch_size_and_token_budget_bound_batches(make):
    model = GatedModel()
    model.gate.clear()
    b = await make(model, max_batch_size=4, max_wait_s=0.0, token_budget=30)
    blocker = asyncio.create_task(b.submit(["z"], [1]))
    await wait_entered(model)
    tasks = [asyncio.create_task(b.submit([f"s{i}"], [10])) for i in range(7)]
    await asyncio.sleep(0)
    model.gate.set()
    await blocker
    await asyncio.gather(*tasks)
    # 10 tokens each, budget 30: at most 3 rows per batch (4 would be 40 padded tokens).
    assert [len(x) for x in model.batches[1:]] == [3, 3, 1]


async def test_single_item_over_budget_still_runs_alone(make):
    model = GatedModel()
    b = await make(model, max_batch_size=8, max_wait_s=0.0, token_budget=10)
    out, timing = await b.submit(["big"], [500])
    assert out == ["BIG"] and timing.batch_size == 1


async def test_length_aware_grouping_keeps_similar_lengths_together(make):
    model = GatedModel()
    model.gate.clear()
    b = await make(model, max_batch_size=3, max_wait_s=0.0, token_budget=10_000)
    blocker = asyncio.create_task(b.submit(["first"], [1]))
    await wait_entered(model)
    lengths = {"s1": 5, "L1": 200, "s2": 6, "L2": 210, "s3": 4, "L3": 205}
    tasks = [asyncio.create_task(b.submit([k], [v])) for k, v in lengths.items()]
    await asyncio.sleep(0)
    model.gate.set()
    await blocker
    await asyncio.gather(*tasks)
    groups = [sorted(x) for x in model.batches[1:]]
    assert groups == [["s1", "s2", "s3"], ["L1", "L2", "L3"]]


async def test_oldest_item_is_never_starved(make):
    model = GatedModel()
    model.gate.clear()
    b = await make(model, max_batch_size=2, max_wait_s=0.0, token_budget=10_000)
    blocker = asyncio.create_task(b.submit(["first"], [1]))
    await wait_entered(model)
    odd = asyncio.create_task(b.submit(["odd"], [300]))
    await asyncio.sleep(0)
    short = [asyncio.create_task(b.submit([f"s{i}"], [5])) for i in range(4)]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(blocker, odd, *short)
    assert "odd" in model.batches[1]


async def test_queue_bound_refuses_fast_and_whole(make):
    model = GatedModel()
    model.gate.clear()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, max_queue=3)
    running = asyncio.create_task(b.submit(["run"], [1]))
    await wait_entered(model)
    queued = asyncio.create_task(b.submit(["q1", "q2"], [1, 1]))
    await asyncio.sleep(0)
    started = time.perf_counter()
    with pytest.raises(Overloaded):
        await b.submit(["a", "b"], [1, 1])  # 2 + 2 > 3: refused whole, nothing queued
    assert time.perf_counter() - started < 0.05
    assert b.queued == 2
    model.gate.set()
    await asyncio.gather(running, queued)


async def test_cancelled_request_is_dropped_before_compute(make):
    model = GatedModel()
    model.gate.clear()
    b = await make(model, max_batch_size=8, max_wait_s=0.0)
    running = asyncio.create_task(b.submit(["run"], [1]))
    await wait_entered(model)
    doomed = asyncio.create_task(b.submit(["doomed"], [1]))
    kept = asyncio.create_task(b.submit(["kept"], [1]))
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.sleep(0)
    model.gate.set()
    await running
    assert (await kept)[0] == ["KEPT"]
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert all("doomed" not in batch for batch in model.batches)


async def test_expired_deadline_is_dropped_before_compute(make):
    model = GatedModel()
    model.gate.clear()
    b = await make(model, max_batch_size=8, max_wait_s=0.0)
    running = asyncio.create_task(b.submit(["run"], [1]))
    await wait_entered(model)
    late = asyncio.create_task(b.submit(["late"], [1], deadline=time.monotonic() - 1))
    await asyncio.sleep(0)
    model.gate.set()
    await running
    with pytest.raises(DeadlineTooShort):
        await late
    assert all("late" not in batch for batch in model.batches)


async def test_crashed_batch_fails_only_its_callers_and_loop_survives(make):
    model = GatedModel(fail_on="bad")
    model.gate.clear()
    b = await make(model, max_batch_size=2, max_wait_s=0.0, token_budget=10_000)
    running = asyncio.create_task(b.submit(["run"], [1]))
    await wait_entered(model)
    bad = asyncio.create_task(b.submit(["bad"], [5]))
    mate = asyncio.create_task(b.submit(["mate"], [5]))
    other = asyncio.create_task(b.submit(["other"], [500]))  # too different: next batch
    await asyncio.sleep(0)
    model.gate.set()
    await running
    with pytest.raises(ValueError):
        await bad
    with pytest.raises(ValueError):
        await mate  # shared the crashed batch
    assert (await other)[0] == ["OTHER"]
    assert b.healthy()
    assert (await b.submit(["after"], [1]))[0] == ["AFTER"]


async def test_stop_resolves_every_waiting_and_running_future(make):
    model = GatedModel()
    model.gate.clear()
    b = await make(model, max_batch_size=1, max_wait_s=0.0)
    running = asyncio.create_task(b.submit(["run"], [1]))
    await wait_entered(model)
    waiting = [asyncio.create_task(b.submit([f"w{i}"], [1])) for i in range(5)]
    await asyncio.sleep(0)
    await b.stop()
    model.gate.set()
    for task in [running, *waiting]:  # the running batch's callers too
        with pytest.raises(Unavailable):
            await task
    with pytest.raises(Unavailable):
        await b.submit(["x"], [1])
    assert not b.healthy()


async def test_lone_caller_is_dispatched_at_once(make):
    model = GatedModel()
    b = await make(model, max_batch_size=8, max_wait_s=30.0)
    out, _ = await asyncio.wait_for(b.submit(["alone"], [1]), timeout=5)
    assert out == ["ALONE"]


async def test_max_wait_gathers_company_once_traffic_is_concurrent(make):
    model = GatedModel()
    model.gate.clear()
    b = await make(model, max_batch_size=8, max_wait_s=0.2)
    first = asyncio.create_task(b.submit(["a"], [1]))
    await wait_entered(model)
    pair = asyncio.create_task(b.submit(["b", "c"], [1, 1]))
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(first, pair)  # batches [a], [b, c]: traffic is now concurrent
    late = asyncio.create_task(b.submit(["d"], [1]))
    await asyncio.sleep(0.01)
    later = asyncio.create_task(b.submit(["e"], [1]))
    await asyncio.gather(late, later)
    assert model.batches[-1] == ["d", "e"]


async def test_queue_delay_bound_refuses_work_that_would_wait_too_long(make):
    """Once a batch has been measured, admission is bounded by estimated wait, not count."""
    model = GatedModel()
    b = await make(taking(0.4, model), max_batch_size=1, max_wait_s=0.0, max_queue_delay_s=0.6)
    assert b.estimated_delay_s() == 0.0  # nothing measured yet: no bound
    await b.submit(["measure"], [10])  # 10 tokens took ~0.4 s
    model.gate.clear()
    model.entered.clear()
    running = asyncio.create_task(b.submit(["run"], [10]))
    await wait_entered(model)
    # The running batch does not count against the bound: queued work does.
    admitted = [asyncio.create_task(b.submit([name], [10])) for name in ("fits", "fits too")]
    await asyncio.sleep(0)
    assert b.estimated_delay_s(running=False) > 0.6  # "fits" and "fits too", ~0.4 s each
    assert b.estimated_delay_s() > 1.0  # ...plus the rest of "run"
    with pytest.raises(Overloaded) as info:
        await b.submit(["too much"], [10])
    assert info.value.metadata == {"max_queue_delay_ms": "600"}
    # Pushback: until the work ahead is back under the bound (~1.2 s - 0.6 s).
    assert 0.4 < info.value.retry_after_s <= 1.0
    model.gate.set()
    await asyncio.gather(running, *admitted)
    assert b.estimated_delay_s() == 0.0


async def test_refused_callers_get_consecutive_return_slots(make):
    """Pushback spreads refused callers over the engine's pace instead of one herd."""
    model = GatedModel()
    b = await make(taking(0.2, model), max_batch_size=1, max_wait_s=0.0, max_queue_delay_s=0.25)
    await b.submit(["measure"], [10])  # 10 tokens ~0.2 s
    model.gate.clear()
    model.entered.clear()
    running = asyncio.create_task(b.submit(["run"], [10]))
    await wait_entered(model)
    queued = [asyncio.create_task(b.submit([name], [10])) for name in ("fits", "fits too")]
    await asyncio.sleep(0)
    pushbacks = []
    for _ in range(3):
        with pytest.raises(Overloaded) as info:
            await b.submit(["refused"], [10])
        pushbacks.append(info.value.retry_after_s)
    # The first comes back when the queue is about back under its bound; each next one a
    # marginal compute (~0.2 s here) later; none beyond MAX_PUSHBACK_S.
    assert 0.2 < pushbacks[0] < 0.5  # ~0.6 s ahead (0.2 running + 0.4 queued) - 0.25 s bound
    assert pushbacks[1] - pushbacks[0] == pytest.approx(0.2, abs=0.08)
    assert pushbacks[2] - pushbacks[1] == pytest.approx(0.2, abs=0.08)
    model.gate.set()
    await asyncio.gather(running, *queued)



class HeldItems:
    """A blocking run_batch that holds batches containing "hold*" items at a gate and
    records which thread ran each batch."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[tuple[str, list[str]]] = []

    def __call__(self, items: list[str]) -> list[str]:
        if any(i.startswith("hold") for i in items):
            self.entered.set()
            self.gate.wait(10)
        self.batches.append((threading.current_thread().name, list(items)))
        return [i.upper() for i in items]


async def test_lanes_run_batches_at_once_and_none_waits_for_another(make):
    model = HeldItems()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, lanes=2)
    held = asyncio.create_task(b.submit(["hold"], [1]))
    await asyncio.to_thread(model.entered.wait, 10)
    # One lane is held; the other serves a stream of callers meanwhile.
    for i in range(5):
        out, _ = await asyncio.wait_for(b.submit([f"free{i}"], [1]), timeout=5)
        assert out == [f"FREE{i}"]
    assert not held.done()
    model.gate.set()
    assert (await held)[0] == ["HOLD"]
    threads = {thread for thread, items in model.batches}
    assert len(threads) == 2  # each lane has its own worker thread


async def test_a_lone_item_runs_alone_holding_every_lane(make):
    lanes_model, alone_model = HeldItems(), HeldItems()
    b = await make(lanes_model, run_alone=alone_model, max_batch_size=1, max_wait_s=0.0, lanes=2)
    # Nothing else runs or waits: the lone item runs alone.
    assert (await b.submit(["solo"], [1]))[0] == ["SOLO"]
    assert [items for _, items in alone_model.batches] == [["solo"]]
    # While it runs alone, no lane starts: later callers wait for it, then share the lanes.
    held = asyncio.create_task(b.submit(["hold"], [1]))
    await asyncio.to_thread(alone_model.entered.wait, 10)
    later = [asyncio.create_task(b.submit([f"x{i}"], [1])) for i in range(3)]
    await asyncio.sleep(0.05)
    assert lanes_model.batches == [] and not any(t.done() for t in later)
    alone_model.gate.set()
    await asyncio.gather(held, *later)
    # Queued together, the first two share the lanes (x2 may be alone again by its turn).
    assert {"x0", "x1"} <= {items[0] for _, items in lanes_model.batches}


async def test_queued_work_is_shared_among_lanes_in_the_wait_estimate(make):
    model = HeldItems()
    b = await make(taking(0.2, model), max_batch_size=1, max_wait_s=0.0, lanes=2)
    await b.submit(["measure"], [10])  # 10 tokens ~0.2 s
    running = [asyncio.create_task(b.submit([f"hold{i}"], [10])) for i in range(2)]
    await asyncio.to_thread(model.entered.wait, 10)
    await asyncio.sleep(0.05)  # both lanes busy
    queued = [asyncio.create_task(b.submit([f"q{i}"], [10])) for i in range(4)]
    await asyncio.sleep(0)
    # Four queued items of ~0.2 s on two lanes: ~0.4 s, not ~0.8 s.
    assert b.estimated_delay_s(running=False) == pytest.approx(0.4, abs=0.12)
    model.gate.set()
    await asyncio.gather(*running, *queued)


async def test_lane_depth_hands_the_next_batch_to_a_busy_lane(make):
    for depth, queued in ((1, 1), (2, 0)):
        model = HeldItems()
        b = await make(model, max_batch_size=1, max_wait_s=0.0, lanes=1, lane_depth=depth)
        held = asyncio.create_task(b.submit(["hold"], [1]))
        await asyncio.to_thread(model.entered.wait, 10)
        nxt = asyncio.create_task(b.submit(["next"], [1]))
        third = asyncio.create_task(b.submit(["third"], [1]))
        await asyncio.sleep(0.05)
        # Depth 2: "next" waits on the lane's worker, only "third" in the queue.
        assert b.queued == queued + 1
        model.gate.set()
        await asyncio.gather(held, nxt, third)
        assert [items for _, items in model.batches] == [["hold"], ["next"], ["third"]]


async def test_a_handed_over_batch_is_timed_where_it_runs_and_skipped_if_its_callers_left(make):
    model = HeldItems()
    b = await make(taking(0.2, model), max_batch_size=1, max_wait_s=0.0, lanes=1, lane_depth=2)
    held = asyncio.create_task(b.submit(["hold"], [10]))
    await asyncio.to_thread(model.entered.wait, 10)
    doomed = asyncio.create_task(b.submit(["doomed"], [10]))
    await asyncio.sleep(0.05)
    doomed.cancel()
    await asyncio.sleep(0)
    model.gate.set()
    await held
    with pytest.raises(asyncio.CancelledError):
        await doomed
    # Handed over behind a 0.2 s batch: it waits ~0.2 s on the lane, computes ~0.2 s.
    model.gate.clear()
    model.entered.clear()
    held = asyncio.create_task(b.submit(["hold2"], [10]))
    await asyncio.to_thread(model.entered.wait, 10)
    kept = asyncio.create_task(b.submit(["kept"], [10]))
    await asyncio.sleep(0.05)
    model.gate.set()
    await held
    out, timing = await kept
    assert out == ["KEPT"]
    assert timing.compute_s == pytest.approx(0.2, abs=0.08)
    assert timing.queue_s == pytest.approx(0.2, abs=0.08)
    assert all("doomed" not in items for _, items in model.batches)


async def test_handed_over_work_counts_as_queued_in_the_wait_estimate(make):
    model = HeldItems()
    b = await make(taking(0.2, model), max_batch_size=1, max_wait_s=0.0, lanes=1, lane_depth=2)
    await b.submit(["measure"], [10])  # 10 tokens ~0.2 s
    held = asyncio.create_task(b.submit(["hold"], [10]))
    await asyncio.to_thread(model.entered.wait, 10)
    later = [asyncio.create_task(b.submit([f"q{i}"], [10])) for i in range(2)]
    await asyncio.sleep(0.05)
    assert b.queued == 1  # q0 waits on the lane, q1 in the queue
    assert b.estimated_delay_s(running=False) == pytest.approx(0.4, abs=0.12)
    model.gate.set()
    await asyncio.gather(held, *later)


async def test_stop_fails_batches_handed_to_a_lane(make):
    model = HeldItems()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, lanes=1, lane_depth=2)
    held = asyncio.create_task(b.submit(["hold"], [1]))
    await asyncio.to_thread(model.entered.wait, 10)
    handed = asyncio.create_task(b.submit(["handed"], [1]))
    await asyncio.sleep(0.05)
    await b.stop()
    model.gate.set()
    for task in (held, handed):
        with pytest.raises(Unavailable):
            await task


async def test_queue_delay_bound_counts_the_running_batch_when_asked(make):
    for counts_running, refused in ((False, False), (True, True)):
        model = HeldItems()
        b = await make(taking(0.2, model), max_batch_size=1, max_wait_s=0.0,
                       max_queue_delay_s=0.1, queue_delay_counts_running=counts_running)
        await b.submit(["measure"], [10])  # 10 tokens ~0.2 s
        held = asyncio.create_task(b.submit(["hold"], [10]))
        await asyncio.to_thread(model.entered.wait, 10)
        # ~0.2 s of the running batch left, nothing queued: over a 0.1 s bound only if
        # the running batch counts.
        if refused:
            with pytest.raises(Overloaded):
                await b.submit(["late"], [10])
        else:
            late = asyncio.create_task(b.submit(["late"], [10]))
        model.gate.set()
        await held
        if not refused:
            assert (await late)[0] == ["LATE"]
