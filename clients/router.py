"""Typed calls to ``backbone.v1.RouterService`` (the router's view of its replicas),
sync and async."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import grpc.aio
from backbone.v1 import router_service_pb2 as pb
from backbone.v1 import router_service_pb2_grpc as pb_grpc

from clients.channel import ClientOptions, call_kwargs
from clients.errors import translated_errors

SHORT_SERVICE = {
    "backbone.v1.EmbeddingService": "embedding",
    "backbone.v1.VectorSearchService": "search",
    "backbone.v1.RerankService": "rerank",
    "backbone.v1.GenerationService": "generation",
}
LONG_SERVICE = {v: k for k, v in SHORT_SERVICE.items()}


@dataclass(frozen=True)
class EndpointInfo:
    """One replica of one service as the router sees it (latencies in seconds)."""

    service: str
    address: str
    health: str  # SERVING, NOT_SERVING, UNKNOWN
    breaker: str  # CLOSED, OPEN, HALF_OPEN, UNKNOWN
    in_flight: int
    latency_ewma_s: float
    latency_p99_s: float
    calls: int
    failures: int
    ejections: int
    ejected: bool
    reported_queue_wait_s: float
    reported_in_flight: int
    weight: float
    retries: int
    hedges: int


def _enum_name(enum, value: int, prefix: str) -> str:  # noqa: ANN001 - an EnumTypeWrapper
    name = enum.Name(value)
    return "UNKNOWN" if name.endswith("UNSPECIFIED") else name.removeprefix(prefix)


def parse_endpoint(e: pb.Endpoint) -> EndpointInfo:
    """``Endpoint`` -> EndpointInfo."""
    return EndpointInfo(
        service=e.service, address=e.address,
        health=_enum_name(pb.EndpointHealth, e.health, "ENDPOINT_HEALTH_"),
        breaker=_enum_name(pb.BreakerState, e.breaker, "BREAKER_STATE_"),
        in_flight=e.in_flight, latency_ewma_s=e.latency_ewma_us / 1e6,
        latency_p99_s=e.latency_p99_us / 1e6, calls=e.calls, failures=e.failures,
        ejections=e.ejections, ejected=e.ejected,
        reported_queue_wait_s=e.reported_queue_wait_us / 1e6,
        reported_in_flight=e.reported_in_flight, weight=e.weight,
        retries=e.retries, hedges=e.hedges,
    )


def service_name(service: str) -> str:
    """A short name (embedding, search, rerank, generation) or a full one -> full."""
    return LONG_SERVICE.get(service, service)


class RouterClient:
    """Sync RouterService calls on a shared channel."""

    def __init__(self, channel: grpc.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.RouterServiceStub(channel)
        self._options = options

    def list_endpoints(self, service: str = "", timeout: float | None = None) -> list[EndpointInfo]:
        """Every replica the router knows (of ``service`` when given)."""
        with translated_errors():
            response = self._stub.ListEndpoints(
                pb.ListEndpointsRequest(service=service_name(service)),
                **call_kwargs(self._options, timeout))
        return [parse_endpoint(e) for e in response.endpoints]


class AsyncRouterClient:
    """Asyncio RouterService calls on a shared channel."""

    def __init__(self, channel: grpc.aio.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.RouterServiceStub(channel)
        self._options = options

    async def list_endpoints(self, service: str = "", timeout: float | None = None) -> list[EndpointInfo]:
        """Every replica the router knows (of ``service`` when given)."""
        with translated_errors():
            response = await self._stub.ListEndpoints(
                pb.ListEndpointsRequest(service=service_name(service)),
                **call_kwargs(self._options, timeout))
        return [parse_endpoint(e) for e in response.endpoints]
