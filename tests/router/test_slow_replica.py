"""A replica 5x slower than its peers gets (almost) no calls at any concurrency.

A discrete-event run with a fake clock: ``callers`` closed-loop callers, three replicas
whose latency does not grow with their concurrency (they batch or run calls side by
side, as the hops do), one of them 5x slower. The router's picking (p2c on the latency
EWMA and in-flight), its outlier ejection and readmission decide every call.
"""

from __future__ import annotations

import heapq
import random

import pytest

from router.attempts import ReplicaSet
from router.balancer import Balancer, cost
from router.outlier import OutlierDetector
from tests.router.policy_fakes import FakeClock, endpoint

FAST_S, SLOW_S = 0.010, 0.050


def run_callers(callers: int, calls: int, *, eject: bool = True, seed: int = 3) -> dict[str, int]:
    """Calls per replica address after ``calls`` calls by ``callers`` callers; without
    ``eject`` the outlier detector never ejects (the balancer alone keeps the slow one
    out, as it must when the latencies seen through the router differ by less than the
    ejection ratio)."""
    clock = FakeClock(0.0)
    rs = ReplicaSet("backbone.v1.EmbeddingService", balancer=Balancer("p2c", random.Random(seed)),
                    outlier=OutlierDetector(ratio=3.0 if eject else 1e9), clock=clock)
    latency = {}
    for address, seconds in (("fast-a:1", FAST_S), ("fast-b:1", FAST_S), ("slow:1", SLOW_S)):
        rs.add(address).healthy = True
        latency[address] = seconds
    jitter = random.Random(seed)
    picked = dict.fromkeys(latency, 0)
    ends: list[tuple[float, int, object, int]] = []
    seq = 0

    def start() -> None:
        nonlocal seq
        ep = rs.balancer.pick(rs.candidates(clock()), 1)
        picked[ep.address] += 1
        token = ep.start(clock())
        seq += 1
        heapq.heappush(ends, (clock() + latency[ep.address] * jitter.uniform(0.9, 1.1), seq, ep, token))

    for _ in range(callers):
        start()
    for _ in range(calls):
        at, _, ep, token = heapq.heappop(ends)
        clock.now = at
        ep.finish(token, at, units=1)
        rs.outlier.evaluate(list(rs.endpoints.values()), at)
        start()
    return picked


@pytest.mark.parametrize(("callers", "eject"), [(1, False), (8, False), (16, False), (8, True)])
def test_a_5x_slower_replica_gets_under_1_percent_of_calls(callers, eject):
    picked = run_callers(callers, 5_000, eject=eject)
    share = picked["slow:1"] / sum(picked.values())
    # p99 is a fast replica's latency only while the slow one gets well under 1 %
    assert share < 0.01, (callers, picked)
    assert min(picked["fast-a:1"], picked["fast-b:1"]) > 0.4 * sum(picked.values())


def test_in_flight_counts_against_the_load_the_latency_was_measured_at():
    # a fast replica running its usual 4 calls still beats an idle 5x slower one
    fast, slow = endpoint("fast:1", ewma=FAST_S), endpoint("slow:1", ewma=SLOW_S)
    for _ in range(4):
        fast.start(0.0)
    for _ in range(100):  # calls that each started beside 4 others
        fast.finish(fast.start(0.0), 0.0, sample=False)
    assert fast.usual_in_flight == pytest.approx(4.0, abs=0.01)
    assert cost(fast, 1, FAST_S) < cost(slow, 1, FAST_S)
    # a burst far beyond the usual makes it the costlier one at once (the usual
    # concurrency is learnt from finished calls only)
    for _ in range(30):
        fast.start(0.0)
    assert cost(fast, 1, FAST_S) > cost(slow, 1, FAST_S)
