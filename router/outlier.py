"""Latency-outlier ejection: a replica whose recent latency per unit of work is far above
its peers' leaves rotation for a while.

A replica is an outlier when its per-unit latency (the larger of its EWMA and the age of
its oldest call in flight, so a hung replica shows before any call completes) exceeds
``ratio`` times the median of its peers' and is at least ``min_excess_s`` above it.
A replica whose last ``unanswered`` (5) first attempts in a row all ended without its answer
(a hedge to another replica won first, a fair deadline ran out) is an outlier too, whatever its latency figures:
with hedging, a hung replica's abandoned calls stay as short as the hedge delay, so its
latency alone need not stand out. Ejection lasts ``base_s * 2 ** (times ejected
before)``, at most ``max_s``. At most ``max_share`` of a service's replicas (rounded down,
but 1 when there are 2 or more) are ejected at once; the balancer falls back to every
usable replica when none is left in rotation. No grpc imports, no clock of its own.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence

from router.endpoints import Endpoint

log = logging.getLogger(__name__)


class OutlierDetector:
    """Ejects latency outliers among one service's replicas (see the module doc)."""

    def __init__(
        self,
        *,
        ratio: float = 3.0,
        min_excess_s: float = 0.005,
        min_samples: int = 5,
        unanswered: int = 5,
        base_s: float = 2.0,
        max_s: float = 60.0,
        max_share: float = 0.5,
        on_eject: Callable[[Endpoint, float], None] | None = None,
    ) -> None:
        self.ratio = ratio
        self.min_excess_s = min_excess_s
        self.min_samples = min_samples
        self.unanswered = unanswered
        self.base_s = base_s
        self.max_s = max_s
        self.max_share = max_share
        self.on_eject = on_eject

    def max_ejected(self, n: int) -> int:
        """How many of ``n`` replicas may be ejected at once."""
        if n < 2:
            return 0
        return max(1, math.floor(n * self.max_share))

    @staticmethod
    def _score(ep: Endpoint, now: float) -> float | None:
        if ep.ewma_per_unit_s is None:
            return None
        return max(ep.ewma_per_unit_s, ep.oldest_in_flight_s(now))

    def evaluate(self, endpoints: Sequence[Endpoint], now: float) -> list[Endpoint]:
        """Eject the outliers among ``endpoints`` (the service's healthy, active replicas);
        returns the replicas ejected by this call."""
        live = [ep for ep in endpoints if ep.active and ep.healthy is True]
        ejected_now = sum(1 for ep in live if ep.ejected_until > now)
        room = self.max_ejected(len(live)) - ejected_now
        if room <= 0:
            return []
        scores = {id(ep): self._score(ep, now) for ep in live}
        out: list[Endpoint] = []
        for ep in live:  # unresponsive first: no latency comparison needed
            if room > 0 and ep.ejected_until <= now and ep.unanswered_in_row >= self.unanswered:
                self.eject(ep, now, why="unresponsive")
                out.append(ep)
                room -= 1
        ranked = sorted(
            (ep for ep in live if ep.ejected_until <= now and scores[id(ep)] is not None
             and all(ep is not o for o in out)
             and (len(ep.latency) >= self.min_samples or ep.oldest_in_flight_s(now) > 0)),
            key=lambda ep: scores[id(ep)], reverse=True,
        )
        for ep in ranked:
            if room <= 0:
                break
            peers = [scores[id(p)] for p in live if p is not ep and scores[id(p)] is not None
                     and p.ejected_until <= now]
            if not peers:
                continue
            median = statistics.median(peers)
            score = scores[id(ep)]
            if score > self.ratio * median and score - median >= self.min_excess_s:
                self.eject(ep, now)
                out.append(ep)
                room -= 1
        return out

    def eject(self, ep: Endpoint, now: float, *, why: str = "latency outlier") -> None:
        """Take ``ep`` out of rotation for its next ejection time."""
        duration = min(self.max_s, self.base_s * (2 ** ep.ejections))
        ep.ejections += 1
        ep.ejected_until = now + duration
        # Readmitted with a fresh estimate: the peers' median, not the outlier's past.
        ep.ewma_per_unit_s = None
        ep.unanswered_in_row = 0
        log.warning("ejected %s %s for %.1fs (%s, %d time(s))",
                    ep.service, ep.address, duration, why, ep.ejections)
        if self.on_eject is not None:
            self.on_eject(ep, duration)
