"""Policy tests of the dynamic batcher, with a fake blocking model gated by events."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from router.admission import Priority
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


def primed(b: DynamicBatcher, per_token_s: float = 0.01) -> None:
    """Teach ``b``'s cost model a batch cost (10 tokens: 10 x per_token_s seconds) without
    running anything: the admission tests below then depend on no wall-clock timing."""
    b.cost.observe(10, 10 * per_token_s)


def refused_at_once(coro) -> Overloaded:
    """Drive ``coro`` (a submit) one step: it must raise Overloaded before its first
    suspension, i.e. without waiting for anything. Returns the error."""
    try:
        coro.send(None)
    except Overloaded as exc:
        return exc
    finally:
        coro.close()
    raise AssertionError("the request was not refused before its first wait")


async def queue_behind_a_running_item(b: DynamicBatcher, model: GatedModel, queued: int):
    """Hold the engine on one running item of 10 tokens and queue ``queued`` more."""
    model.gate.clear()
    running = asyncio.create_task(b.submit(["run"], [10]))
    await wait_entered(model)
    tasks = [asyncio.create_task(b.submit([f"q{i}"], [10])) for i in range(queued)]
    await asyncio.sleep(0)
    return [running, *tasks]


async def test_short_deadline_behind_two_seconds_of_work_is_refused_before_any_wait(make):
    model = GatedModel()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, max_queue_delay_s=5.0)
    primed(b)  # 10 tokens ~0.1 s
    held = await queue_behind_a_running_item(b, model, 20)  # ~0.1 s running + 2 s queued
    assert b.estimated_delay_s() == pytest.approx(2.1, abs=0.02)
    info = refused_at_once(b.submit(["late"], [10], deadline=time.monotonic() + 0.05))
    assert info.status == "RESOURCE_EXHAUSTED" and info.reason == "OVERLOADED"
    # Pushback: when the ~2.1 s of work ahead will have drained (its own 0.1 s does not
    # fit 45 ms anyway: nothing less would do).
    assert info.retry_after_s == pytest.approx(2.1, abs=0.05)
    assert int(info.metadata["estimated_wait_ms"]) == pytest.approx(2100, abs=50)
    # The same request with a 10 s deadline fits behind the same work and is served.
    patient = asyncio.create_task(b.submit(["patient"], [10], deadline=time.monotonic() + 10))
    await asyncio.sleep(0)
    assert b.queued == 21
    model.gate.set()
    await asyncio.gather(*held)
    assert (await patient)[0] == ["PATIENT"]


async def test_the_ceiling_bounds_whatever_the_deadline(make):
    model = GatedModel()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, max_queue_delay_s=1.0)
    primed(b)
    held = await queue_behind_a_running_item(b, model, 8)  # ~0.9 s ahead, 0.1 s own: fits
    fits = asyncio.create_task(b.submit(["fits"], [10], deadline=time.monotonic() + 60))
    await asyncio.sleep(0)
    info = refused_at_once(b.submit(["over"], [10], deadline=time.monotonic() + 60))
    assert "ceiling" in info.message
    # Retry once ~0.1 s of the 1.0 s ahead has drained (1.0 + 0.1 own - 1.0 ceiling).
    assert info.retry_after_s == pytest.approx(0.1, abs=0.03)
    model.gate.set()
    await asyncio.gather(*held, fits)


async def test_no_deadline_gets_the_default_one_and_is_dropped_at_it(make):
    model = GatedModel()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, default_deadline_s=0.2)
    primed(b, per_token_s=0.001)  # 10 tokens ~10 ms: admitted behind one running item
    held = await queue_behind_a_running_item(b, model, 0)
    undated = asyncio.create_task(b.submit(["undated"], [10]))
    await asyncio.sleep(0.3)  # past its default deadline while the engine is held
    model.gate.set()
    await asyncio.gather(*held)
    with pytest.raises(DeadlineTooShort):
        await undated
    assert all("undated" not in batch for batch in model.batches)


async def test_a_passed_deadline_is_refused_at_admission(make):
    b = await make(GatedModel(), max_batch_size=1, max_wait_s=0.0)
    with pytest.raises(DeadlineTooShort):
        await b.submit(["late"], [1], deadline=time.monotonic() - 0.001)


async def test_low_priority_is_refused_before_normal_under_the_same_pressure(make):
    model = GatedModel()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, max_queue_delay_s=3.0,
                   low_fraction=0.5)
    primed(b)
    held = await queue_behind_a_running_item(b, model, 20)  # ~2.1 s ahead
    deadline = time.monotonic() + 10
    # Low: admitted only while the wait ahead is under half the 3 s ceiling.
    info = refused_at_once(b.submit(["low"], [10], deadline, Priority.LOW))
    assert info.metadata["priority"] == "low"
    assert info.retry_after_s == pytest.approx(2.1 - 1.5, abs=0.05)
    normal = asyncio.create_task(b.submit(["normal"], [10], deadline, Priority.NORMAL))
    await asyncio.sleep(0)
    assert b.queued == 21
    model.gate.set()
    await asyncio.gather(*held, normal)


async def test_high_priority_goes_ahead_of_queued_work(make):
    model = GatedModel()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, max_queue_delay_s=1.05)
    primed(b)
    held = await queue_behind_a_running_item(b, model, 9)  # ~1.0 s ahead + 0.1 own: full
    refused_at_once(b.submit(["normal"], [10], time.monotonic() + 10))
    # High waits only for the running item (its class is empty): admitted, served next.
    assert b.estimated_delay_s(priority=Priority.HIGH) == pytest.approx(0.1, abs=0.02)
    high = asyncio.create_task(b.submit(["high"], [10], time.monotonic() + 10, Priority.HIGH))
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(*held, high)
    assert model.batches[:2] == [["run"], ["high"]]


async def test_hard_bounds_refuse_whatever_the_deadline(make):
    model = GatedModel()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, max_queue=50, max_queue_tokens=100)
    held = await queue_behind_a_running_item(b, model, 9)  # 90 tokens queued
    info = refused_at_once(b.submit(["big"], [20], time.monotonic() + 60))
    assert "100 tokens" in info.message and info.retry_after_s > 0
    small = asyncio.create_task(b.submit(["small"], [10], time.monotonic() + 60))
    await asyncio.sleep(0)
    assert b.queued == 10
    model.gate.set()
    await asyncio.gather(*held, small)


async def test_nothing_measured_admits_up_to_the_hard_bounds(make):
    model = GatedModel()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, max_queue_delay_s=0.001)
    held = await queue_behind_a_running_item(b, model, 30)
    assert b.estimated_delay_s() == 0.0 and b.queued == 30
    model.gate.set()
    await asyncio.gather(*held)


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


async def test_the_wait_estimate_counts_what_is_left_of_the_running_batch(make):
    model = HeldItems()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, max_queue_delay_s=0.15)
    primed(b)  # 10 tokens ~0.1 s
    held = asyncio.create_task(b.submit(["hold"], [10]))
    await asyncio.to_thread(model.entered.wait, 10)
    # ~0.1 s of the running batch left + 0.1 s own > 0.15 s, though nothing is queued.
    assert 0.05 < b.estimated_delay_s() <= 0.1
    refused_at_once(b.submit(["late"], [10], time.monotonic() + 10))
    model.gate.set()
    await held


async def test_a_batch_still_running_near_the_deadline_is_answered_before_it(make):
    model = GatedModel()
    b = await make(model, max_batch_size=1, max_wait_s=0.0)
    primed(b, per_token_s=0.001)  # 10 tokens ~10 ms: admitted, and it starts at once
    model.gate.clear()  # ... but runs far longer than estimated
    began = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await b.submit(["slow"], [10], deadline=began + 0.2)
    took = time.monotonic() - began
    # Answered at a third of the slack (30 ms of 200) before the deadline, not after it.
    assert 0.15 <= took < 0.2
    assert "could not finish" in info.value.message and info.value.retry_after_s > 0
    model.gate.set()
    assert (await b.submit(["next"], [1]))[0] == ["NEXT"]  # the late result was dropped


async def test_work_handed_to_a_busy_lane_is_shed_unrun_before_the_deadline(make):
    model = HeldItems()
    b = await make(model, max_batch_size=1, max_wait_s=0.0, lanes=1, lane_depth=2)
    primed(b, per_token_s=0.001)
    held = asyncio.create_task(b.submit(["hold"], [10]))
    await asyncio.to_thread(model.entered.wait, 10)
    began = time.monotonic()
    handed = asyncio.create_task(b.submit(["handed"], [10], deadline=began + 0.2))
    await asyncio.sleep(0.05)
    assert b.queued == 0  # it waits on the lane's worker, not in the queue
    with pytest.raises(Overloaded) as info:
        await handed
    # Shed when only its own ~10 ms and half the 30 ms slack were left.
    assert 0.15 <= time.monotonic() - began < 0.2
    assert "could not start" in info.value.message
    model.gate.set()
    await held
    assert [items for _, items in model.batches] == [["hold"]]
