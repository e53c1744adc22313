"""Errors of the retrieval layer, without any grpc or server import.

Each names the canonical gRPC status (``status``, a ``grpc.StatusCode`` name) and the
``ErrorReason`` (``reason``, the proto enum value without ``ERROR_REASON_``) it stands
for; ``server.errors.as_backbone_error`` maps them to the contract in one place.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base of every error the retrieval layer raises on purpose."""

    status: str = "INTERNAL"
    reason: str = "INTERNAL"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: dict[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}


class InvalidArgument(RetrievalError):
    """Bad input (vectors, filters, creation parameters); nothing was written."""

    status = "INVALID_ARGUMENT"
    reason = "INVALID_INPUT"


class NotFound(RetrievalError):
    """An unknown collection or point."""

    status = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(RetrievalError):
    """Creating a collection that exists."""

    status = "ALREADY_EXISTS"
    reason = "COLLECTION_EXISTS"


class FailedPrecondition(RetrievalError):
    """The collection is not in a state that allows the call (e.g. being deleted)."""

    status = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"
