"""Typed calls to the standard ``grpc.health.v1.Health`` service, sync and async.

Statuses are the ``HealthCheckResponse.ServingStatus`` names: "SERVING", "NOT_SERVING",
"SERVICE_UNKNOWN" (the process does not host that service) and "UNKNOWN".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import BACKBONE_SERVICES, ClientOptions, call_kwargs
from clients.errors import NotFoundError, aiterate, iterate, translated_errors

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
SERVICE_UNKNOWN = "SERVICE_UNKNOWN"

#: What ``check_all`` asks about by default: the whole process ("") and every service.
ALL_SERVICES: tuple[str, ...] = ("", *BACKBONE_SERVICES)


def status_name(response: health_pb2.HealthCheckResponse) -> str:
    """The response's serving status as its enum name."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def is_healthy(statuses: dict[str, str]) -> bool:
    """True when every service is SERVING, ignoring those the process does not host.

    The process as a whole ("") must be SERVING when it was asked about.
    """
    hosted = {name: s for name, s in statuses.items() if s != SERVICE_UNKNOWN or name == ""}
    return bool(hosted) and all(s == SERVING for s in hosted.values())


class HealthClient:
    """Sync health checks; get one as ``Client(...).health``."""

    def __init__(self, channel: grpc.Channel, options: ClientOptions) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._options = options

    def check(self, service: str = "", *, timeout: float | None = None) -> str:
        """The status of one service ("" is the whole process); unknown: SERVICE_UNKNOWN."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            with translated_errors():
                response = self._stub.Check(request, **call_kwargs(self._options, timeout))
        except NotFoundError:  # the health protocol's answer for an unknown service
            return SERVICE_UNKNOWN
        return status_name(response)

    def check_all(
        self, services: Iterable[str] = ALL_SERVICES, *, timeout: float | None = None
    ) -> dict[str, str]:
        """The status of each service, in order."""
        return {name: self.check(name, timeout=timeout) for name in services}

    def watch(self, service: str = "", *, timeout: float | None = None) -> Iterator[str]:
        """The service's status now and after every change (``stream_timeout`` default)."""
        request = health_pb2.HealthCheckRequest(service=service)
        call = self._stub.Watch(request, **call_kwargs(self._options, timeout, stream=True))
        for response in iterate(call):
            yield status_name(response)


class AsyncHealthClient:
    """Async health checks; get one as ``AsyncClient(...).health``."""

    def __init__(self, channel: grpc.aio.Channel, options: ClientOptions) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._options = options

    async def check(self, service: str = "", *, timeout: float | None = None) -> str:
        """The status of one service ("" is the whole process); unknown: SERVICE_UNKNOWN."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            with translated_errors():
                response = await self._stub.Check(
                    request, **call_kwargs(self._options, timeout)
                )
        except NotFoundError:  # the health protocol's answer for an unknown service
            return SERVICE_UNKNOWN
        return status_name(response)

    async def check_all(
        self, services: Iterable[str] = ALL_SERVICES, *, timeout: float | None = None
    ) -> dict[str, str]:
        """The status of each service, in order."""
        return {name: await self.check(name, timeout=timeout) for name in services}

    async def watch(
        self, service: str = "", *, timeout: float | None = None
    ) -> AsyncIterator[str]:
        """The service's status now and after every change (``stream_timeout`` default)."""
        request = health_pb2.HealthCheckRequest(service=service)
        call = self._stub.Watch(request, **call_kwargs(self._options, timeout, stream=True))
        async for response in aiterate(call):
            yield status_name(response)
