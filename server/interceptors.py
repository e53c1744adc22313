"""Server interceptors: error mapping, bearer-token auth, calls in flight, RPC metrics.

Each interceptor wraps the method handler's behaviour function, whatever its arity
(unary or streaming in, unary or streaming out), so one mechanism serves all four kinds.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from server import metrics
from server.decoding import (
    Undecodable,
    check_enums,
    checked_requests,
    decode_error,
    DRAIN_S,
    drain_requests,
    safe_deserializer,
)
from router.errors import quote
from server.errors import (
    ERROR_DOMAIN,
    BackboneError,
    NotImplementedYet,
    Unauthenticated,
    Unavailable,
    as_backbone_error,
)

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Longest error message sent (characters); longer ones are cut with a marker.
MAX_MESSAGE_CHARS = 512
# Methods reachable without a token: load balancers and orchestrators probe health.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

Behaviour = Callable[..., Any]
# A wrapper gets the call's (request or request iterator, context) and the inner behaviour.
UnaryAround = Callable[[Behaviour], Behaviour]


def rich_status(err: BackboneError) -> tuple[grpc.StatusCode, bytes]:
    """The canonical code and serialized google.rpc.Status for ``err``: exactly one ErrorInfo,
    plus a RetryInfo when the error carries pushback (``retry_after_s``)."""
    code = grpc.StatusCode[err.status]
    # Bounded echoes, whatever the raising code did: every metadata value (where a
    # user-supplied name is quoted) is cut to router.errors.QUOTE_CHARS, the message to
    # MAX_MESSAGE_CHARS, so an error's trailers stay small for any input.
    info = error_details_pb2.ErrorInfo(
        reason=err.reason, domain=ERROR_DOMAIN,
        metadata={key: quote(value) for key, value in err.metadata.items()},
    )
    message = quote(err.message, MAX_MESSAGE_CHARS)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if err.retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(max(0.0, err.retry_after_s) * 1e9))
        pushback = any_pb2.Any()
        pushback.Pack(retry)
        details.append(pushback)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return code, status.SerializeToString()


async def abort_with(context: grpc.aio.ServicerContext, err: BackboneError) -> None:
    """End the call with ``err``'s status and ErrorInfo (raises, as context.abort does)."""
    code, details = rich_status(err)
    await context.abort(
        code, quote(err.message, MAX_MESSAGE_CHARS),
        trailing_metadata=((STATUS_DETAILS_KEY, details),),
    )


def _as_backbone_error(exc: BaseException, method: str) -> BackboneError:
    mapped = as_backbone_error(exc)
    if mapped is not None:
        return mapped
    if isinstance(exc, NotImplementedError):
        return NotImplementedYet(f"{method} is not implemented by this server")
    log.exception("unhandled error in %s", method, exc_info=exc)
    return BackboneError(f"internal error in {method}")  # INTERNAL; no user data in it


def _wrap_behaviour(handler: grpc.RpcMethodHandler, around: UnaryAround) -> grpc.RpcMethodHandler:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        fn = getattr(handler, kind)
        if fn is not None:
            return handler._replace(**{kind: around(fn)})
    return handler


class _Call:
    """A call in flight: its handler task, and whether gRPC is sending a streamed response
    of it (the handler is suspended at its ``yield``)."""

    __slots__ = ("task", "sending")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.sending = False


class InFlight:
    """The calls running now, so a shutdown can answer the ones still running when its
    grace runs out itself (UNAVAILABLE with its ErrorInfo, which a client may retry on
    another replica) instead of leaving them to gRPC core's bare cut."""

    def __init__(self) -> None:
        self._calls: dict[asyncio.Task, _Call] = {}
        self._cutting = False

    def __len__(self) -> int:
        return len(self._calls)

    def enter(self) -> _Call | None:
        """Register the calling handler's task (None outside a task)."""
        task = asyncio.current_task()
        if task is None:
            return None
        call = self._calls[task] = _Call(task)
        return call

    def leave(self, call: _Call | None) -> None:
        """Forget a call once it ends."""
        if call is not None:
            self._calls.pop(call.task, None)

    def cut(self) -> int:
        """End every running call with UNAVAILABLE: cancel its handler, or, while gRPC is
        sending one of its streamed responses (a cancel there would surface as CANCELLED),
        let the handler answer as soon as that send is done. Returns how many ran."""
        self._cutting = True
        live = [call for call in self._calls.values() if not call.task.done()]
        for call in live:
            if not call.sending:
                call.task.cancel()
        return len(live)

    def shutting_down(self) -> bool:
        """True once ``cut`` ran: a cancellation then comes from the shutdown, not from
        the caller."""
        return self._cutting


SHUTDOWN_MESSAGE = "the server is shutting down; retry the call (on another replica)"


