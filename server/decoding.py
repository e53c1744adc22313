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

import asyncio
import functools
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


async def checked_requests(
    requests: AsyncIterator[Any], method: str, *, require_message: bool = False
) -> AsyncIterator[Any]:
    """The messages of a client stream; raises :func:`decode_error` at the first one that
    did not decode (the stream ends there: nothing after it is read) and the enum rule's
    error (:func:`check_enums`) at the first with an unknown enum value.

    ``require_message``: the contract's rule for client-streaming RPCs (stream in, one
    response out: Upsert, Ingest, and any added later): a stream that ends without a
    single message is INVALID_ARGUMENT / EMPTY_INPUT, as an empty unary batch is. Bidi
    streams (EmbedStream) may be empty: no requests, no responses, OK."""
    seen = False
    async for message in requests:
        if isinstance(message, Undecodable):
            raise decode_error(method, message)
        check_enums(message)
        seen = True
        yield message
    if require_message and not seen:
        raise InvalidArgument(
            "the request stream ended without a message; send at least one",
            reason="EMPTY_INPUT", metadata={"method": quote(method)},
        )


# After a client stream's call has failed, the rest of the stream is read and dropped
# while messages keep arriving (each within DRAIN_IDLE_S of the last; a client stream
# with one response waits for the half-close), for at most DRAIN_S / DRAIN_MESSAGES,
# before the status is sent (see drain_requests).
DRAIN_IDLE_S = 0.25
DRAIN_S = 2.0
DRAIN_MESSAGES = 4096


async def drain_requests(
    requests: AsyncIterator[Any], limit_s: float = DRAIN_S, max_messages: int = DRAIN_MESSAGES,
    idle_s: float = DRAIN_IDLE_S,
) -> int:
    """Read and drop what is left of a request stream whose call has already failed;
    returns how many messages were dropped.

    Why: a call that ends while its client is still writing (the error came at message 1
    of 3) races the client's writes; grpc-python's client then reports the failed write,
    ``INTERNAL "Internal error from Core"``, instead of the status the server sent (seen
    in ~1 of 10 such EmbedStream calls). Reading the messages already on their way first
    lets those writes land, so the client gets the real status. It stops at the end of
    the stream, at a pause of ``idle_s`` (an interactive bidi client waiting for an answer
    before it writes again gets its error that much later, no more; 50 ms was too short
    for a 1 MB message on a loaded box), or at the bounds."""
    dropped = 0
    iterator = aiter(requests)
    try:
        async with asyncio.timeout(limit_s):
            while dropped < max_messages:
                await asyncio.wait_for(anext(iterator), idle_s)
                dropped += 1
    except (TimeoutError, StopAsyncIteration, Exception):  # noqa: BLE001 - outcome decided
        pass
    return dropped


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


# ------------------------------------------------------------------ enums


def _is_well_known(desc: Any) -> bool:
    return desc.full_name.startswith("google.protobuf.")


@functools.cache
def _has_enums(desc: Any) -> bool:
    """True when messages of ``desc`` can hold an enum field, at any depth (well-known
    types such as Struct excluded: their only enum, NullValue, needs no check)."""
    seen: set[str] = set()
    stack = [desc]
    while stack:
        current = stack.pop()
        if current.full_name in seen or _is_well_known(current):
            continue
        seen.add(current.full_name)
        for field in current.fields:
            if field.enum_type is not None:
                return True
            if field.message_type is not None:
                stack.append(field.message_type)
    return False


def check_enums(message: Any, path: str = "") -> None:
    """The contract's one rule for enums: a request whose enum field holds a number its
    enum does not define (proto3 keeps unknown numbers) is INVALID_ARGUMENT /
    INVALID_INPUT naming the field (``metadata["field"]``, a path such as
    ``searches[2].mode``), before any work. Applied by the guard to every request message
    of every RPC, so a new service gets it too. Only the parts of a message that can hold
    an enum are walked."""
    desc = getattr(message, "DESCRIPTOR", None)
    if desc is None or not _has_enums(desc):
        return
    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            if inner.enum_type is not None:
                for key, item in value.items():
                    _check_enum_value(inner.enum_type, item, f"{name}[{quote(key, 32)}]")
            elif inner.message_type is not None and _has_enums(inner.message_type):
                for key, item in value.items():
                    check_enums(item, f"{name}[{quote(key, 32)}].")
        elif field.enum_type is not None:
            if field.is_repeated:
                for i, item in enumerate(value):
                    _check_enum_value(field.enum_type, item, f"{name}[{i}]")
            else:
                _check_enum_value(field.enum_type, value, name)
        elif field.message_type is not None and _has_enums(field.message_type):
            if field.is_repeated:
                for i, item in enumerate(value):
                    check_enums(item, f"{name}[{i}].")
            else:
                check_enums(value, f"{name}.")


def _check_enum_value(enum_type: Any, value: int, field: str) -> None:
    if value not in enum_type.values_by_number:
        raise InvalidArgument(
            f"{field} has no value {value} (unknown {enum_type.name})",
            reason="INVALID_INPUT", metadata={"field": field},
        )
