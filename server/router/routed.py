"""The router as an in-process channel: a hop in the router's own process (the pipeline,
``backbone serve router pipeline``) calls the replicas through the router's policy
(picking, breakers, retries, hedges, deadlines) with one gRPC leg per call instead of
two (caller -> router -> replica).

``RoutedChannel`` is the part of ``grpc.aio.Channel`` that generated stubs and the
upstream clients (``server.upstream.remote``) use: ``unary_unary`` and ``unary_stream``
multi-callables. Requests are serialized here and forwarded as bytes by the router's
``Forwarder`` cores, as a caller's would be; a replica's error comes back as the
replica's own ``grpc.aio.AioRpcError`` (so the clients map it as they map a direct
call's), the policy's refusals as the router's errors (OVERLOADED, CIRCUIT_OPEN, ...).
The caller's span context goes on as ``traceparent``, as the OpenTelemetry client
interceptor would send it.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from router.attempts import AttemptError
from server.errors import Unavailable
from server.router.forward import Forwarder, attempt_error
from server.telemetry import trace_headers


def _raise(err: AttemptError) -> None:
    """Raise the replica's own error (or UNAVAILABLE when it had none)."""
    if isinstance(err.cause, grpc.aio.AioRpcError):
        raise err.cause
    raise Unavailable(f"replica error {err.code}") from None


def _split(path: str) -> tuple[str, str]:
    service, _, method = path.lstrip("/").partition("/")
    return service, method


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _metadata(metadata) -> tuple:  # noqa: ANN001 - grpc metadata or None
    return tuple(metadata or ()) + tuple(trace_headers().items())


class RoutedStream:
    """A server stream through the router: ``async for`` its messages; ``cancel()``
    cancels the replica's call (the caller left)."""

    def __init__(self, forwarder: Forwarder, path: str, request: bytes, deserialize,  # noqa: ANN001
                 deadline: float | None, metadata: tuple) -> None:
        self._args = (forwarder, path, request, deadline, metadata)
        self._deserialize = deserialize
        self._rs = self._win = self._call = None
        self._first: Any = None
        self._closed = False

    def __aiter__(self) -> RoutedStream:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if self._win is None:
            forwarder, path, request, deadline, metadata = self._args
            try:
                self._rs, self._win = await forwarder.open_stream(*_split(path), request, deadline, metadata)
            except AttemptError as err:
                self._closed = True
                _raise(err)
            self._call, self._first = self._win.value
        message, self._first = self._first, None
        try:
            if message is None:
                message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._close(attempt_error(exc), caller_cancelled=False)
            raise
        if message is grpc.aio.EOF:
            self._close(None, caller_cancelled=False)
            raise StopAsyncIteration
        return self._deserialize(message)

    def _close(self, error: AttemptError | None, *, caller_cancelled: bool) -> None:
        if not self._closed and self._win is not None:
            self._rs.finish_stream(self._win, error, caller_cancelled=caller_cancelled)
        self._closed = True

    def cancel(self) -> bool:
        """Cancel the replica's call unless it ended; True when it was running."""
        running = self._call is not None and not self._closed and not self._call.done()
        if running:
            self._call.cancel()
        self._close(None, caller_cancelled=True)
        return running


class RoutedChannel:
    """The router's replicas as one channel (see the module doc)."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._forwarder = forwarder

    def unary_unary(self, path: str, request_serializer=None, response_deserializer=None,  # noqa: ANN001
                    **_: Any):  # noqa: ANN201 - a multi-callable
        """A coroutine function calling ``path`` through the router."""
        service, method = _split(path)
        serialize = request_serializer or (lambda b: b)
        deserialize = response_deserializer or (lambda b: b)

        async def call(request, *, timeout=None, metadata=None, **_: Any):  # noqa: ANN001, ANN202
            try:
                response, _trailing = await self._forwarder.call_unary(
                    service, method, serialize(request), _deadline(timeout), _metadata(metadata))
            except AttemptError as err:
                _raise(err)
            return deserialize(response)

        return call

    def unary_stream(self, path: str, request_serializer=None, response_deserializer=None,  # noqa: ANN001
                     **_: Any):  # noqa: ANN201 - a multi-callable
        """A function returning a ``RoutedStream`` of ``path`` through the router."""
        serialize = request_serializer or (lambda b: b)
        deserialize = response_deserializer or (lambda b: b)

        def call(request, *, timeout=None, metadata=None, **_: Any) -> RoutedStream:  # noqa: ANN001
            return RoutedStream(self._forwarder, path, serialize(request), deserialize,
                                _deadline(timeout), _metadata(metadata))

        return call

    def stream_unary(self, path: str, *_: Any, **__: Any):  # noqa: ANN201
        """Client streams are not routed in-process (no upstream client uses one)."""
        return _not_routed(path)

    stream_stream = stream_unary

    async def close(self, grace: float | None = None) -> None:
        """Nothing to close: the router's pool owns the replica channels."""


def _not_routed(path: str):  # noqa: ANN202
    def call(*_: Any, **__: Any):  # noqa: ANN202
        raise Unavailable(f"{path} is not routed in-process")

    return call
