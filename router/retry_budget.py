"""Retry budget: retries and hedges together stay within a share of the requests.

Token bucket: every request adds ``ratio`` tokens, every retry or hedge takes one; the
bucket starts with ``floor`` tokens and never holds more than ``cap``. Invariant: after
``n`` requests at most ``floor + ratio * n`` retries were granted, so a replica failing
every call can never multiply the load on the others by more than ``1 + ratio``.
"""

from __future__ import annotations


class RetryBudget:
    """Grants retries and hedges while tokens last (see the module docstring)."""

    def __init__(self, ratio: float = 0.2, floor: float = 10.0, cap: float | None = None) -> None:
        if ratio < 0 or floor < 0:
            raise ValueError("ratio and floor must be >= 0")
        self.ratio = ratio
        self.floor = floor
        self.cap = max(floor, cap if cap is not None else floor + 100.0 * ratio)
        self.tokens = floor
        self.granted = 0
        self.refused = 0
        self.requests = 0

    def on_request(self) -> None:
        """Count one original request (earns ``ratio`` tokens)."""
        self.requests += 1
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def try_acquire(self) -> bool:
        """Take one token for a retry or hedge; False (and counted) when none is left."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.granted += 1
            return True
        self.refused += 1
        return False

    @property
    def left(self) -> float:
        """Tokens left (retries grantable now)."""
        return self.tokens
