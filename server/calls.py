"""Per-call helpers every servicer shares: the caller's deadline, hop timings.

One place converts a gRPC call's remaining time to the monotonic deadline the policy
layer (``router.deadlines``) works with, and one builds the ``HopTiming`` every response
carries.
"""

from __future__ import annotations

import time

import grpc

from backbone.v1 import common_pb2


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` instant, if it has one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def hop_timing(
    hop: str, *, queue_s: float = 0.0, compute_s: float = 0.0, total_s: float = 0.0,
    batch_size: int = 0,
) -> common_pb2.HopTiming:
    """A ``HopTiming`` from seconds (the wire carries microseconds)."""
    return common_pb2.HopTiming(
        hop=hop,
        queue_us=int(queue_s * 1e6),
        compute_us=int(compute_s * 1e6),
        total_us=int(total_s * 1e6),
        batch_size=batch_size,
    )
