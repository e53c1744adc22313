"""Request decoding that stays inside the error contract.

grpc.aio decodes a request with the handler's ``request_deserializer`` before any
behaviour runs; when that raises (corrupt wire format, invalid UTF-8 in a string field,
messages nested past the decoder's depth limit), gRPC answers UNKNOWN (unary in) or
INTERNAL (inside a client stream) with no ErrorInfo and logs a traceback per call.

Here the deserializer never raises: :func:`safe_deserializer` returns an
:class:`Undecodable` sentinel instead, and the guard interceptor answers it (unary in:
before the behaviour runs; streams in: when the handler reaches that message, through
:func:`checked_requests`) with INVALID_ARGUMENT / INVALID_INPUT naming the RPC and the
problem, never the payload. At most one warning line per :data:`LOG_PERIOD_S` is logged
(with the count of the ones suppressed), so a hostile client cannot fill the disk.

Nesting: the protobuf decoder (upb) refuses messages nested deeper than 100 levels; a
``google.protobuf.Struct`` level costs three (Struct, map entry, Value), so metadata
deeper than ~32 levels never decodes. The contract's own, lower limit is
:data:`MAX_STRUCT_DEPTH`, checked by :func:`check_struct_depth` before any work, so
whatever is stored can also be sent back inside any response.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf import message as pb_message
from google.protobuf import struct_pb2

from router.errors import InvalidArgument, quote

log = logging.getLogger(__name__)

# Seconds between two warning lines about undecodable requests (the rest are counted).
LOG_PERIOD_S = 10.0
# Deepest nesting of Struct / ListValue levels accepted in a metadata field (documented in
# the proto comments of every Struct metadata field).
MAX_STRUCT_DEPTH = 16

_PROBLEMS = (
    ("Wire format was corrupt", "corrupt wire format"),
    ("bad UTF-8", "invalid UTF-8 in a string field"),
    ("MaxDepth", "message nested deeper than the decoder's limit of 100 levels"),
)


class Undecodable:
    """What a safe deserializer returns for bytes that do not parse as the request."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def describe_problem(exc: BaseException) -> str:
    """A short, payload-free name for a decode failure."""
    if isinstance(exc, RecursionError):
        return "message nested too deeply"
    text = str(exc)
    for needle, problem in _PROBLEMS:
        if needle in text:
            return problem
    if isinstance(exc, pb_message.DecodeError):
        return "undecodable message"
    return f"undecodable message ({type(exc).__name__})"


class RateLimitedLog:
    """At most one warning line per ``period_s`` seconds; later ones are counted and the
    count is reported with the next line (a token bucket of one token)."""

    def __init__(
        self, logger: logging.Logger, period_s: float = LOG_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._period = period_s
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0
        self._lock = threading.Lock()  # deserializers may run on gRPC's threads

    def warning(self, fmt: str, *args: Any) -> bool:
        """Log ``fmt % args`` unless one was logged within the period; True when logged."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._suppressed += 1
                return False
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._period
        if suppressed:
            fmt += " (%d more suppressed)"
            args = (*args, suppressed)
        self._log.warning(fmt, *args)
        return True


DECODE_LOG = RateLimitedLog(log)


def safe_deserializer(
    method: str, deserializer: Callable[[bytes], Any], journal: RateLimitedLog = DECODE_LOG
) -> Callable[[bytes], Any]:
    """``deserializer`` that returns :class:`Undecodable` instead of raising."""

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - every decode failure is the client's
            problem = describe_problem(exc)
        journal.warning("undecodable request to %s: %s", quote(method), problem)
        return Undecodable(problem)

    return deserialize


def decode_error(method: str, undecodable: Undecodable) -> InvalidArgument:
    """INVALID_ARGUMENT / INVALID_INPUT for a request that did not decode."""
    return InvalidArgument(
        f"the request message could not be decoded: {undecodable.problem}",
        reason="INVALID_INPUT",
        metadata={"method": quote(method), "problem": undecodable.problem},
    )


async def checked_requests(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    """The messages of a client stream; raises :func:`decode_error` at the first one that
    did not decode (the stream ends there: nothing after it is read)."""
    async for message in requests:
        if isinstance(message, Undecodable):
            raise decode_error(method, message)
        yield message


def check_struct_depth(struct: struct_pb2.Struct, field: str, limit: int = MAX_STRUCT_DEPTH) -> None:
    """INVALID_ARGUMENT when ``struct`` nests Struct / ListValue more than ``limit`` levels.

    Iterative, so the check itself cannot overflow the stack."""
    stack: list[tuple[Any, int]] = [(struct, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise InvalidArgument(
                f"{field} nests more than {limit} levels",
                reason="INVALID_INPUT", metadata={"field": field, "limit": limit},
            )
        values = node.fields.values() if isinstance(node, struct_pb2.Struct) else node.values
        for value in values:
            kind = value.WhichOneof("kind")
            if kind == "struct_value":
                stack.append((value.struct_value, depth + 1))
            elif kind == "list_value":
                stack.append((value.list_value, depth + 1))
