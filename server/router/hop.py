"""``backbone serve router``: one port serving EmbeddingService, VectorSearchService,
RerankService, GenerationService (forwarded to replicas) and RouterService.

Health: each forwarded service is SERVING while at least one of its replicas is; the
overall status ("") is SERVING while every configured service has one. A service with
no upstream configured answers UNIMPLEMENTED and reports NOT_SERVING. Start-up waits
(``router.start_wait_s`` at most) for a healthy replica of every configured service.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2

from backbone.v1 import router_service_pb2_grpc
from server.hop import HopContext
from server.router import metrics as router_metrics
from server.router.forward import Forwarder
from server.router.routed import RoutedChannel
from server.router.servicer import RouterServicer
from server.router.upstream_pool import SERVICES, UpstreamPool

log = logging.getLogger(__name__)

FORWARDED = tuple(SERVICES.values())
ROUTER_SERVICE = "backbone.v1.RouterService"
HEALTH_PERIOD_S = 0.5


class RouterHop:
    """The router as a hop of a server process (see the module doc)."""

    name = "router"
    service_names = (*FORWARDED, ROUTER_SERVICE)

    def __init__(self) -> None:
        self.pool: UpstreamPool | None = None
        self._health = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._forwarder = Forwarder(lambda: self.pool)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the forwarding handlers and RouterService."""
        forwarder = self._forwarder
        server.add_generic_rpc_handlers(tuple(forwarder.handlers(s) for s in FORWARDED))
        router_service_pb2_grpc.add_RouterServiceServicer_to_server(
            RouterServicer(lambda: self.pool.sets if self.pool is not None else {}), server)

    async def start(self, ctx: HopContext) -> None:
        """Resolve the upstreams, watch their health, wait for one healthy replica each."""
        cfg = ctx.config.router
        self.pool = UpstreamPool(cfg, max_message_bytes=ctx.config.server.max_message_bytes,
                                 on_change=self._wake.set)
        if not self.pool.sets:
            raise RuntimeError("router: no upstream configured; set [router.upstreams] or "
                               "--upstream SERVICE=HOST:PORT")
        for rs in self.pool.sets.values():
            router_metrics.watch_set(rs)
        self.pool.on_join = lambda s, a: router_metrics.join(self.pool.sets[s].endpoints[a])
        self.pool.on_leave = router_metrics.leave
        await self.pool.start()
        until = time.monotonic() + cfg.start_wait_s
        while not self._all_served() and time.monotonic() < until:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), until - time.monotonic())
            except TimeoutError:
                break
        missing = [s for s, rs in self.pool.sets.items() if not rs.healthy()]
        if missing:
            log.warning("router: no healthy replica yet for %s; serving anyway", ", ".join(missing))
        self._health = ctx.health
        self._task = asyncio.ensure_future(self._report_health())

    def channel_for(self, hop: str) -> RoutedChannel | None:
        """A channel to ``hop``'s replicas through this router's policy, for a hop of this
        process (the pipeline: ``backbone serve router pipeline``); None when this router
        has no upstream for it."""
        service = SERVICES.get(hop)
        if self.pool is None or service not in self.pool.sets:
            return None
        return RoutedChannel(self._forwarder)

    def _all_served(self) -> bool:
        return self.pool is not None and all(rs.healthy() for rs in self.pool.sets.values())

    async def _report_health(self) -> None:
        """Keep grpc.health.v1 in step with the replicas (on each change, and every
        HEALTH_PERIOD_S: the server reports SERVING once start() has returned)."""
        if self._health is None:
            return
        serving, down = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            self._wake.clear()
            for service in FORWARDED:
                rs = self.pool.sets.get(service)
                await self._health.set(service, serving if rs is not None and rs.healthy() else down)
            await self._health.set("", serving if self._all_served() else down)
            try:
                await asyncio.wait_for(self._wake.wait(), HEALTH_PERIOD_S)
            except TimeoutError:
                pass

    def healthy(self) -> bool:
        """False once the health reporter or a DNS refresher died."""
        if self._task is not None and self._task.done():
            return False
        return self.pool is None or self.pool.alive()

    async def stop(self) -> None:
        """Stop watching and close the replica channels."""
        if self._task is not None:
            self._task.cancel()
        if self.pool is not None:
            await self.pool.close()


__all__ = ["RouterHop"]
