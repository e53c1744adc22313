"""Domain errors of the policy layer and the hops: what went wrong, in the contract's
terms, without any grpc import.

Each error names a canonical gRPC status (by its ``grpc.StatusCode`` name) and an
``ErrorReason`` (the proto enum value's name without the ``ERROR_REASON_`` prefix).
``server.errors`` re-exports them and maps them (and ``retrieval.errors``) to a status
with exactly one ``google.rpc.ErrorInfo``; the error interceptor sends it.
"""

from __future__ import annotations

ERROR_DOMAIN = "backbone.v1"

# A user-supplied value quoted in an error (message or ErrorInfo metadata) keeps at most
# this many characters; the rest is replaced by a marker saying how many were cut. Quote a
# value once per error (in the metadata, or the message when there is no metadata key).
QUOTE_CHARS = 128
# Longest names the contract accepts (documented in the proto comments); longer ones are
# INVALID_ARGUMENT before any lookup.
MAX_COLLECTION_NAME_CHARS = 64
MAX_MODEL_NAME_CHARS = 128
MAX_FIELD_NAME_CHARS = 256


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``value`` as text bounded for an error: at most ``limit`` characters, then
    "…(+N chars)" when longer. Control characters are escaped (``repr`` style) so the
    quote stays one printable line."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    head = text[:limit] if cut > 0 else text
    if not head.isprintable():
        head = head.encode("unicode_escape").decode("ascii")[:limit]
    return f"{head}…(+{cut} chars)" if cut > 0 else head


def check_name_length(value: str, field: str, limit: int) -> None:
    """INVALID_ARGUMENT when the name ``field`` is longer than ``limit`` characters."""
    if len(value) > limit:
        raise InvalidArgument(
            f"{field} is longer than {limit} characters",
            metadata={"field": field, "limit": limit, "length": len(value)},
        )


class BackboneError(Exception):
    """Base of every error the server reports on purpose."""

    status: str = "INTERNAL"
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, object] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        # Pushback: when set, the status also carries a google.rpc.RetryInfo saying how
        # long a caller should wait before trying again (a refusal under overload).
        self.retry_after_s = retry_after_s
        # ErrorInfo.metadata is map<string, string>.
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}


class InvalidArgument(BackboneError):
    """Bad input; nothing was computed. Default reason INVALID_INPUT."""

    status = "INVALID_ARGUMENT"
    reason = "INVALID_INPUT"


class NotFound(BackboneError):
    """An unknown collection, model or request id (give the specific reason)."""

    status = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(BackboneError):
    """Creating something that exists."""

    status = "ALREADY_EXISTS"
    reason = "COLLECTION_EXISTS"


class FailedPrecondition(BackboneError):
    """The system is not in a state that allows the call (give the specific reason)."""

    status = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class Overloaded(BackboneError):
    """A bounded queue is full: a fast refusal instead of an unbounded wait."""

    status = "RESOURCE_EXHAUSTED"
    reason = "OVERLOADED"


class Unavailable(BackboneError):
    """The engine or upstream cannot serve now (not ready, dead, breaker open)."""

    status = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class DeadlineTooShort(BackboneError):
    """Too little of the deadline is left to do the work; nothing was computed."""

    status = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_TOO_SHORT"


class Unauthenticated(BackboneError):
    """Missing or wrong bearer token."""

    status = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class NotImplementedYet(BackboneError):
    """An RPC of the contract this server does not implement yet."""

    status = "UNIMPLEMENTED"
    reason = "NOT_IMPLEMENTED"


class Cancelled(BackboneError):
    """The caller went away; the work was dropped."""

    status = "CANCELLED"
    reason = "CANCELLED"
