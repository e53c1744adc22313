"""Deadline arithmetic shared by every hop, the upstream layer, the router and the pipeline.

A deadline is a ``time.monotonic()`` instant, or None for "none set". A call forwarded
to another hop gets what is left of its caller's deadline minus a small reserve (the
time to send the answer back); a hop with no deadline from its caller uses its default.
No grpc imports: the server layer converts ``context.time_remaining()`` once
(``server.calls.deadline_of``).
"""

from __future__ import annotations

import time

# Kept back from a forwarded call's deadline for the answer's way back, in seconds.
DEFAULT_RESERVE_S = 0.005


def deadline_in(seconds: float | None, *, now: float | None = None) -> float | None:
    """The monotonic instant ``seconds`` from now (None stays None)."""
    if seconds is None:
        return None
    return (time.monotonic() if now is None else now) + seconds


def remaining_s(deadline: float | None, *, now: float | None = None) -> float | None:
    """Seconds left until ``deadline`` (negative once passed); None without a deadline."""
    if deadline is None:
        return None
    return deadline - (time.monotonic() if now is None else now)


def effective_deadline(deadline: float | None, default_s: float, *, now: float | None = None) -> float:
    """``deadline``, or ``default_s`` from now when the caller set none."""
    if deadline is not None:
        return deadline
    return (time.monotonic() if now is None else now) + default_s


def forward_timeout_s(
    deadline: float | None,
    *,
    reserve_s: float = DEFAULT_RESERVE_S,
    default_s: float | None = None,
    now: float | None = None,
) -> float | None:
    """The timeout to give a call made on behalf of a caller whose deadline is
    ``deadline``: what is left minus ``reserve_s`` (at least 0), or ``default_s`` when the
    caller set none."""
    left = remaining_s(deadline, now=now)
    if left is None:
        return default_s
    return max(0.0, left - reserve_s)


def expired(deadline: float | None, *, now: float | None = None) -> bool:
    """True once ``deadline`` has passed."""
    left = remaining_s(deadline, now=now)
    return left is not None and left <= 0