def _around(
    method: str,
    streaming_out: bool,
    check: Callable[[grpc.aio.ServicerContext], None],
    in_flight: InFlight,
    streaming_in: bool = False,
):
    """Wrap a behaviour: run ``check`` first, answer an undecodable request or one with an
    unknown enum value (see ``server.decoding``), map BackboneError and bugs to rich status, keep the call's task
    in ``in_flight`` while it runs."""

    def admit(request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The request (or checked request stream) the behaviour gets, after ``check``."""
        check(context)
        if streaming_in:
            return checked_requests(request, method, require_message=not streaming_out)
        if isinstance(request, Undecodable):
            raise decode_error(method, request)
        check_enums(request)
        return request

    def wrap(fn: Behaviour) -> Behaviour:
        if _yields_responses(fn, streaming_out):

            async def stream_wrapper(request: Any, context: grpc.aio.ServicerContext):
                call = in_flight.enter()
                responses = None
                try:
                    responses = fn(admit(request, context), context)
                    async for response in responses:
                        if call is not None:
                            call.sending = True
                        yield response
                        if call is not None:
                            call.sending = False
                        if in_flight.shutting_down():  # cut while gRPC was sending
                            await abort_with(context, Unavailable(SHUTDOWN_MESSAGE))
                except asyncio.CancelledError:
                    if not in_flight.shutting_down():
                        raise  # the caller left: nothing to answer
                    await abort_with(context, Unavailable(SHUTDOWN_MESSAGE))
                except Exception as exc:  # noqa: BLE001 - mapped, never UNKNOWN
                    if streaming_in:  # bidi: a pause may be a client waiting for an answer
                        await drain_requests(request)
                    if _is_abort(exc):
                        raise
                    await abort_with(context, _as_backbone_error(exc, method))
                finally:
                    in_flight.leave(call)
                    # left mid-stream (abort, caller gone): the handler's own cleanup runs
                    # now, not whenever its generator is collected
                    close = getattr(responses, "aclose", None)
                    if close is not None:
                        try:
                            await close()
                        except Exception:  # noqa: BLE001 - the call's outcome is set already
                            log.exception("closing the response stream of %s failed", method)

            return stream_wrapper

        async def unary_wrapper(request: Any, context: grpc.aio.ServicerContext):
            call = in_flight.enter()
            try:
                return await fn(admit(request, context), context)
            except asyncio.CancelledError:
                if not in_flight.shutting_down():
                    raise  # the caller left: nothing to answer
                await abort_with(context, Unavailable(SHUTDOWN_MESSAGE))
            except Exception as exc:  # noqa: BLE001 - mapped, never UNKNOWN
                if streaming_in:  # one answer at the end: the client must half-close
                    await drain_requests(request, idle_s=DRAIN_S)  # see drain_requests
                if _is_abort(exc):
                    raise
                await abort_with(context, _as_backbone_error(exc, method))
            finally:
                in_flight.leave(call)

        return unary_wrapper

    return wrap


def _yields_responses(fn: Behaviour, streaming_out: bool) -> bool:
    """True when ``fn`` streams by yielding; False when it is awaited (unary responses, or
    streams written with ``context.write`` such as grpc.health.v1 Watch). gRPC picks the
    same way (a coroutine function is awaited), so a wrapper must keep the inner's style."""
    return streaming_out and not inspect.iscoroutinefunction(fn)


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises grpc.aio.AbortError: the status is already set, let it through.
    return isinstance(exc, grpc.aio.AbortError)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token (when configured) before any work, answers undecodable
    requests INVALID_ARGUMENT (every handler's deserializer is made safe), maps every error a
    handler raises to a canonical status with exactly one ErrorInfo (never UNKNOWN), and
    keeps the calls in flight (``in_flight``) for the shutdown."""

    def __init__(self, auth_token: str = "") -> None:
        self._expected = f"Bearer {auth_token}".encode() if auth_token else b""
        self.in_flight = InFlight()

    def _checker(self, method: str) -> Callable[[grpc.aio.ServicerContext], None]:
        if not self._expected or method.startswith(OPEN_METHOD_PREFIXES):
            return lambda context: None
        expected = self._expected

        def check(context: grpc.aio.ServicerContext) -> None:
            got = ""
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    got = value if isinstance(value, str) else value.decode("latin-1")
                    break
            if not got:
                raise Unauthenticated("missing bearer token (authorization metadata)")
            if not hmac.compare_digest(got.encode(), expected):
                raise Unauthenticated("invalid bearer token")

        return check

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        around = _around(
            method, handler.response_streaming, self._checker(method), self.in_flight,
            streaming_in=handler.request_streaming,
        )
        if handler.request_deserializer is not None:
            # Never raise while decoding: an undecodable request becomes a sentinel the
            # wrapper answers INVALID_ARGUMENT (gRPC itself would say UNKNOWN / INTERNAL).
            handler = handler._replace(
                request_deserializer=safe_deserializer(method, handler.request_deserializer)
            )
        return _wrap_behaviour(handler, around)


class CachedHandlers(grpc.aio.ServerInterceptor):
    """Outermost: the handler the interceptors below it build for a method, built once.

    Every interceptor of this server wraps a handler by its method alone (a call's state
    lives in the wrapper's frame, never in the wrapped handler), so the chain's result for
    a method never changes. Without this, every call awaited each interceptor and re-made
    its wrappers: about 7 % of the router's CPU per forwarded call (py-spy, perf/README.md).
    At most ``LIMIT`` methods are kept (a client may send any method name); a method no
    handler serves (UNIMPLEMENTED) is not kept.
    """

    LIMIT = 1024

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = await continuation(handler_call_details)
            if handler is not None and len(self._handlers) < self.LIMIT:
                self._handlers[method] = handler
        return handler


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs by method and final code and records their latency."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        def around(fn: Behaviour) -> Behaviour:
            if _yields_responses(fn, handler.response_streaming):

                async def stream_wrapper(request, context):
                    started = time.perf_counter()
                    try:
                        async for response in fn(request, context):
                            yield response
                    finally:
                        metrics.observe_rpc(method, _code_name(context), started)

                return stream_wrapper

            async def unary_wrapper(request, context):
                started = time.perf_counter()
                try:
                    return await fn(request, context)
                finally:
                    metrics.observe_rpc(method, _code_name(context), started)

            return unary_wrapper

        return _wrap_behaviour(handler, around)


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:
        return grpc.StatusCode(code).name  # some versions report the raw int
    except ValueError:
        return str(code)
