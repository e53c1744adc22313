"""ReplicaSet.run: retries, budget, hedging, admission, streams before/after first message.

Replicas are coroutines gated by asyncio.Events; time is a fake clock except for the
hedge timer (asyncio.wait's own timeout, made ~1 ms here).
"""

from __future__ import annotations

import asyncio
import random

import pytest

from router.attempts import AttemptError, Limits, ReplicaSet
from router.breaker import State
from router.errors import DeadlineTooShort, Overloaded, Unavailable
from router.hedging import HedgePolicy
from router.retry_budget import RetryBudget
from tests.router.policy_fakes import FakeClock


def replica_set(n=3, *, budget=None, hedge=None, limits=Limits(backoff_s=0.0), clock=None):
    rs = ReplicaSet("svc", budget=budget or RetryBudget(), limits=limits,
                    hedge=hedge or HedgePolicy(enabled=False), clock=clock or FakeClock(),
                    rng=random.Random(3))
    for i in range(n):
        rs.add(f"r{i}:1").healthy = True
    return rs


async def test_a_replica_failing_every_call_never_exceeds_the_retry_budget():
    rs = replica_set(3, budget=RetryBudget(ratio=0.2, floor=5))
    rs.endpoints["r0:1"].breaker.consecutive = 10**9  # keep it in rotation
    sent = {"r0:1": 0, "r1:1": 0, "r2:1": 0}

    async def attempt(ep, timeout):
        sent[ep.address] += 1
        if ep.address == "r0:1":
            raise AttemptError("UNAVAILABLE")
        return ep.address

    requests = 500
    for _ in range(requests):
        try:
            await rs.run(attempt, deadline=None, replay=True)
        except AttemptError:
            pass
    retries = sum(sent.values()) - requests
    assert 0 < retries <= 5 + 0.2 * requests
    assert rs.budget.granted == retries


async def test_everything_failing_is_bounded_by_the_budget_too():
    rs = replica_set(3, budget=RetryBudget(ratio=0.2, floor=3))
    for ep in rs.endpoints.values():
        ep.breaker.consecutive = 10**9
        ep.breaker.min_calls = 10**9
    calls = 0

    async def attempt(ep, timeout):
        nonlocal calls
        calls += 1
        raise AttemptError("INTERNAL")

    for _ in range(200):
        with pytest.raises(AttemptError):
            await rs.run(attempt, deadline=None, replay=True)
    assert calls - 200 <= 3 + 0.2 * 200


async def test_retries_go_to_another_replica_and_only_when_replayable():
    rs = replica_set(2)
    seen = []

    async def attempt(ep, timeout):
        seen.append(ep.address)
        if len(seen) == 1:
            raise AttemptError("UNAVAILABLE")
        return "ok"

    win = await rs.run(attempt, deadline=None, replay=True)
    assert win.value == "ok" and len(set(seen)) == 2
    seen.clear()
    with pytest.raises(AttemptError):
        await rs.run(attempt, deadline=None, replay=False)
    assert len(seen) == 1


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"])
async def test_callers_errors_are_relayed_not_retried_and_never_open_breakers(code):
    rs = replica_set(2)
    calls = 0

    async def attempt(ep, timeout):
        nonlocal calls
        calls += 1
        raise AttemptError(code)

    for _ in range(50):
        with pytest.raises(AttemptError):
            await rs.run(attempt, deadline=None, replay=True)
    assert calls == 50
    assert all(ep.breaker.state is State.CLOSED for ep in rs.endpoints.values())


async def test_hedge_wins_and_the_slow_attempt_is_cancelled():
    rs = replica_set(2, hedge=HedgePolicy(min_samples=1, min_s=0.001, max_s=0.001))
    for ep in rs.endpoints.values():
        ep.observe(0.001)
    never = asyncio.Event()
    cancelled = []

    async def attempt(ep, timeout):
        if ep is first_pick[0]:
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.append(ep.address)
                raise
        return ep.address

    first_pick = []
    original = rs.balancer.pick

    def pick(cands, units=1, now=None):
        ep = original(cands, units, now)
        if not first_pick:
            first_pick.append(ep)
        return ep

    rs.balancer.pick = pick
    win = await rs.run(attempt, deadline=None, replay=True, hedge=True)
    await asyncio.sleep(0)
    assert win.value != first_pick[0].address
    assert cancelled == [first_pick[0].address]
    assert rs.budget.granted == 1, "the hedge is paid from the budget"
    assert all(ep.in_flight == 0 for ep in rs.endpoints.values())
    # the first attempt went unanswered (evidence of a hang), the winner answered
    assert first_pick[0].unanswered_in_row == 1
    assert all(ep.unanswered_in_row == 0 for ep in rs.endpoints.values() if ep is not first_pick[0])


