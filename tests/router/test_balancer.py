"""Picking: p2c on latency per unit of work, in-flight and reported queue wait."""

from __future__ import annotations

import collections
import random

import pytest

from router import endpoints
from router.balancer import Balancer, cost
from router.endpoints import Endpoint
from router.outlier import OutlierDetector
from tests.router.policy_fakes import endpoint


def test_p2c_prefers_the_fast_replica():
    fast = [endpoint(f"f{i}:1", ewma=0.001) for i in range(2)]
    slow = endpoint("slow:1", ewma=0.005)
    balancer = Balancer("p2c", random.Random(7))
    picks = collections.Counter(balancer.pick([*fast, slow]).address for _ in range(3000))
    # the slow one wins no pair it is in: never picked
    assert picks["slow:1"] == 0
    assert picks["f0:1"] > 1200 and picks["f1:1"] > 1200


def test_in_flight_and_reported_queue_wait_raise_the_cost():
    a, b = endpoint("a:1", ewma=0.001), endpoint("b:1", ewma=0.001)
    for _ in range(5):
        a.start(0.0)
    assert cost(a, 1, 0.0) > cost(b, 1, 0.0)
    balancer = Balancer("p2c", random.Random(1))
    assert all(balancer.pick([a, b]) is b for _ in range(20))
    c = endpoint("c:1", ewma=0.001)
    c.report(0.050, 3)
    assert balancer.pick([b, c]) is b


def test_cost_is_per_unit_of_work():
    # a replica that did a 32-text call in 32 ms is as fast as one doing 1 text in 1 ms
    big, small = endpoint("big:1"), endpoint("small:1")
    big.observe(0.032, units=32)
    small.observe(0.001, units=1)
    assert big.ewma_per_unit_s == pytest.approx(small.ewma_per_unit_s)


def test_unknown_replica_gets_the_peers_median():
    new = endpoint("new:1")
    old = endpoint("old:1", ewma=0.002)
    assert cost(new, 1, 0.002) == pytest.approx(cost(old, 1, 0.002))


def test_round_robin_and_least_request():
    eps = [endpoint(f"e{i}:1", ewma=0.001 * (i + 1)) for i in range(3)]
    rr = Balancer("round_robin")
    assert [rr.pick(eps).address for _ in range(6)] == ["e0:1", "e1:1", "e2:1"] * 2
    eps[0].start(0.0)
    eps[1].start(0.0)
    assert Balancer("least_request").pick(eps) is eps[2]
    with pytest.raises(ValueError):
        Balancer("random")


def test_outlier_is_ejected_for_growing_times_and_share_is_capped():
    eps = [endpoint(f"e{i}:1", ewma=0.001, samples=10) for i in range(4)]
    for _ in range(10):
        eps[0].observe(0.050)
        eps[1].observe(0.060)
    eps[0].ewma_per_unit_s = 0.050
    eps[1].ewma_per_unit_s = 0.060
    detector = OutlierDetector(ratio=3.0, base_s=2.0, max_share=0.25)
    ejected = detector.evaluate(eps, now=0.0)
    assert ejected == [eps[1]], "worst first, and only 25 % of 4 replicas"
    assert not eps[1].in_rotation(1.0) and eps[1].in_rotation(2.0)
    # ejected again later: twice as long
    eps[1].ewma_per_unit_s = 0.060
    for _ in range(10):
        eps[1].observe(0.060)
    assert detector.evaluate(eps, now=3.0) == [eps[1]]
    assert eps[1].ejected_until == pytest.approx(3.0 + 4.0)


def test_a_hung_replica_is_an_outlier_before_any_call_completes():
    eps = [endpoint(f"e{i}:1", ewma=0.001, samples=10) for i in range(3)]
    eps[2].start(0.0)  # never finishes
    detector = OutlierDetector(ratio=3.0)
    assert detector.evaluate(eps, now=0.002) == []
    assert detector.evaluate(eps, now=0.5) == [eps[2]]


def test_one_cold_first_call_does_not_make_an_outlier():
    # A replica's first call paid for a new connection (40 ms), the next ones are as fast as
    # its peers': no outlier, its estimate starts from its fastest first call (warm-up),
    # and a call of it in flight for 1 ms does not let it skip the sample count either.
    eps = [endpoint(f"e{i}:1", ewma=0.0005, samples=10) for i in range(3)]
    cold = endpoint("cold:1")
    cold.observe(0.040)
    cold.start(0.0)
    detector = OutlierDetector(ratio=3.0, min_excess_s=0.005)
    assert detector.evaluate([*eps, cold], now=0.001) == []
    for _ in range(4):
        cold.observe(0.0005)
    assert cold.ewma_per_unit_s == pytest.approx(0.0005)
    assert detector.evaluate([*eps, cold], now=0.001) == []
    # really slow (every recent sample) is an outlier
    for _ in range(5):
        cold.observe(0.040)
    assert detector.evaluate([*eps, cold], now=0.001) == [cold]


