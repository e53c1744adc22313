"""The client side of the fuzzing: send a :class:`perf.fuzz_cases.Case` as raw bytes
through a generic channel (unary, client-, server- or bidi-streaming) and judge the
answer against the error contract.

:func:`judge` states the contract for one answer: the code is in the RPC's allowed set;
every error carries exactly one ``google.rpc.ErrorInfo`` of domain ``backbone.v1`` whose
reason is an ``ErrorReason`` name; trailers stay under :data:`MAX_TRAILER_BYTES`; never
UNKNOWN, never INTERNAL.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import grpc
from google.rpc import error_details_pb2, status_pb2

from perf.fuzz_cases import ERROR_DOMAIN, MAX_TRAILER_BYTES, NEVER, REASONS, Case, Target


# ----------------------------------------------------------------- calls and judging


@dataclass(frozen=True)
class Outcome:
    """One answer: its code, its ErrorInfo reasons, trailer size, and whether the code
    came from the client's own deadline."""

    code: str
    reasons: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    trailer_bytes: int = 0
    details: str = ""
    client_deadline: bool = False


def error_infos(err: grpc.aio.AioRpcError) -> list[error_details_pb2.ErrorInfo]:
    """Every ErrorInfo in the error's status details."""
    infos = []
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    infos.append(info)
    return infos


def _trailer_bytes(err: grpc.aio.AioRpcError) -> int:
    size = len((err.details() or "").encode())
    for key, value in err.trailing_metadata() or ():
        size += len(key) + len(value if isinstance(value, bytes) else value.encode())
    return size


async def send(channel: grpc.aio.Channel, case: Case, timeout: float) -> Outcome:
    """Send ``case`` on ``channel`` (raw bytes, no client serializer) and read every answer."""
    m = case.method
    kind = {
        (False, False): channel.unary_unary, (False, True): channel.unary_stream,
        (True, False): channel.stream_unary, (True, True): channel.stream_stream,
    }[(m.client_streaming, m.server_streaming)]
    multicallable = kind(m.path, request_serializer=None, response_deserializer=None)
    call = None
    try:
        if m.client_streaming:
            call = multicallable(iter(case.messages), timeout=timeout)
        else:
            call = multicallable(case.messages[0] if case.messages else b"", timeout=timeout)
        if m.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as err:
        infos = error_infos(err)
        return Outcome(
            err.code().name, tuple(i.reason for i in infos), tuple(i.domain for i in infos),
            _trailer_bytes(err), (err.details() or "")[:200],
            client_deadline=err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not infos,
        )
    except asyncio.CancelledError:
        if call is not None:
            call.cancel()
        raise
    return Outcome("OK")


def judge(case: Case, outcome: Outcome, target: Target) -> list[str]:
    """What is wrong with ``outcome`` under the contract (empty: nothing)."""
    problems = []
    code = outcome.code
    if code in NEVER:
        problems.append(f"{code} is never a contract answer: {outcome.details!r}")
    elif code not in target.allowed(case.method):
        problems.append(f"{code} is not allowed for {case.method.name}: {outcome.details!r}")
    if code != "OK":
        if len(outcome.reasons) != 1:
            problems.append(f"{code} with {len(outcome.reasons)} ErrorInfo: {outcome.details!r}")
        elif outcome.domains[0] != ERROR_DOMAIN:
            problems.append(f"ErrorInfo of domain {outcome.domains[0]!r}")
        elif outcome.reasons[0] not in REASONS:
            problems.append(f"ErrorInfo reason {outcome.reasons[0]!r} is not an ErrorReason")
        if outcome.trailer_bytes >= MAX_TRAILER_BYTES:
            problems.append(f"{code} trailers of {outcome.trailer_bytes} bytes")
    return problems


async def send_and_judge(
    channel: grpc.aio.Channel, case: Case, target: Target, timeout: float = 30.0,
    retry_timeout: float = 120.0,
) -> tuple[Outcome, list[str]]:
    """:func:`send` then :func:`judge`, with the rule for the client's own deadline.

    A call whose *client-side* deadline fires (DEADLINE_EXCEEDED without an ErrorInfo)
    says nothing about the server when the machine is loaded: the server may have been
    about to answer. Such a case is sent once more with ``retry_timeout``; if the server
    then answers within the contract, the first attempt is not a violation (the outcome is
    marked ``client_deadline``); if that deadline fires too, the server did not answer a
    hostile request in two minutes, and that is a violation."""
    outcome = await send(channel, case, timeout)
    if outcome.client_deadline:
        again = await send(channel, case, retry_timeout)
        if again.client_deadline:
            return again, [f"no answer within {timeout:.0f} s nor {retry_timeout:.0f} s"]
        return replace(again, client_deadline=True), judge(case, again, target)
    return outcome, judge(case, outcome, target)