async def test_a_hedge_that_loses_to_the_first_attempt_is_no_evidence_of_a_hang():
    rs = replica_set(2, hedge=HedgePolicy(min_samples=1, min_s=0.001, max_s=0.001))
    for ep in rs.endpoints.values():
        ep.observe(0.001)
    first_answers = asyncio.Event()
    picks = []
    original = rs.balancer.pick

    def pick(cands, units=1, now=None):
        ep = original(cands, units, now)
        picks.append(ep)
        return ep

    async def attempt(ep, timeout):
        if ep is picks[0]:  # slower than the hedge delay, but it answers first
            await asyncio.sleep(0.01)
            first_answers.set()
            return "first"
        await asyncio.Event().wait()  # the hedge never answers before the first does

    rs.balancer.pick = pick
    win = await rs.run(attempt, deadline=None, replay=True, hedge=True)
    assert win.value == "first" and len(picks) == 2, "a hedge was sent and lost"
    assert all(ep.unanswered_in_row == 0 for ep in rs.endpoints.values())


async def test_no_hedge_without_budget():
    rs = replica_set(2, budget=RetryBudget(ratio=0.0, floor=0),
                     hedge=HedgePolicy(min_samples=1, min_s=0.001, max_s=0.001))
    for ep in rs.endpoints.values():
        ep.observe(0.001)
    gate = asyncio.Event()
    calls = []

    async def attempt(ep, timeout):
        calls.append(ep.address)
        await gate.wait()
        return ep.address

    task = asyncio.ensure_future(rs.run(attempt, deadline=None, replay=True, hedge=True))
    await asyncio.sleep(0.02)
    gate.set()
    await task
    assert len(calls) == 1


async def test_generate_is_retried_before_its_first_message_never_after():
    rs = replica_set(2)
    seen = []

    async def open_stream(ep, timeout):  # returns once the first message came
        seen.append(ep.address)
        if len(seen) == 1:
            raise AttemptError("UNAVAILABLE")  # before any message: retried
        return "first token"

    win = await rs.run(open_stream, deadline=None, replay=True, first_message=True,
                       keep_open=True)
    assert win.value == "first token" and len(seen) == 2
    assert rs.in_flight == 1 and win.endpoint.in_flight == 1
    # the stream then fails mid-way: the router only relays it, no attempt is started
    rs.finish_stream(win, AttemptError("UNAVAILABLE"), caller_cancelled=False)
    assert len(seen) == 2
    assert rs.in_flight == 0 and win.endpoint.in_flight == 0
    assert win.endpoint.failures == 1


async def test_refusals_before_forwarding():
    clock = FakeClock()
    rs = replica_set(2, clock=clock, limits=Limits(max_in_flight=1))
    for ep in rs.endpoints.values():
        ep.observe(0.050)
    with pytest.raises(DeadlineTooShort):
        rs.admit(clock() + 0.010, 1)
    rs.admit(clock() + 0.100, 1)
    rs.in_flight = 1
    with pytest.raises(Overloaded) as exc:
        rs.admit(None, 1)
    assert exc.value.retry_after_s
    rs.in_flight = 0
    for ep in rs.endpoints.values():
        ep.healthy = False
    with pytest.raises(Unavailable):
        rs.admit(None, 1)


async def test_caller_cancel_cancels_every_attempt():
    rs = replica_set(2)
    gate = asyncio.Event()
    cancelled = asyncio.Event()

    async def attempt(ep, timeout):
        try:
            await gate.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.ensure_future(rs.run(attempt, deadline=None, replay=True))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(cancelled.wait(), 1)
    assert rs.in_flight == 0
    assert all(ep.breaker.state is State.CLOSED for ep in rs.endpoints.values())
