"""Per-replica state the router balances on: latency per unit of work, recent tail,
in-flight calls, the load the replica reports, counters, health and weight.

No grpc imports and no clock of its own: every method that depends on time takes
``now`` (``time.monotonic()`` in production, a fake clock in tests).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.breaker import CircuitBreaker

# Weight of a new sample in the latency EWMA.
EWMA_ALPHA = 0.2
# Samples kept for the recent p95/p99.
WINDOW = 128
# Per-unit latencies kept for the recent median (the outlier detector's view, which one
# cold or unlucky call must not sway).
RECENT = 16
# An estimate above its peers' median that no call has refreshed for this long counts
# half as far above the median (it keeps halving): what a replica was like seconds ago,
# during a hiccup, a reconnect or a cold start, is not what it is like now.
STALE_HALF_LIFE_S = 0.5
# After this many half-lives the old estimate is forgotten (the replica costs the median,
# as a new one does): a decay alone never crosses a peer that sits at the median.
STALE_FORGET_HALF_LIVES = 4
# A replica whose call after a stale spell comes in at this many times the median again is
# slow, not unlucky: its next spell lasts twice as long (up to STALE_MAX_HALF_LIFE_S), so
# a slow replica that no caller needs is probed ever more rarely (with one caller on 10 ms
# calls a probe every 0.5 s was 2 % of the calls, enough to set the p99). A call that
# comes in under it puts the spell back to STALE_HALF_LIFE_S.
SLOW_CONFIRM_RATIO = 2.0
# ... and at least this much slower than the median in that call's own time: a
# sub-millisecond replica comes in at 2x its median at every scheduling hiccup (a fresh
# process's first calls, a busy host), and doubling its spell for that starved a replica
# that had just joined for over 5 s in a CI run (the outlier detector's floor, 5 ms, for
# the same reason).
SLOW_CONFIRM_MIN_S = 0.005
STALE_MAX_HALF_LIFE_S = 8.0
# A replica with fewer samples than this since it joined (or came back) costs at most its
# peers' median, and its estimate starts from the fastest of them: its first calls run
# through a fresh process or connection, and one of them lost to a hedge is a censored
# sample of the hedge delay, 5-10x a sub-millisecond median, which would keep it out of
# every pair until a stale spell ends (~2 s each; a CI run saw a joining replica get no
# call in 5 s).
WARMUP_SAMPLES = 3


class LatencyWindow:
    """The last ``size`` latencies (seconds) and their percentiles."""

    def __init__(self, size: int = WINDOW) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        """Record one latency."""
        self._samples.append(seconds)

    def __len__(self) -> int:
        return len(self._samples)

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the window (nearest rank); None when empty."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


@dataclass
class Endpoint:
    """One replica of one service, as this router sees it.

    Invariants: ``in_flight`` equals the started minus finished calls (``start`` returns
    a token that ``finish`` or ``abandon`` consumes exactly once); ``ewma_per_unit_s``
    is None until the first completed call.
    """

    service: str
    address: str
    breaker: CircuitBreaker
    #: Health from the replica's grpc.health.v1 Watch: None unknown, True SERVING.
    healthy: bool | None = None
    #: False once discovery dropped the address (calls in flight may still finish).
    active: bool = True
    ewma_per_unit_s: float | None = None
    #: When the EWMA last took a sample (None: never, or no clock given).
    sampled_at: float | None = None
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    #: The last ``RECENT`` latencies per unit of work.
    recent_per_unit: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    #: Time to first streamed message (Generate's TTFT).
    first_message: LatencyWindow = field(default_factory=LatencyWindow)
    #: What the replica last reported in trailing metadata.
    reported_wait_s: float = 0.0
    reported_in_flight: int = 0
    #: RESOURCE_EXHAUSTED pushback: not picked before this instant; weight halves on
    #: each pushback and recovers on successes (never above 1, never below MIN_WEIGHT).
    pushback_until: float = 0.0
    weight: float = 1.0
    #: Latency-outlier ejection: out of rotation until this instant.
    ejected_until: float = 0.0
    ejections: int = 0
    #: First attempts in a row that ended without an answer from the replica (a hedge to
    #: another replica won first, a fair deadline ran out): a hung replica's signature even when
    #: hedging keeps every such attempt short. Any answer, error answers included, resets it.
    unanswered_in_row: int = 0
    #: When the first attempt of that streak started.
    unanswered_since: float = 0.0
    #: The half-life of this replica's stale estimate (see SLOW_CONFIRM_RATIO).
    stale_half_life_s: float = STALE_HALF_LIFE_S
    #: The peers' median the last decay was computed against (None: no decay since the
    #: last sample); the next sample is judged against it.
    decayed_against: float | None = None
    calls: int = 0
    failures: int = 0
    retries: int = 0
    hedges: int = 0
    _started: dict[int, float] = field(default_factory=dict)
    #: Calls in flight that have not answered yet (a stream leaves at its first message).
    _awaiting: dict[int, float] = field(default_factory=dict)
    _tokens: itertools.count = field(default_factory=itertools.count)

    MIN_WEIGHT = 0.05

    @property
    def in_flight(self) -> int:
        """Calls this router has running on the replica now."""
        return len(self._started)

    def oldest_in_flight_s(self, now: float) -> float:
        """Age of the oldest call in flight that has not answered yet (0 when none): a
        hung replica shows here long before any of its calls completes. A stream that
        sent its first message is no longer waited on (a long Generate is not a hang)."""
        return max((now - t for t in self._awaiting.values()), default=0.0)

    def answered(self, token: int) -> None:
        """The call ``token`` answered (a stream's first message); it stays in flight."""
        self._awaiting.pop(token, None)

    def set_health(self, healthy: bool) -> None:
        """Record the replica's reported health. Coming back to SERVING (a restart, the end
        of a NOT_SERVING spell) it starts with a fresh estimate, the peers' median, as after
        an ejection: the latencies of its last calls before it went away (cut, timed out)
        are not its speed now, and an inflated estimate would starve it of the calls that
        would correct it."""
        if healthy and self.healthy is False:
            self.forget_estimate()
            self.stale_half_life_s = STALE_HALF_LIFE_S
            self.unanswered_in_row = 0
        self.healthy = healthy

    def forget_estimate(self) -> None:
        """Drop the latency estimate (back to the peers' median until new samples)."""
        self.ewma_per_unit_s = None
        self.sampled_at = None
        self.recent_per_unit.clear()

    def typical_per_unit_s(self) -> float | None:
        """The lower of the EWMA and the median of the last ``RECENT`` samples: what the
        replica is like, not one slow call (a cold first call seeds the EWMA at its
        own latency; the median of the last 16 forgets it after nine fast ones)."""
        if self.ewma_per_unit_s is None:
            return None
        if not self.recent_per_unit:
            return self.ewma_per_unit_s
        ordered = sorted(self.recent_per_unit)
        return min(self.ewma_per_unit_s, ordered[len(ordered) // 2])

    def start(self, now: float) -> int:
        """Count a call as started; returns its token."""
        token = next(self._tokens)
        self._started[token] = now
        self._awaiting[token] = now
        self.calls += 1
        return token

    def finish(self, token: int, now: float, *, units: int = 1, ok: bool = True,
               sample: bool = True, answered: bool | None = True) -> float:
        """Count the call ``token`` as ended; with ``sample`` its latency (per unit of
        work) feeds the EWMA and the window. ``answered``: the replica answered (True),
        did not (False: abandoned or timed out), or it says nothing (None: the caller
        left). Returns the call's latency."""
        began = self._started.pop(token, now)
        self._awaiting.pop(token, None)
        if answered:
            self.unanswered_in_row = 0
        elif answered is False:
            if self.unanswered_in_row == 0:
                self.unanswered_since = began
            self.unanswered_in_row += 1
        elapsed = max(0.0, now - began)
        if not ok:
            self.failures += 1
        if sample:
            self.observe(elapsed, units, now=now)
        if ok and self.weight < 1.0:
            self.weight = min(1.0, self.weight * 1.1)
        return elapsed

    def observe(self, elapsed_s: float, units: int = 1, *, now: float | None = None) -> None:
        """Feed one latency of a call of ``units`` units of work. A sample after a stale
        spell (no sample for ``STALE_HALF_LIFE_S``) that is below the stored estimate
        replaces it: the spell was starving the replica because of that old estimate,
        and one fresh call says more about it now. A higher one blends in as usual (the
        stored estimate of a really slow replica was never lowered by the decay, which
        only the balancer applies, so it stays where it was). A sample that ends a decay
        sets the next spell's length (``SLOW_CONFIRM_RATIO``). The first
        ``WARMUP_SAMPLES`` samples keep the fastest of them."""
        per_unit = elapsed_s / max(1, units)
        stale = (now is not None and self.sampled_at is not None
                 and now - self.sampled_at > STALE_HALF_LIFE_S)
        if self.decayed_against is not None:
            median = self.decayed_against
            if (per_unit >= SLOW_CONFIRM_RATIO * median
                    and (per_unit - median) * max(1, units) >= SLOW_CONFIRM_MIN_S):
                self.stale_half_life_s = min(STALE_MAX_HALF_LIFE_S, 2 * self.stale_half_life_s)
            else:
                self.stale_half_life_s = STALE_HALF_LIFE_S
            self.decayed_against = None
        if now is not None:
            self.sampled_at = now
        warming = self.warming
        if self.ewma_per_unit_s is None or ((stale or warming)
                                            and per_unit < self.ewma_per_unit_s):
            self.ewma_per_unit_s = per_unit
        elif not warming:  # while warming up the fastest first call holds it
            self.ewma_per_unit_s += EWMA_ALPHA * (per_unit - self.ewma_per_unit_s)
        self.recent_per_unit.append(per_unit)
        self.latency.add(elapsed_s)

    @property
    def warming(self) -> bool:
        """Fewer than ``WARMUP_SAMPLES`` samples since it joined or came back."""
        return len(self.recent_per_unit) < WARMUP_SAMPLES

    def fresh(self, now: float | None) -> bool:
        """True when the estimate took a sample within ``STALE_HALF_LIFE_S`` of ``now``
        (or no clock is given)."""
        return now is None or (self.sampled_at is not None
                               and now - self.sampled_at <= STALE_HALF_LIFE_S)

    def estimate_per_unit_s(self, now: float | None, median: float) -> float | None:
        """The EWMA as the balancer should believe it at ``now``: an estimate above the
        peers' ``median`` decays toward it with the time since its last sample (half
        of the excess per ``stale_half_life_s``, the median itself after
        ``STALE_FORGET_HALF_LIVES``), so a replica starved by one bad spell is tried again
        within a few half-lives and its next sample sets it right. While it has fewer
        than ``WARMUP_SAMPLES`` samples it costs at most the median."""
        ewma = self.ewma_per_unit_s
        if ewma is None or ewma <= median:
            return ewma
        if self.warming:
            return median
        if now is None or self.sampled_at is None:
            return ewma
        age = now - self.sampled_at
        half_life = self.stale_half_life_s
        if age <= half_life:
            return ewma
        self.decayed_against = median
        if age >= STALE_FORGET_HALF_LIVES * half_life:
            return median
        return median + (ewma - median) * 0.5 ** (age / half_life)

    def report(self, wait_s: float | None, in_flight: int | None) -> None:
        """Record the load the replica reported with an answer."""
        if wait_s is not None:
            self.reported_wait_s = max(0.0, wait_s)
        if in_flight is not None:
            self.reported_in_flight = max(0, in_flight)

    def push_back(self, now: float, retry_after_s: float | None) -> None:
        """RESOURCE_EXHAUSTED from the replica: keep off it for its RetryInfo delay and
        lower its weight (the breaker does not count this)."""
        self.pushback_until = max(self.pushback_until, now + (retry_after_s or 0.0))
        self.weight = max(self.MIN_WEIGHT, self.weight / 2)

    def in_rotation(self, now: float) -> bool:
        """True when the balancer may pick it: active, healthy, breaker lets a call
        through, not ejected and not pushed back."""
        return (
            self.active
            and self.healthy is True
            and now >= self.ejected_until
            and now >= self.pushback_until
            and self.breaker.allows(now)
        )

    def usable(self, now: float) -> bool:
        """The fallback set once ejections took out every replica: active, healthy and
        breaker not open."""
        return self.active and self.healthy is True and self.breaker.allows(now)


def merged_percentile(endpoints: list[Endpoint], q: float, *, first: bool = False) -> float | None:
    """The ``q`` quantile over the recent windows of ``endpoints`` together (the
    replica set's recent tail); ``first`` uses the time-to-first-message windows."""
    samples: list[float] = []
    for ep in endpoints:
        samples.extend((ep.first_message if first else ep.latency)._samples)
    if not samples:
        return None
    samples.sort()
    return samples[min(len(samples) - 1, max(0, int(q * len(samples) + 0.5) - 1))]
