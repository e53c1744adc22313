"""Fakes for the router policy tests: a settable clock and replicas built in one line."""

from __future__ import annotations

from router.breaker import CircuitBreaker
from router.endpoints import WARMUP_SAMPLES, Endpoint


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


def endpoint(address: str = "a:1", *, ewma: float | None = None, healthy: bool = True,
             samples: int | None = None) -> Endpoint:
    """A healthy replica with an optional latency history (``samples`` of ``ewma``; by
    default, with an ``ewma``, just enough to be past its warm-up)."""
    ep = Endpoint("backbone.v1.EmbeddingService", address, CircuitBreaker())
    ep.healthy = healthy
    if samples is None:
        samples = WARMUP_SAMPLES if ewma is not None else 0
    for _ in range(samples):
        ep.observe(ewma or 0.0)
    if ewma is not None:
        ep.ewma_per_unit_s = ewma
    return ep
