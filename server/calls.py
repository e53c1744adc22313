"""Per-call helpers every servicer shares: the caller's deadline and priority, hop timings.

One place converts a gRPC call's remaining time to the monotonic deadline the policy
layer (``router.deadlines``) works with, one reads the ``x-backbone-priority`` metadata
into ``router.admission.Priority``, and one builds the ``HopTiming`` every response
carries.
"""

from __future__ import annotations

import time

import grpc

from backbone.v1 import common_pb2
from router.admission import Priority
from router.errors import InvalidArgument

#: Request metadata key of a call's priority: low | normal | high (default normal).
PRIORITY_KEY = "x-backbone-priority"


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` instant, if it has one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def priority_of(context: grpc.aio.ServicerContext) -> Priority:
    """The call's ``x-backbone-priority`` (NORMAL when absent); INVALID_ARGUMENT naming the
    key for any other value than low, normal or high."""
    for key, value in context.invocation_metadata() or ():
        if key == PRIORITY_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            try:
                return Priority.parse(text)
            except ValueError:
                raise InvalidArgument(
                    f"metadata {PRIORITY_KEY} is {text[:32]!r}: use low, normal or high",
                    metadata={"field": PRIORITY_KEY},
                ) from None
    return Priority.NORMAL


def hop_timing(
    hop: str, *, queue_s: float = 0.0, compute_s: float = 0.0, total_s: float = 0.0,
    batch_size: int = 0,
) -> common_pb2.HopTiming:
    """A ``HopTiming`` from seconds (the wire carries microseconds; a negative duration,
    from clocks read in another order, counts as 0)."""
    return common_pb2.HopTiming(
        hop=hop,
        queue_us=max(0, int(queue_s * 1e6)),
        compute_us=max(0, int(compute_s * 1e6)),
        total_us=max(0, int(total_s * 1e6)),
        batch_size=batch_size,
    )
