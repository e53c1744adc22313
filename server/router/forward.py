"""Forwarding of the hops' RPCs to replicas, bytes in and bytes out.

Every method of the four hop services gets a generic handler whose (de)serializers are
identities: the request's bytes go to the replica untouched and the answer's bytes come
back untouched; only the units of work are counted from the bytes (``units``). The
policy (which replica, retries, hedges, breakers) is ``router.attempts.ReplicaSet``;
this module only turns gRPC calls into attempts and their errors into ``AttemptError``,
and relays a replica's final error (code, message, ErrorInfo) to the caller as it is.

Streams stay streams: Generate is forwarded message by message (retried or hedged only
until its first message), Upsert/Ingest stream the caller's messages through, and
EmbedStream relays both ways. A caller that cancels or runs out of deadline cancels the
replica's call (its task is cancelled; gRPC cancels the upstream RPC), and a replica's
deadline is the caller's remaining one minus a reserve.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2, status_pb2

from backbone.v1 import (  # noqa: F401 - imported to register the services' descriptors
    embedding_service_pb2,
    generation_service_pb2,
    rerank_service_pb2,
    vector_search_service_pb2,
)
from router.attempts import AttemptError, ReplicaSet
from router.idempotency import is_hedgeable, is_idempotent, may_replay_before_first_message
from server import load_report
from server.calls import deadline_of
from server.errors import NotImplementedYet, Unavailable
from server.router.units import units_of
from server.router.upstream_pool import UpstreamPool
from server.telemetry import trace_headers

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Metadata that belongs to the transport, not to the call: never forwarded.
HOP_BY_HOP = ("grpc-", ":")
HOP_BY_HOP_KEYS = frozenset({"user-agent", "content-type", "te", "host"})
TRACE_KEYS = frozenset({"traceparent", "tracestate"})


def forwarded_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    """The caller's metadata to send on (authorization, x-backbone-priority, ...),
    without transport entries; W3C ``traceparent``/``tracestate`` are the router's own
    span's when it has one (the caller's trace continues under it; ``server.telemetry``),
    else the caller's."""
    own = trace_headers()  # empty when no span is current (an untraced stream)
    kept = tuple(
        (k, v) for k, v in (context.invocation_metadata() or ())
        if not k.startswith(HOP_BY_HOP) and k not in HOP_BY_HOP_KEYS
        and not (own and k in TRACE_KEYS)
    )
    return kept + tuple(own.items())


def returned_metadata(metadata) -> tuple[tuple[str, Any], ...]:  # noqa: ANN001 - grpc Metadata
    """A replica's trailing metadata to hand to the caller: without its load report
    (this router reports its own) or transport entries."""
    return tuple(
        (k, v) for k, v in (metadata or ())
        if k not in load_report.LOAD_KEYS and not k.startswith(":")
        and (k == STATUS_DETAILS_KEY or not k.startswith("grpc-"))
    )


def attempt_error(exc: grpc.aio.AioRpcError) -> AttemptError:
    """The router's view of a replica's error: code, ErrorInfo reason, RetryInfo delay."""
    reason, retry_after = "", None
    for key, value in exc.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # noqa: BLE001 - undecodable details: judge by the code alone
            break
        for detail in status.details:
            info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                reason = info.reason
            elif detail.Unpack(retry):
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return AttemptError(exc.code().name, reason=reason, retry_after_s=retry_after, cause=exc)


async def relay(context: grpc.aio.ServicerContext, err: AttemptError) -> None:
    """End the caller's call with the replica's error as it was (raises)."""
    cause = err.cause
    if isinstance(cause, grpc.aio.AioRpcError):
        if context.done():  # the caller's call already ended (its deadline): nobody to tell
            raise asyncio.CancelledError
        try:
            await context.abort(cause.code(), cause.details() or "",
                                trailing_metadata=returned_metadata(cause.trailing_metadata()))
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - the call ended meanwhile (deadline): sending failed
            raise asyncio.CancelledError from None
    raise Unavailable(f"replica error {err.code}")


class CallerStream:
    """The caller's request stream as handed to a replica's call.

    The guard's checks on the caller's stream (``server.decoding.checked_requests``: an
    empty stream-in call is EMPTY_INPUT) raise while gRPC's client reads the iterator to
    send it upstream; gRPC would swallow that and cancel the upstream call, and the
    caller's call then hung until its deadline. Here the error ends the upstream stream
    (half-close) and is kept; :meth:`raise_error` raises it once the replica has answered,
    so the caller gets the same status and ErrorInfo as from the replica directly."""

    def __init__(self, requests) -> None:  # noqa: ANN001 - the caller's request iterator
        self._requests = requests
        self.error: Exception | None = None

    async def __aiter__(self):
        try:
            async for message in self._requests:
                yield message
        except Exception as exc:  # noqa: BLE001 - re-raised by raise_error
            self.error = exc

    def raise_error(self) -> None:
        """Raise the caller stream's own error, when it had one."""
        if self.error is not None:
            raise self.error


