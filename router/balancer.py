"""Replica picking: power of two choices on a latency-aware cost, or round robin or least
request for comparison.

Cost of sending a call of ``units`` units of work to a replica (seconds, lower is
better)::

    (ewma_per_unit * units) * (1 + in_flight) + reported_queue_wait, divided by weight

``in_flight`` is this router's calls running there and ``reported_queue_wait`` what the
replica said its queue would make a new call wait (so several routers see one load). The
in-flight factor is what spreads calls over equal replicas and what gives a replica whose
estimate came out high (a cold first call, a past hiccup) the calls that correct it.
Normalising it by the concurrency the EWMA was measured at was tried: it kept an idle 5x
slower replica under 0.2 % of calls without ejection, but it let equal replicas drift
apart (the one that got most calls learnt that load as "usual" and kept them: one of
three equal replicas down to 9.5 % of calls at 16 callers in the discrete-event run of
tests/router/test_slow_replica.py, 33 % each with this cost). With this cost a 5x slower
replica takes 2-3 % of calls at 8-16 callers before the outlier detector ejects it, and
0.1 % once it does (it is over the 3x ratio).
A replica with no sample yet costs the median of its peers' EWMA (it gets traffic, and
so samples, at once). An estimate above that median decays toward it while no call
refreshes it (``Endpoint.estimate_per_unit_s``): with sequential callers the in-flight
factor stays near 1, and one hiccup (a reconnect, a scheduling stall) that made a
replica's estimate 10x its peers' would otherwise keep it out of every pair for good
(one of three equal replicas got 4 % of the calls in a CI run before this). A replica
that is really slow pays one call per stale spell: its stored estimate stays high and
that call refreshes it; each such call that finds it slow again makes the next spell
twice as long (``endpoints.SLOW_CONFIRM_RATIO``). No grpc imports.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Sequence

from router.endpoints import Endpoint

POLICIES = ("p2c", "round_robin", "least_request")


def cost(ep: Endpoint, units: int, default_per_unit: float, now: float | None = None) -> float:
    """The expected time for a call of ``units`` units on ``ep`` at ``now`` (see the
    module doc; without ``now`` no estimate decays)."""
    per_unit = ep.estimate_per_unit_s(now, default_per_unit)
    if per_unit is None:
        per_unit = default_per_unit
    work = per_unit * max(1, units)
    load = 1 + ep.in_flight
    return (work * load + ep.reported_wait_s) / max(ep.weight, Endpoint.MIN_WEIGHT)


def _default_per_unit(candidates: Sequence[Endpoint], now: float | None = None) -> float:
    """The median of the candidates' estimates, of the fresh ones when any is fresh: a
    stale estimate must not hold up the median it decays toward."""
    fresh: list[float] = []
    stale: list[float] = []
    for ep in candidates:  # one pass: this runs on every pick
        if ep.ewma_per_unit_s is not None:
            (fresh if ep.fresh(now) else stale).append(ep.ewma_per_unit_s)
    known = fresh or stale
    return statistics.median(known) if known else 0.0


class Balancer:
    """Picks one replica among candidates with the configured policy."""

    def __init__(self, policy: str = "p2c", rng: random.Random | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"balancer policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.policy = policy
        self.rng = rng or random.Random()
        self._rr = itertools.count()

    def pick(self, candidates: Sequence[Endpoint], units: int = 1,
             now: float | None = None) -> Endpoint | None:
        """The replica to send the call to; None when ``candidates`` is empty. ``now``
        (the router's clock) lets stale estimates decay."""
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if self.policy == "round_robin":
            return candidates[next(self._rr) % len(candidates)]
        if self.policy == "least_request":
            low = min(ep.in_flight for ep in candidates)
            return self.rng.choice([ep for ep in candidates if ep.in_flight == low])
        n = len(candidates)  # a uniform random pair (random.sample costs more than the pick)
        i, j = self.rng.randrange(n), self.rng.randrange(n - 1)
        a, b = candidates[i], candidates[j + (j >= i)]
        default = _default_per_unit(candidates, now)
        return a if cost(a, units, default, now) <= cost(b, units, default, now) else b

    def estimate_s(self, candidates: Sequence[Endpoint], units: int = 1) -> float | None:
        """The lowest expected latency of a call among ``candidates`` (for refusing a
        deadline nobody can meet); None when no replica has a sample yet."""
        known = [ep for ep in candidates if ep.ewma_per_unit_s is not None]
        if not known:
            return None
        # Unloaded time: the work and the reported queue, not this router's in-flight
        # multiplier (batching hops run concurrent calls together).
        return min(ep.ewma_per_unit_s * max(1, units) + ep.reported_wait_s for ep in known)