def test_two_replicas_one_may_go_one_alone_never():
    detector = OutlierDetector(max_share=0.5)
    assert detector.max_ejected(1) == 0
    assert detector.max_ejected(2) == 1
    assert detector.max_ejected(3) == 1


def test_a_replica_whose_hedged_attempts_never_answer_is_ejected():
    # Hedging keeps a hung replica's abandoned attempts as short as the hedge delay, so
    # its latency does not stand out (4 ms vs 2 ms peers is under the 3x ratio); three
    # (here; 5 by default) first attempts in a row without an answer eject it anyway, and any answer resets the count.
    eps = [endpoint(f"r{i}:1", ewma=0.002, samples=10) for i in range(3)]
    hung = eps[0]
    hung.ewma_per_unit_s = 0.004
    detector = OutlierDetector(ratio=3.0, unanswered=3)
    for answered in (False, False, True, False, False):  # first attempts outrun by hedges
        hung.finish(hung.start(0.0), 0.004, sample=False, answered=answered)
    assert detector.evaluate(eps, now=0.0) == [], "an answer in between: not hung"
    hung.finish(hung.start(0.0), 0.004, sample=False, answered=False)
    # 3 in a row within 4 ms: the calls of one stall (a busy host), not a hang yet
    assert detector.evaluate(eps, now=0.004) == []
    hung.finish(hung.start(0.3), 0.304, sample=False, answered=False)
    assert detector.evaluate(eps, now=0.304) == [hung], "a streak over 0.3 s"
    assert hung.unanswered_in_row == 0 and hung.ejected_until > 0
    # the caller leaving says nothing about the replica
    other = eps[1]
    for _ in range(5):
        other.finish(other.start(1.0), 1.001, sample=False, answered=None)
    assert other.unanswered_in_row == 0


def test_a_replica_back_to_serving_starts_from_a_fresh_estimate():
    ep = endpoint("r:1", ewma=2.5, samples=10)  # its last calls were cut by a restart
    ep.set_health(False)
    assert ep.ewma_per_unit_s == 2.5
    ep.set_health(True)
    assert ep.ewma_per_unit_s is None, "costs the peers' median again: it gets calls"
    ep.observe(0.01)
    ep.set_health(True)  # SERVING again while serving: no reset
    assert ep.ewma_per_unit_s == 0.01


def test_a_stale_high_estimate_decays_so_a_starved_replica_is_tried_again():
    # One sequential caller, three equal 1 ms replicas; one had a 20 ms hiccup (a
    # reconnect) and, in flight never above 1, it would lose every pair for good.
    clock = 0.0
    eps = [endpoint(f"e{i}:1") for i in range(3)]
    for ep in eps:
        ep.observe(0.001, now=clock)
    eps[2].observe(0.020, now=clock)
    eps[2].ewma_per_unit_s = 0.020
    balancer = Balancer("p2c", random.Random(5))
    picks = collections.Counter()
    for _ in range(6000):  # 6 s of 1 ms calls
        ep = balancer.pick(eps, 1, clock)
        token = ep.start(clock)
        clock += 0.001
        ep.finish(token, clock)
        picks[ep.address] += 1
    assert picks["e2:1"] > 0.25 * sum(picks.values()), picks
    assert eps[2].ewma_per_unit_s == pytest.approx(0.001)
    # without a clock nothing decays: the old behaviour, kept for callers without one
    assert cost(eps[2], 1, 0.001) == pytest.approx(cost(eps[0], 1, 0.001))


def test_a_really_slow_replica_pays_one_call_per_stale_spell():
    clock = 0.0
    fast = [endpoint(f"f{i}:1") for i in range(2)]
    slow = endpoint("slow:1")
    for ep in fast:
        ep.observe(0.001, now=clock)
    slow.observe(0.010, now=clock)
    balancer = Balancer("p2c", random.Random(9))
    picks = collections.Counter()
    for _ in range(5000):  # ~5 s of calls
        ep = balancer.pick([*fast, slow], 1, clock)
        token = ep.start(clock)
        clock += 0.010 if ep is slow else 0.001
        ep.finish(token, clock)
        picks[ep.address] += 1
    # its sample after each stale spell puts it back at 10x: a few probes a second
    assert 0 < picks["slow:1"] < 0.01 * sum(picks.values()), picks


