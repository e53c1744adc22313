"""Hedge delay: when a second attempt is sent for a call the first has not answered.

The delay is the replica set's recent ``percentile`` latency (or time to first message,
for Generate), clamped to [``min_s``, ``max_s``], recomputed at most every
``refresh_s``. With fewer than ``min_samples`` samples there is no hedging (no basis to
call an attempt slow). Hedges are paid from the retry budget. No grpc imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router.endpoints import Endpoint, merged_percentile


class HedgePolicy:
    """Hedge delay from the replica set's recent tail (see the module doc)."""

    def __init__(self, *, enabled: bool = True, percentile: float = 0.95, min_s: float = 0.001,
                 max_s: float = 2.0, min_samples: int = 20, refresh_s: float = 0.1) -> None:
        self.enabled = enabled
        self.percentile = percentile
        self.min_s = min_s
        self.max_s = max_s
        self.min_samples = min_samples
        self.refresh_s = refresh_s
        self._cached: dict[bool, tuple[float, float | None]] = {}

    def delay_s(self, endpoints: Sequence[Endpoint] | Callable[[], Sequence[Endpoint]], now: float,
                *, first: bool = False) -> float | None:
        """Seconds to wait before hedging, or None for no hedge. ``endpoints`` may be a
        function returning them, called only when the cached delay is stale."""
        if not self.enabled:
            return None
        cached = self._cached.get(first)
        if cached is not None and now - cached[0] < self.refresh_s:
            return cached[1]
        if callable(endpoints):
            endpoints = endpoints()
        samples = sum(len(ep.first_message if first else ep.latency) for ep in endpoints)
        value = None
        if samples >= self.min_samples:
            p = merged_percentile(list(endpoints), self.percentile, first=first)
            if p is not None:
                value = min(self.max_s, max(self.min_s, p))
        self._cached[first] = (now, value)
        return value
