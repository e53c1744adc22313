"""Python views of the messages in ``common.proto``, shared by every sub-client."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from backbone.v1 import common_pb2


@dataclass(frozen=True)
class Timing:
    """One hop's timing (``HopTiming``), in microseconds."""

    hop: str
    queue_us: int
    compute_us: int
    total_us: int
    batch_size: int


@dataclass(frozen=True)
class Usage:
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def parse_timings(timings: Iterable[common_pb2.HopTiming]) -> tuple[Timing, ...]:
    """``repeated HopTiming`` -> Timings, in order."""
    return tuple(
        Timing(t.hop, t.queue_us, t.compute_us, t.total_us, t.batch_size) for t in timings
    )


def parse_usage(usage: common_pb2.Usage) -> Usage:
    """``Usage`` message -> Usage."""
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


def truncation_policy(name: str | None) -> int:
    """"truncate" / "reject" / None (server default) -> ``TruncationPolicy`` value."""
    if name is None:
        return common_pb2.TRUNCATION_POLICY_UNSPECIFIED
    try:
        return common_pb2.TruncationPolicy.Value(f"TRUNCATION_POLICY_{name.upper()}")
    except ValueError:
        raise ValueError(f"truncation must be 'truncate' or 'reject', not {name!r}") from None
