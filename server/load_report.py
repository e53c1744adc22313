"""Every hop reports its load in the trailing metadata of each successful answer, so
every router replica in front of it balances on the same numbers:

* ``backbone-queue-wait-ms``: the estimated wait of a newly queued item before its
  batch runs (the hop's ``load()``: its batcher's ``estimated_delay_s()``), in ms;
* ``backbone-in-flight``: calls this process is running now.

``LoadReportInterceptor`` adds them after the handler (merged with trailing metadata
the handler set); ``parse`` reads them back on the router's side.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

log = logging.getLogger(__name__)

QUEUE_WAIT_KEY = "backbone-queue-wait-ms"
IN_FLIGHT_KEY = "backbone-in-flight"
LOAD_KEYS = frozenset({QUEUE_WAIT_KEY, IN_FLIGHT_KEY})


def load_metadata(wait_s: float, in_flight: int) -> tuple[tuple[str, str], ...]:
    """The two load entries for a queue wait in seconds and a call count."""
    return ((QUEUE_WAIT_KEY, f"{max(0.0, wait_s) * 1e3:.3f}"), (IN_FLIGHT_KEY, str(max(0, in_flight))))


def parse(metadata: Iterable[tuple[str, Any]] | None) -> tuple[float | None, int | None]:
    """(queue wait in seconds, in-flight count) from trailing metadata; None where absent
    or unreadable."""
    wait = count = None
    for key, value in metadata or ():
        if key not in LOAD_KEYS:
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        try:
            if key == QUEUE_WAIT_KEY:
                wait = float(text) / 1e3
            else:
                count = int(text)
        except ValueError:
            continue
    return wait, count


def _hop_wait_s(hop: Any) -> float:
    load = getattr(hop, "load", None)
    if load is None:
        return 0.0
    try:
        return float(load())
    except Exception:  # noqa: BLE001 - a load estimate must never fail a call
        log.exception("load() of hop %s raised", getattr(hop, "name", hop))
        return 0.0


class LoadReportInterceptor(grpc.aio.ServerInterceptor):
    """Adds the load entries to the trailing metadata of the hops' own methods."""

    def __init__(self, hops_by_service: Mapping[str, Any], in_flight: Callable[[], int]) -> None:
        self._hops = dict(hops_by_service)
        self._in_flight = in_flight

    def _add(self, context: grpc.aio.ServicerContext, hop: Any) -> None:
        own = [(k, v) for k, v in (context.trailing_metadata() or ()) if k not in LOAD_KEYS]
        context.set_trailing_metadata((*own, *load_metadata(_hop_wait_s(hop), self._in_flight())))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = details.method.rpartition("/")[0].lstrip("/")
        hop = self._hops.get(service)
        if handler is None or hop is None:
            return handler
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            fn = getattr(handler, kind)
            if fn is None:
                continue
            if handler.response_streaming and not inspect.iscoroutinefunction(fn):

                async def streamed(request, context, _fn=fn):
                    responses = _fn(request, context)
                    try:
                        async for response in responses:
                            yield response
                        self._add(context, hop)
                    finally:  # closed early (abort, caller gone): close the handler's too
                        await responses.aclose()

                return handler._replace(**{kind: streamed})

            async def unary(request, context, _fn=fn):
                response = await _fn(request, context)
                self._add(context, hop)
                return response

            return handler._replace(**{kind: unary})
        return handler
