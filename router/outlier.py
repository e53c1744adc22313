"""Outlier ejection: a replica that is much slower than its peers, or that stopped
answering, leaves rotation for a while.

Three signals, each needing more than one unlucky call:

- **Slow**: its typical latency per unit of work (the lower of its EWMA and the median
  of its last 16 samples, so one cold first call through a new connection does not
  count) exceeds ``ratio`` times the median of its peers' and is at least
  ``min_excess_s`` above it, once it has ``min_samples`` samples.
- **Stuck**: a call of it has waited for an answer longer than ``ratio`` times its
  peers' recent p99 and at least ``hang_min_s``: a hung replica shows before any of its
  calls completes. A stream that sent its first message is not waited on.
- **Unresponsive**: its last ``unanswered`` (5) first attempts in a row ended without its
  answer (a hedge to another replica won first, a fair deadline ran out), over a spell of
  at least ``hang_min_s``: with hedging a hung replica's abandoned calls stay as short as
  the hedge delay, so its latency need not stand out.

Why the floors: on a busy host a healthy sub-millisecond replica stalls for 5-10 ms now
and then (a scheduling gap); the calls in flight through the stall all go unanswered
together, and their age is 3x a sub-millisecond median. Ejecting for that took a third
of a three-replica set out for 2 s (the multi-host test saw one replica at 4 % of calls).

Ejection lasts ``base_s * 2 ** (times ejected before)``, at most ``max_s``. At most
``max_share`` of a service's replicas (rounded down, but 1 when there are 2 or more) are
ejected at once; the balancer falls back to every usable replica when none is left in
rotation. No grpc imports, no clock of its own.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence

from router.endpoints import Endpoint, merged_percentile

log = logging.getLogger(__name__)


class OutlierDetector:
    """Ejects latency outliers among one service's replicas (see the module doc)."""

    def __init__(
        self,
        *,
        ratio: float = 3.0,
        min_excess_s: float = 0.005,
        min_samples: int = 10,
        unanswered: int = 5,
        hang_min_s: float = 0.25,
        base_s: float = 2.0,
        max_s: float = 60.0,
        max_share: float = 0.5,
        on_eject: Callable[[Endpoint, float], None] | None = None,
    ) -> None:
        self.ratio = ratio
        self.min_excess_s = min_excess_s
        self.min_samples = min_samples
        self.unanswered = unanswered
        self.hang_min_s = hang_min_s
        self.base_s = base_s
        self.max_s = max_s
        self.max_share = max_share
        self.on_eject = on_eject

    def max_ejected(self, n: int) -> int:
        """How many of ``n`` replicas may be ejected at once."""
        if n < 2:
            return 0
        return max(1, math.floor(n * self.max_share))

    def _stuck(self, ep: Endpoint, peers: Sequence[Endpoint], now: float) -> str | None:
        """Why ``ep`` counts as hung, or None."""
        waited = ep.oldest_in_flight_s(now)
        if waited < self.hang_min_s:
            return None
        tail = merged_percentile(list(peers), 0.99)
        if tail is not None and waited > self.ratio * tail:
            return (f"stuck: a call waited {waited * 1e3:.0f} ms for an answer, "
                    f"the peers' p99 is {tail * 1e3:.1f} ms")
        return None

    def evaluate(self, endpoints: Sequence[Endpoint], now: float) -> list[Endpoint]:
        """Eject the outliers among ``endpoints`` (the service's healthy, active replicas);
        returns the replicas ejected by this call."""
        live = [ep for ep in endpoints if ep.active and ep.healthy is True]
        ejected_now = sum(1 for ep in live if ep.ejected_until > now)
        room = self.max_ejected(len(live)) - ejected_now
        if room <= 0:
            return []
        out: list[Endpoint] = []
        for ep in live:  # not answering first: no latency comparison needed
            if room <= 0:
                break
            if ep.ejected_until > now:
                continue
            if (ep.unanswered_in_row >= self.unanswered
                    and now - ep.unanswered_since >= self.hang_min_s):
                why = f"unresponsive: {ep.unanswered_in_row} first attempts in a row unanswered"
            else:
                why = self._stuck(ep, [p for p in live if p is not ep and p.ejected_until <= now],
                                  now)
            if why is not None:
                self.eject(ep, now, why=why)
                out.append(ep)
                room -= 1
        scores = {id(ep): ep.typical_per_unit_s() for ep in live}
        ranked = sorted(
            (ep for ep in live if ep.ejected_until <= now and scores[id(ep)] is not None
             and len(ep.latency) >= self.min_samples),
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
                self.eject(ep, now, why=f"slow: {score * 1e3:.1f} ms per unit, "
                                        f"the peers' {median * 1e3:.1f} ms")
                out.append(ep)
                room -= 1
        return out

    def eject(self, ep: Endpoint, now: float, *, why: str = "latency outlier") -> None:
        """Take ``ep`` out of rotation for its next ejection time."""
        duration = min(self.max_s, self.base_s * (2 ** ep.ejections))
        ep.ejections += 1
        ep.ejected_until = now + duration
        # Readmitted with a fresh estimate: the peers' median, not the outlier's past.
        ep.forget_estimate()
        ep.unanswered_in_row = 0
        log.warning("ejected %s %s for %.1fs (%s, %d time(s))",
                    ep.service, ep.address, duration, why, ep.ejections)
        if self.on_eject is not None:
            self.on_eject(ep, duration)