def test_a_replica_confirmed_slow_is_probed_ever_more_rarely_until_it_recovers():
    # One sequential caller on 2 ms calls; the third replica takes 20 ms. Each probe that
    # finds it slow again doubles its next stale spell (0.5 s up to 8 s half-lives); the
    # first fast probe after it recovers puts the spell back, and it gets calls again.
    clock = 0.0
    fast = [endpoint(f"f{i}:1") for i in range(2)]
    slow = endpoint("slow:1")
    for ep in fast:
        ep.observe(0.002, now=clock)
    slow.observe(0.020, now=clock)
    balancer = Balancer("p2c", random.Random(3))
    probes: list[float] = []
    slow_s = 0.020

    def call() -> Endpoint:
        nonlocal clock
        ep = balancer.pick([*fast, slow], 1, clock)
        token = ep.start(clock)
        clock += slow_s if ep is slow else 0.002
        ep.finish(token, clock)
        return ep

    while clock < 90.0:
        if call() is slow:
            probes.append(clock)
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert 4 <= len(probes) <= 8, probes  # a fixed 0.5 s half-life: ~45 probes
    assert gaps == sorted(gaps) and gaps[-1] >= 4 * gaps[0], gaps
    assert slow.stale_half_life_s == endpoints.STALE_MAX_HALF_LIFE_S
    slow_s = 0.002  # it recovers
    picks = collections.Counter(call().address for _ in range(40_000))  # ~80 s
    assert slow.stale_half_life_s == endpoints.STALE_HALF_LIFE_S
    assert picks["slow:1"] > 0.1 * sum(picks.values()), picks


def test_a_joining_replica_whose_first_calls_were_cold_still_gets_its_share():
    # One sequential caller, peers at ~0.3 ms. A replica that just joined lost its first
    # two calls to hedges (censored samples of 2.5 ms, 8x the median): in warm-up it
    # still costs the median, so its third call comes at once and it gets its share
    # (a CI run saw a joining host get no call for 5 s when one cold call kept it out).
    rng = random.Random(4)
    clock = 0.0
    peers = [endpoint(f"p{i}:1") for i in range(2)]
    new = endpoint("new:1")
    for ep in peers:
        ep.observe(0.0003, now=clock)
    balancer = Balancer("p2c", random.Random(11))
    cold = iter([0.0025, 0.0025])
    picks: list[float] = []
    calls = 0
    while clock < 2.0:
        ep = balancer.pick([*peers, new], 1, clock)
        token = ep.start(clock)
        clock += (next(cold, None) if ep is new else None) or rng.uniform(0.00025, 0.00035)
        ep.finish(token, clock)
        calls += 1
        if ep is new:
            picks.append(clock)
    assert len(picks) >= 3 and picks[2] < 0.05, picks[:3]
    assert len(picks) > 0.2 * calls, (len(picks), calls)


def test_a_sub_millisecond_probe_two_hiccups_slower_does_not_lengthen_the_spell():
    # Peers at 0.3 ms; a replica's stale estimate (1 ms) decayed and its probe came in at
    # 1 ms: 3x the median but only 0.7 ms above it, a scheduling hiccup, not slowness
    # (SLOW_CONFIRM_MIN_S). Its next spell stays 0.5 s; a probe 20 ms slow doubles it.
    peers = [endpoint(f"p{i}:1", ewma=0.0003) for i in range(2)]
    probed = endpoint("probed:1", ewma=0.001)
    for ep in [*peers, probed]:
        ep.sampled_at = 0.0
    balancer = Balancer("p2c", random.Random(2))
    for now, latency, half_life in ((1.0, 0.001, endpoints.STALE_HALF_LIFE_S),
                                    (3.0, 0.020, 2 * endpoints.STALE_HALF_LIFE_S)):
        for ep in peers:
            ep.sampled_at = now
        assert cost(probed, 1, 0.0003, now) < cost(probed, 1, 0.0003), "decayed"
        probed.observe(latency, now=now)
        assert probed.stale_half_life_s == half_life
        probed.ewma_per_unit_s = 0.001
    assert balancer.pick([*peers, probed], 1, 3.0) in peers


def test_a_short_stall_or_a_long_stream_is_not_a_hang():
    # Peers answer in 0.5 ms. A 10 ms scheduling stall leaves calls waiting 20x that:
    # not ejected (under hang_min_s). A stream that sent its first message 5 s ago is
    # answered, however long it runs; one waiting 0.3 s for its first message is stuck.
    eps = [endpoint(f"e{i}:1", ewma=0.0005, samples=10) for i in range(3)]
    for ep in eps:
        for _ in range(10):
            ep.latency.add(0.0005)
    detector = OutlierDetector(ratio=3.0)
    stalled = eps[0]
    stalled.start(0.0)
    stalled.start(0.001)
    assert detector.evaluate(eps, now=0.010) == []
    stream = eps[1]
    token = stream.start(0.0)
    stream.answered(token)
    assert stream.in_flight == 1 and stream.oldest_in_flight_s(5.0) == 0.0
    assert detector.evaluate(eps[1:], now=5.0) == []
    waiting = eps[2]
    waiting.start(5.0)
    assert detector.evaluate(eps[1:], now=5.3) == [waiting]
