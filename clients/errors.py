"""Typed exceptions for failed backbone calls, chosen by the server's ``ErrorReason``.

Every backbone error status carries one ``google.rpc.ErrorInfo`` (domain ``backbone.v1``)
in the ``grpc-status-details-bin`` trailer; its ``reason`` picks the exception class.
Statuses without one (gRPC core's RESOURCE_EXHAUSTED for an oversized message, a
transport UNAVAILABLE, a client-side DEADLINE_EXCEEDED) map by status code alone.

Classes nest by status code, so ``except InvalidInputError`` catches every bad-input
reason and ``except UnavailableError`` catches ``CircuitOpenError`` too.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "backbone.v1"

T = TypeVar("T")


class BackboneRpcError(Exception):
    """A failed backbone call.

    ``code`` is the ``grpc.StatusCode``; ``reason`` the ErrorReason name without the
    ``ERROR_REASON_`` prefix (``""`` when the status carried no backbone ErrorInfo);
    ``message`` the status message; ``metadata`` the ErrorInfo's details (e.g. a limit);
    ``retry_after_s`` the server's pushback (``google.rpc.RetryInfo``) on an overload
    refusal: how long to wait before trying again, or None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(code, reason, message, metadata)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"


# By status code (the fallback when the reason is absent or unknown).
class CancelledRpcError(BackboneRpcError):
    """CANCELLED: the call was cancelled (by the caller or on its behalf)."""


class InvalidInputError(BackboneRpcError):
    """INVALID_ARGUMENT: bad input, nothing was computed (reason INVALID_INPUT or none)."""


class NotFoundError(BackboneRpcError):
    """NOT_FOUND: an unknown collection, model or request id."""


class AlreadyExistsError(BackboneRpcError):
    """ALREADY_EXISTS: creating something that exists."""


class PermissionDeniedError(BackboneRpcError):
    """PERMISSION_DENIED: the caller may not do this."""


class ResourceExhaustedError(BackboneRpcError):
    """RESOURCE_EXHAUSTED: a limit was hit (e.g. gRPC's maximum message size)."""


class FailedPreconditionError(BackboneRpcError):
    """FAILED_PRECONDITION: the system is not in a state that allows the call."""


class UnimplementedError(BackboneRpcError):
    """UNIMPLEMENTED: the RPC is not served here (reason NOT_IMPLEMENTED or none)."""


class InternalError(BackboneRpcError):
    """INTERNAL (or UNKNOWN, DATA_LOSS): a bug on the server."""


class UnavailableError(BackboneRpcError):
    """UNAVAILABLE: no healthy replica, engine not ready, or the transport failed."""


