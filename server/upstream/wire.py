"""What every gRPC upstream call shares: channel options from the process's config, the
forwarded deadline, and the one mapping of an upstream's failed status onto
``router.errors``.

Mapping invariant: the upstream's status and ``ErrorInfo`` reason are kept (an upstream
RESOURCE_EXHAUSTED stays RESOURCE_EXHAUSTED with its ``RetryInfo`` delay, NOT_FOUND stays
NOT_FOUND with its reason, INVALID_ARGUMENT and DEADLINE_EXCEEDED stay); only a transport
failure (UNAVAILABLE, a cancelled or unauthenticated hop-to-hop call) becomes UNAVAILABLE,
which a caller may retry elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

import grpc

from backbone.v1 import common_pb2
from clients.channel import ClientOptions
from clients.errors import error_info, retry_after_s
from router.deadlines import forward_timeout_s
from router.errors import (
    AlreadyExists,
    BackboneError,
    DeadlineTooShort,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedYet,
    Overloaded,
    Unavailable,
)
from router.hop_api import HopTime
from server.calls import hop_timing
from server.config import Config

_S = grpc.StatusCode
# Upstream statuses kept as they are, with the domain class that carries each.
_FAITHFUL: dict[grpc.StatusCode, type[BackboneError]] = {
    _S.INVALID_ARGUMENT: InvalidArgument,
    _S.NOT_FOUND: NotFound,
    _S.ALREADY_EXISTS: AlreadyExists,
    _S.FAILED_PRECONDITION: FailedPrecondition,
    _S.RESOURCE_EXHAUSTED: Overloaded,
    _S.DEADLINE_EXCEEDED: DeadlineTooShort,
    _S.UNIMPLEMENTED: NotImplementedYet,
}


def upstream_error(err: grpc.RpcError, hop: str) -> BackboneError:
    """The domain error for a failed call to the ``hop`` upstream (see the module doc)."""
    code = err.code() if hasattr(err, "code") else _S.UNKNOWN
    info = error_info(err)
    reason = info.reason if info is not None else None
    metadata = dict(info.metadata) if info is not None else None
    retry = retry_after_s(err)
    details = (err.details() if hasattr(err, "details") else "") or ""
    message = f"{hop} hop: {details}" if details else f"{hop} hop failed: {code.name}"
    cls = _FAITHFUL.get(code)
    if cls is not None:
        return cls(message, reason=reason, metadata=metadata, retry_after_s=retry)
    if code is _S.INTERNAL or code is _S.UNKNOWN or code is _S.DATA_LOSS:
        # A bug in the upstream: reported as such, without its (possibly internal) text.
        return BackboneError(f"{hop} hop failed with {code.name}")
    # UNAVAILABLE, CANCELLED, UNAUTHENTICATED, PERMISSION_DENIED...: the hop-to-hop link
    # failed, not the caller's request. The upstream's reason (CIRCUIT_OPEN) is kept only
    # when it was UNAVAILABLE itself.
    keep = reason if code is _S.UNAVAILABLE else None
    return Unavailable(
        f"{hop} hop at the configured address failed: {code.name}",
        reason=keep, metadata=metadata if keep else None, retry_after_s=retry,
    )


def client_options(config: Config, address: str) -> ClientOptions:
    """Channel options for an upstream at ``address`` under this process's TLS and token."""
    server, upstream = config.server, config.upstream
    ca = upstream.tls_ca or server.tls_client_ca
    mtls = bool(server.tls_client_ca and server.tls_cert)
    return ClientOptions(
        address=address,
        token=server.auth_token,
        tls=bool(server.tls_cert or upstream.tls_ca),
        tls_ca=ca,
        tls_cert=server.tls_cert if mtls else "",
        tls_key=server.tls_key if mtls else "",
        tls_server_name=upstream.tls_server_name,
        max_message_bytes=server.max_message_bytes,
        timeout=upstream.default_timeout_s,
        stream_timeout=upstream.default_timeout_s,
    )


def timeout_for(config: Config, deadline: float | None, hop: str) -> float:
    """Seconds to give an upstream call: the caller's remaining deadline minus the
    reserve, or the default when the caller set none. DEADLINE_TOO_SHORT when nothing
    is left (the call is not started)."""
    u = config.upstream
    timeout = forward_timeout_s(
        deadline, reserve_s=u.reserve_ms / 1000.0, default_s=u.default_timeout_s
    )
    assert timeout is not None  # default_s is set
    if timeout <= 0:
        raise DeadlineTooShort(f"no time left for the {hop} hop")
    return timeout


def timing_from_proto(t: common_pb2.HopTiming) -> HopTime:
    """Domain timing of a wire timing."""
    return HopTime(t.hop, t.queue_us / 1e6, t.compute_us / 1e6, t.total_us / 1e6, t.batch_size)


def timing_to_proto(t: HopTime) -> common_pb2.HopTiming:
    """Wire timing of a domain timing."""
    return hop_timing(
        t.hop, queue_s=t.queue_s, compute_s=t.compute_s, total_s=t.total_s,
        batch_size=t.batch_size,
    )


def cap_max_tokens(sampling, cap: int) -> None:
    """Lower ``sampling.max_tokens`` (a SamplingParams) to ``cap`` when it is unset or
    larger (``cap`` 0: leave it)."""
    if cap > 0 and (not sampling.HasField("max_tokens") or sampling.max_tokens > cap):
        sampling.max_tokens = cap


def plain_struct(struct: Any) -> dict[str, Any]:
    """A ``google.protobuf.Struct`` as plain Python values, as ``json_format.MessageToDict``
    gives them (numbers float, an unset value None, NaN and infinities refused), walked
    directly: MessageToDict was ~9 % of the pipeline's CPU per Answer over a remote search
    hop (20 hits with metadata)."""
    return {key: _plain(value) for key, value in struct.fields.items()}


def _plain(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if math.isinf(number) or math.isnan(number):
            raise ValueError(f"a metadata number is {number}")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return plain_struct(value.struct_value)
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    return None  # null_value, or unset