class Forwarder:
    """Generic handlers that forward one service's methods through the pool."""

    def __init__(self, pool_ref) -> None:  # noqa: ANN001 - callable returning the pool
        self._pool_ref = pool_ref
        self._callables: dict[tuple[str, str, str], Any] = {}

    def handlers(self, service: str) -> grpc.GenericRpcHandler:
        """A generic handler for every method of ``service``."""
        desc = descriptor_pool.Default().FindServiceByName(service)
        methods = {}
        for m in desc.methods:
            kind = (m.client_streaming, m.server_streaming)
            if service == "backbone.v1.GenerationService" and m.name == "Abort":
                fn, make = self._abort_all, grpc.unary_unary_rpc_method_handler
            else:
                fn, make = {
                    (False, False): (self._unary, grpc.unary_unary_rpc_method_handler),
                    (False, True): (self._server_stream, grpc.unary_stream_rpc_method_handler),
                    (True, False): (self._client_stream, grpc.stream_unary_rpc_method_handler),
                    (True, True): (self._bidi, grpc.stream_stream_rpc_method_handler),
                }[kind]
            methods[m.name] = make(_bind(fn, service, m.name))
        return grpc.method_handlers_generic_handler(service, methods)

    # -- helpers -----------------------------------------------------------------------
    def _set(self, service: str) -> tuple[UpstreamPool, ReplicaSet]:
        pool: UpstreamPool | None = self._pool_ref()
        rs = pool.sets.get(service) if pool is not None else None
        if rs is None:
            raise NotImplementedYet(f"this router has no upstream for {service} (config [router.upstreams])")
        return pool, rs

    def _callable(self, pool: UpstreamPool, address: str, path: str, kind: str):
        key = (address, path, kind)
        fn = self._callables.get(key)
        channel = pool.channel(address)
        if fn is None or fn[0] is not channel:
            fn = (channel, getattr(channel, kind)(path))  # no (de)serializers: bytes
            self._callables[key] = fn
        return fn[1]

    # -- context-free cores (also used in-process: server.router.routed) -----------------
    async def call_unary(self, service: str, method: str, request: bytes,
                         deadline: float | None, md) -> tuple[bytes, Any]:  # noqa: ANN001
        """One unary call through the policy: (response bytes, trailing metadata); raises
        ``AttemptError`` (the last replica's error) or the policy's own refusal."""
        pool, rs = self._set(service)
        path = f"/{service}/{method}"

        async def attempt(ep, timeout):
            call = self._callable(pool, ep.address, path, "unary_unary")(request, timeout=timeout, metadata=md)
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                raise attempt_error(exc) from None
            trailing = await call.trailing_metadata()
            ep.report(*load_report.parse(trailing))
            return response, trailing

        win = await rs.run(attempt, deadline=deadline, units=units_of(service, method, request),
                           replay=is_idempotent(service, method),
                           hedge=is_hedgeable(service, method))
        return win.value

    async def open_stream(self, service: str, method: str, request: bytes,
                          deadline: float | None, md):  # noqa: ANN001, ANN201
        """A server stream through the policy, retried or hedged until its first message:
        (replica set, win); ``win.value`` is (call, first message). The caller relays the
        rest and closes the bookkeeping with ``rs.finish_stream``."""
        pool, rs = self._set(service)
        path = f"/{service}/{method}"

        async def attempt(ep, timeout):
            call = self._callable(pool, ep.address, path, "unary_stream")(request, timeout=timeout, metadata=md)
            try:
                first = await call.read()
            except asyncio.CancelledError:
                call.cancel()  # a losing hedge: abort it in its engine
                raise
            except grpc.aio.AioRpcError as exc:
                raise attempt_error(exc) from None
            return call, first

        replay = may_replay_before_first_message(service, method)
        win = await rs.run(attempt, deadline=deadline, replay=replay,
                           hedge=replay and is_hedgeable(service, method),
                           first_message=True, keep_open=True,
                           discard=lambda value: value[0].cancel())
        return rs, win

    # -- the four kinds --------------------------------------------------------------------
    async def _unary(self, service: str, method: str, request: bytes, context) -> bytes:
        try:
            response, trailing = await self.call_unary(
                service, method, request, deadline_of(context), forwarded_metadata(context))
        except AttemptError as err:
            await relay(context, err)
        context.set_trailing_metadata(returned_metadata(trailing))
        return response

    async def _server_stream(self, service: str, method: str, request: bytes, context):
        try:
            rs, win = await self.open_stream(service, method, request, deadline_of(context),
                                             forwarded_metadata(context))
        except AttemptError as err:
            await relay(context, err)
        call, message = win.value
        # The relay, inline (one generator layer less per message than _relay_stream).
        error: AttemptError | None = None
        caller_left = True
        try:
            while message is not grpc.aio.EOF:
                yield message
                message = await call.read()
            context.set_trailing_metadata(returned_metadata(await call.trailing_metadata()))
            caller_left = False
        except grpc.aio.AioRpcError as exc:
            error = attempt_error(exc)
            caller_left = False
            await relay(context, error)
        finally:
            if caller_left and not call.done():
                call.cancel()  # the caller went away (cancel, deadline, disconnect): so does the replica's call
            rs.finish_stream(win, error, caller_cancelled=caller_left)

    async def _client_stream(self, service: str, method: str, requests, context) -> bytes:
        pool, rs = self._set(service)
        path, md = f"/{service}/{method}", forwarded_metadata(context)
        requests = CallerStream(requests)

        async def attempt(ep, timeout):
            call = self._callable(pool, ep.address, path, "stream_unary")(requests, timeout=timeout, metadata=md)
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                raise attempt_error(exc) from None
            return response, await call.trailing_metadata()

        try:  # never replayed: the caller's stream is not buffered
            win = await rs.run(attempt, deadline=deadline_of(context))
        except AttemptError as err:
            requests.raise_error()
            await relay(context, err)
        requests.raise_error()
        response, trailing = win.value
        context.set_trailing_metadata(returned_metadata(trailing))
        return response

    async def _bidi(self, service: str, method: str, requests, context):
        pool, rs = self._set(service)
        path, md = f"/{service}/{method}", forwarded_metadata(context)
        requests = CallerStream(requests)

        async def attempt(ep, timeout):
            return self._callable(pool, ep.address, path, "stream_stream")(requests, timeout=timeout, metadata=md), None

        win = await rs.run(attempt, deadline=deadline_of(context), keep_open=True)
        call, _ = win.value
        relayed = _relay_stream(rs, win, call, None, context)
        try:
            async for item in relayed:
                yield item
        finally:
            await relayed.aclose()
        requests.raise_error()

    async def _abort_all(self, service: str, method: str, request: bytes, context) -> bytes:
        """Abort goes to every healthy replica (the router does not pin request ids to
        replicas): aborted when any of them had the request."""
        pool, rs = self._set(service)
        path, md = f"/{service}/{method}", forwarded_metadata(context)
        timeout = context.time_remaining() or 5.0
        calls = [self._callable(pool, ep.address, path, "unary_unary")(request, timeout=timeout, metadata=md)
                 for ep in rs.healthy()]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        aborted = any(isinstance(a, bytes) and generation_service_pb2.AbortResponse.FromString(a).aborted
                      for a in answers)
        return generation_service_pb2.AbortResponse(aborted=aborted).SerializeToString()


async def _relay_stream(rs: ReplicaSet, win, call, message, context):  # noqa: ANN001
    """Yield a replica stream's messages to the caller (``message``: one already read),
    then its trailing metadata; relay its error; close the bookkeeping either way."""
    error: BaseException | None = None
    caller_left = True
    try:
        while True:
            if message is None:
                message = await call.read()
            if message is grpc.aio.EOF:
                break
            yield message
            message = None
        context.set_trailing_metadata(returned_metadata(await call.trailing_metadata()))
        caller_left = False
    except grpc.aio.AioRpcError as exc:
        error = attempt_error(exc)
        caller_left = False
        await relay(context, error)
    finally:
        if caller_left and not call.done():
            call.cancel()  # the caller went away (cancel, deadline, disconnect): so does the replica's call
        rs.finish_stream(win, error, caller_cancelled=caller_left)


def _bind(fn, service: str, method: str):  # noqa: ANN001, ANN202
    """``fn`` with its service and method bound; still a coroutine or async generator
    function to gRPC and the interceptors (a partial keeps that visible to inspect)."""
    return functools.partial(fn, service, method)