class DeadlineExceededError(BackboneRpcError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class UnauthenticatedError(BackboneRpcError):
    """UNAUTHENTICATED: missing or wrong bearer token."""


# By ErrorReason (each under the class of the status the contract pairs it with).
class EmptyInputError(InvalidInputError):
    """EMPTY_INPUT: a required input is empty."""


class InputTooLargeError(InvalidInputError):
    """INPUT_TOO_LARGE: an input exceeds a size limit (``metadata`` names it)."""


class TooManyInputsError(InvalidInputError):
    """TOO_MANY_INPUTS: too many items in one request."""


class DimensionMismatchError(InvalidInputError):
    """DIMENSION_MISMATCH: a vector's length differs from the expected dimension."""


class InvalidVectorError(InvalidInputError):
    """INVALID_VECTOR: a vector holds NaN or Inf."""


class InvalidTopKError(InvalidInputError):
    """INVALID_TOP_K: top_k or top_n out of range."""


class InvalidFilterError(InvalidInputError):
    """INVALID_FILTER: a malformed filter or an unknown field."""


class InvalidSamplingError(InvalidInputError):
    """INVALID_SAMPLING: a sampling parameter out of range."""


class ContextLengthExceededError(InvalidInputError):
    """CONTEXT_LENGTH_EXCEEDED: the prompt does not fit, or max_tokens is above the cap."""


class CollectionNotFoundError(NotFoundError):
    """COLLECTION_NOT_FOUND: the named collection does not exist."""


class ModelNotFoundError(NotFoundError):
    """MODEL_NOT_FOUND: the named model is not served here."""


class RequestNotFoundError(NotFoundError):
    """REQUEST_NOT_FOUND: the named generation request is not running."""


class CollectionExistsError(AlreadyExistsError):
    """COLLECTION_EXISTS: a collection with that name already exists."""


class OverloadedError(ResourceExhaustedError):
    """OVERLOADED: the hop's queue is full; retry later with backoff."""


class CircuitOpenError(UnavailableError):
    """CIRCUIT_OPEN: the router's breaker is open for every replica of the hop."""


class GuardrailBlockedError(InvalidInputError):
    """A guardrail blocked the request; ``metadata["detector"]`` names it."""


class DeadlineTooShortError(DeadlineExceededError):
    """DEADLINE_TOO_SHORT: too little time was left to do the work; nothing was computed."""


_S = grpc.StatusCode

_BY_CODE: dict[grpc.StatusCode, type[BackboneRpcError]] = {
    _S.CANCELLED: CancelledRpcError,
    _S.UNKNOWN: InternalError,
    _S.INVALID_ARGUMENT: InvalidInputError,
    _S.DEADLINE_EXCEEDED: DeadlineExceededError,
    _S.NOT_FOUND: NotFoundError,
    _S.ALREADY_EXISTS: AlreadyExistsError,
    _S.PERMISSION_DENIED: PermissionDeniedError,
    _S.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    _S.FAILED_PRECONDITION: FailedPreconditionError,
    _S.UNIMPLEMENTED: UnimplementedError,
    _S.INTERNAL: InternalError,
    _S.UNAVAILABLE: UnavailableError,
    _S.DATA_LOSS: InternalError,
    _S.UNAUTHENTICATED: UnauthenticatedError,
}

# (status, reason) -> class. A reason only selects its class with the status the contract
# pairs it with; any other pairing falls back to the status code's class.
BY_REASON: dict[tuple[grpc.StatusCode, str], type[BackboneRpcError]] = {
    (_S.INVALID_ARGUMENT, "INVALID_INPUT"): InvalidInputError,
    (_S.INVALID_ARGUMENT, "EMPTY_INPUT"): EmptyInputError,
    (_S.INVALID_ARGUMENT, "INPUT_TOO_LARGE"): InputTooLargeError,
    (_S.INVALID_ARGUMENT, "TOO_MANY_INPUTS"): TooManyInputsError,
    (_S.INVALID_ARGUMENT, "DIMENSION_MISMATCH"): DimensionMismatchError,
    (_S.INVALID_ARGUMENT, "INVALID_VECTOR"): InvalidVectorError,
    (_S.INVALID_ARGUMENT, "INVALID_TOP_K"): InvalidTopKError,
    (_S.INVALID_ARGUMENT, "INVALID_FILTER"): InvalidFilterError,
    (_S.INVALID_ARGUMENT, "INVALID_SAMPLING"): InvalidSamplingError,
    (_S.INVALID_ARGUMENT, "CONTEXT_LENGTH_EXCEEDED"): ContextLengthExceededError,
    (_S.NOT_FOUND, "COLLECTION_NOT_FOUND"): CollectionNotFoundError,
    (_S.ALREADY_EXISTS, "COLLECTION_EXISTS"): CollectionExistsError,
    (_S.NOT_FOUND, "MODEL_NOT_FOUND"): ModelNotFoundError,
    (_S.NOT_FOUND, "REQUEST_NOT_FOUND"): RequestNotFoundError,
    (_S.RESOURCE_EXHAUSTED, "OVERLOADED"): OverloadedError,
    (_S.UNAVAILABLE, "CIRCUIT_OPEN"): CircuitOpenError,
    (_S.UNAVAILABLE, "UNAVAILABLE"): UnavailableError,
    (_S.DEADLINE_EXCEEDED, "DEADLINE_TOO_SHORT"): DeadlineTooShortError,
    (_S.UNAUTHENTICATED, "UNAUTHENTICATED"): UnauthenticatedError,
    (_S.UNIMPLEMENTED, "NOT_IMPLEMENTED"): UnimplementedError,
    (_S.INTERNAL, "INTERNAL"): InternalError,
    (_S.CANCELLED, "CANCELLED"): CancelledRpcError,
    (_S.NOT_FOUND, "NOT_FOUND"): NotFoundError,
    (_S.FAILED_PRECONDITION, "FAILED_PRECONDITION"): FailedPreconditionError,
    (_S.INVALID_ARGUMENT, "GUARDRAIL_BLOCKED"): GuardrailBlockedError,
}


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The backbone ErrorInfo in a failed call's ``grpc-status-details-bin`` trailer.

    Works for sync ``grpc.RpcError`` calls and ``grpc.aio.AioRpcError`` alike (both expose
    ``code()``, ``details()`` and ``trailing_metadata()``). None when there is none, when
    the trailer is inconsistent with the status, or when its domain is not ours.
    """
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError):  # inconsistent trailer, or not a call
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info
    return None


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The server's pushback in a failed call's status (``google.rpc.RetryInfo``), seconds."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError):
        return None
    for detail in status.details if status is not None else ():
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry.retry_delay.ToNanoseconds() / 1e9
    return None


def from_rpc_error(error: grpc.RpcError) -> BackboneRpcError:
    """The typed exception for a failed call (sync or aio)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or ""
    info = error_info(error)
    reason = info.reason if info is not None else ""
    metadata = dict(info.metadata) if info is not None else {}
    cls = BY_REASON.get((code, reason)) or _BY_CODE.get(code, BackboneRpcError)
    return cls(code, reason, message, metadata, retry_after_s(error))


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raise a ``grpc.RpcError`` from the block as its typed exception.

    Works around ``await`` too: ``with translated_errors(): return await stub.X(req)``.
    """
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from error


def iterate(call: Iterator[T]) -> Iterator[T]:
    """The messages of a sync streaming call, errors typed; closing it cancels the call."""
    try:
        with translated_errors():
            yield from call
    finally:
        call.cancel()  # type: ignore[attr-defined]  # no-op once the call has ended


async def aiterate(call: grpc.aio.Call) -> AsyncIterator:
    """The messages of an aio streaming call, errors typed; closing it cancels the call."""
    try:
        with translated_errors():
            async for message in call:  # type: ignore[attr-defined]
                yield message
    finally:
        call.cancel()  # no-op once the call has ended
