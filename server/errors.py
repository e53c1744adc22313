"""The contract's errors for the server layer: the domain hierarchy of ``router.errors``
(re-exported here) and the one mapping of lower layers' errors onto it.

``as_backbone_error`` is the single place where an error raised below ``server/`` (the
policy layer's own ``BackboneError`` family, ``retrieval.errors``) becomes what the
interceptor sends: a canonical status plus exactly one ``google.rpc.ErrorInfo``.
"""

from __future__ import annotations

from retrieval.errors import RetrievalError
from router.errors import (
    ERROR_DOMAIN,
    AlreadyExists,
    BackboneError,
    Cancelled,
    DeadlineTooShort,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedYet,
    Overloaded,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "ERROR_DOMAIN", "AlreadyExists", "BackboneError", "Cancelled", "DeadlineTooShort",
    "FailedPrecondition", "InvalidArgument", "NotFound", "NotImplementedYet", "Overloaded",
    "Unauthenticated", "Unavailable", "as_backbone_error",
]


def as_backbone_error(exc: BaseException) -> BackboneError | None:
    """The contract error for ``exc`` when it is one raised on purpose, else None (a bug)."""
    if isinstance(exc, BackboneError):
        return exc
    if isinstance(exc, RetrievalError):
        err = BackboneError(exc.message, reason=exc.reason, metadata=dict(exc.metadata))
        err.status = exc.status
        return err
    return None
