"""RouterService: what the router knows of its replicas (``backbone endpoints``).

In a router process every replica of every configured service is listed. The embedded
default has no replicas: it lists its in-process hops once, with address "in-process"
(health from the hop, breaker CLOSED, no latency figures).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from backbone.v1 import router_service_pb2 as pb, router_service_pb2_grpc
from router.breaker import State
from router.endpoints import Endpoint

BREAKER = {
    State.CLOSED: pb.BREAKER_STATE_CLOSED,
    State.OPEN: pb.BREAKER_STATE_OPEN,
    State.HALF_OPEN: pb.BREAKER_STATE_HALF_OPEN,
}


def health_of(healthy: bool | None) -> int:
    """EndpointHealth of a health flag (None: not probed yet)."""
    if healthy is None:
        return pb.ENDPOINT_HEALTH_UNSPECIFIED
    return pb.ENDPOINT_HEALTH_SERVING if healthy else pb.ENDPOINT_HEALTH_NOT_SERVING


def endpoint_message(ep: Endpoint, now: float) -> pb.Endpoint:
    """The wire form of one replica's state."""
    p99 = ep.latency.percentile(0.99)
    units = ep.ewma_per_unit_s
    mean = ep.latency.percentile(0.5)
    ep.breaker.allows(now)  # let an elapsed cool-down show as HALF_OPEN
    return pb.Endpoint(
        service=ep.service, address=ep.address, health=health_of(ep.healthy),
        breaker=BREAKER[ep.breaker.state], in_flight=ep.in_flight,
        latency_ewma_us=int((mean if units is None else units) * 1e6) if (units or mean) else 0,
        latency_p99_us=int((p99 or 0.0) * 1e6), calls=ep.calls, failures=ep.failures,
        ejections=ep.ejections, ejected=ep.ejected_until > now,
        reported_queue_wait_us=int(ep.reported_wait_s * 1e6),
        reported_in_flight=ep.reported_in_flight, weight=ep.weight,
        retries=ep.retries, hedges=ep.hedges,
        latency_per_unit_us=int((units or 0.0) * 1e6),
    )


class RouterServicer(router_service_pb2_grpc.RouterServiceServicer):
    """ListEndpoints over the router's replica sets."""

    def __init__(self, sets: Callable[[], dict[str, Any]]) -> None:
        self._sets = sets

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context) -> pb.ListEndpointsResponse:  # noqa: N802
        """Every replica (of ``request.service`` when set), by service then address."""
        now = time.monotonic()
        out = pb.ListEndpointsResponse()
        for service, rs in sorted(self._sets().items()):
            if request.service and service != request.service:
                continue
            for address in sorted(rs.endpoints):
                out.endpoints.append(endpoint_message(rs.endpoints[address], now))
            out.retry_budget_left[service] = rs.budget.left
        return out


class InProcessRouterServicer(router_service_pb2_grpc.RouterServiceServicer):
    """ListEndpoints of the embedded default: its own hops, address "in-process"."""

    def __init__(self, hops: Iterable[Any]) -> None:
        self._hops = list(hops)

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context) -> pb.ListEndpointsResponse:  # noqa: N802
        """One endpoint per service of each in-process hop."""
        out = pb.ListEndpointsResponse()
        for hop in self._hops:
            for service in hop.service_names:
                if request.service and service != request.service:
                    continue
                try:
                    healthy = bool(hop.healthy())
                except Exception:  # noqa: BLE001 - a broken check is a sick hop
                    healthy = False
                out.endpoints.append(pb.Endpoint(
                    service=service, address="in-process", health=health_of(healthy),
                    breaker=pb.BREAKER_STATE_CLOSED))
        out.endpoints.sort(key=lambda e: e.service)
        return out


def add_in_process_router(server, hops: Iterable[Any]) -> None:  # noqa: ANN001 - grpc.aio.Server
    """Register the embedded default's RouterService (its hops, "in-process")."""
    router_service_pb2_grpc.add_RouterServiceServicer_to_server(InProcessRouterServicer(hops), server)
