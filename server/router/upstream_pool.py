"""The router's replicas: one channel per replica address, a grpc.health.v1 Watch per
(service, replica), and periodic re-resolution of ``dns:`` targets.

Membership changes while the router runs: an address that appears in a resolution joins
(health unknown until its Watch answers, so it takes calls only once SERVING); one that
disappears leaves rotation at once and its channel is closed once its calls in flight
have ended. A Watch that breaks (the replica died) marks the replica NOT_SERVING at
once and is re-opened with a short backoff, so a restarted replica is back in rotation
as soon as it reports SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.attempts import Limits, ReplicaSet
from router.balancer import Balancer
from router.breaker import CircuitBreaker
from router.discovery import Target, parse_target, resolve
from router.hedging import HedgePolicy
from router.outlier import OutlierDetector
from router.retry_budget import RetryBudget
from server.config import RouterConfig, router_upstreams

log = logging.getLogger(__name__)

#: Config name -> fully qualified service name.
SERVICES = {
    "embedding": "backbone.v1.EmbeddingService",
    "search": "backbone.v1.VectorSearchService",
    "rerank": "backbone.v1.RerankService",
    "generation": "backbone.v1.GenerationService",
}
WATCH_BACKOFF_S = (0.05, 0.25)
DRAIN_LIMIT_S = 60.0


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel arguments of a replica channel: no gRPC-level retries (the router
    retries), fast reconnection (a restarted replica is back within a second)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
        ("grpc.service_config_disable_resolution", 1),
    ]


def build_replica_set(service: str, cfg: RouterConfig) -> ReplicaSet:
    """A ReplicaSet with the policy objects ``cfg`` describes."""
    return ReplicaSet(
        service,
        balancer=Balancer(cfg.balancer),
        budget=RetryBudget(cfg.retry_ratio, cfg.retry_floor),
        hedge=HedgePolicy(enabled=cfg.hedge, percentile=cfg.hedge_percentile,
                          min_s=cfg.hedge_min_ms / 1e3, max_s=cfg.hedge_max_ms / 1e3),
        outlier=OutlierDetector(ratio=cfg.outlier_ratio, min_excess_s=cfg.outlier_min_ms / 1e3,
                                base_s=cfg.ejection_s, max_s=cfg.max_ejection_s,
                                max_share=cfg.max_ejected_share),
        limits=Limits(max_in_flight=cfg.max_in_flight, max_attempts=cfg.max_attempts,
                      reserve_s=cfg.reserve_ms / 1e3, default_timeout_s=cfg.default_timeout_s),
        breaker_factory=lambda: CircuitBreaker(
            consecutive=cfg.breaker_consecutive, failure_rate=cfg.breaker_failure_rate,
            window_s=cfg.breaker_window_s, min_calls=cfg.breaker_min_calls,
            open_s=cfg.breaker_open_s, trials=cfg.breaker_trials),
    )


class UpstreamPool:
    """Replica sets of the configured services, their channels and health watches."""

    def __init__(self, cfg: RouterConfig, *, max_message_bytes: int = 4 * 1024 * 1024,
                 on_change: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.targets: dict[str, list[Target]] = {
            SERVICES[name]: [parse_target(t) for t in targets]
            for name, targets in router_upstreams(cfg).items()
        }
        self.sets: dict[str, ReplicaSet] = {s: build_replica_set(s, cfg) for s in self.targets}
        self._options = channel_options(max_message_bytes)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._users: dict[str, int] = {}
        self._watches: dict[tuple[str, str], asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._on_change = on_change or (lambda: None)
        self.changed = asyncio.Event()
        self.on_join: Callable[[str, str], None] | None = None
        self.on_leave: Callable[[str, str], None] | None = None

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to a replica address (it exists while any service uses it)."""
        return self._channels[address]

    async def start(self) -> None:
        """Resolve every target once, join the replicas, start the DNS refreshers."""
        for service, targets in self.targets.items():
            await self._refresh(service, targets)
            if any(t.dns for t in targets):
                self._spawn(self._refresh_loop(service, targets), f"dns-{service}")

    def alive(self) -> bool:
        """False once a background task (refresh loop) died of an error."""
        return not any(t.done() and not t.cancelled() and t.exception() for t in self._tasks)

    async def close(self) -> None:
        """Stop every watch and refresher and close the channels."""
        for task in [*self._tasks, *self._watches.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._watches.values(), return_exceptions=True)
        for ch in self._channels.values():
            await ch.close(grace=None)
        self._channels.clear()

    # -- membership ------------------------------------------------------------------
    async def _refresh(self, service: str, targets: list[Target]) -> None:
        wanted: set[str] = set()
        for target in targets:
            try:
                wanted.update(await resolve(target))
            except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
                # keep what this target resolved to last: a DNS hiccup is not a scale-down
                log.warning("router: resolving %s failed (%s); keeping its replicas", target.text, exc)
                return
        rs = self.sets[service]
        for address in sorted(wanted - set(rs.endpoints)):
            self._join(service, address)
        for address in sorted(set(rs.endpoints) - wanted):
            self._leave(service, address)

    async def _refresh_loop(self, service: str, targets: list[Target]) -> None:
        while True:
            await asyncio.sleep(self.cfg.dns_refresh_s)
            await self._refresh(service, targets)

    def _join(self, service: str, address: str) -> None:
        log.info("router: %s replica %s joins", service, address)
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        self._users[address] = self._users.get(address, 0) + 1
        ep = self.sets[service].add(address)
        self._watches[(service, address)] = asyncio.ensure_future(self._watch(service, address, ep))
        if self.on_join is not None:
            self.on_join(service, address)
        self._changed()

    def _leave(self, service: str, address: str) -> None:
        log.info("router: %s replica %s leaves", service, address)
        ep = self.sets[service].remove(address)
        watch = self._watches.pop((service, address), None)
        if watch is not None:
            watch.cancel()
        if self.on_leave is not None:
            self.on_leave(service, address)
        self._spawn(self._drain(address, ep), f"drain-{address}")
        self._changed()

    async def _drain(self, address: str, ep) -> None:  # noqa: ANN001 - Endpoint
        """Close a left replica's channel once nothing else uses it and its calls ended."""
        until = time.monotonic() + DRAIN_LIMIT_S
        while ep is not None and ep.in_flight and time.monotonic() < until:
            await asyncio.sleep(0.05)
        self._users[address] -= 1
        if self._users[address] == 0 and not any(a == address for _, a in self._watches):
            del self._users[address]
            ch = self._channels.pop(address, None)
            if ch is not None:
                await ch.close(grace=None)

    async def _watch(self, service: str, address: str, ep) -> None:  # noqa: ANN001 - Endpoint
        """Follow the replica's grpc.health.v1 status for ``service`` for as long as it
        is a member; NOT_SERVING, a broken stream or no answer take it out of rotation."""
        stub = health_pb2_grpc.HealthStub(self._channels[address])
        serving = health_pb2.HealthCheckResponse.SERVING
        while True:
            try:
                call = stub.Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
                async for answer in call:
                    self._set_health(ep, answer.status == serving)
            except grpc.aio.AioRpcError as exc:
                log.debug("router: health watch of %s %s ended: %s", service, address, exc.code())
            self._set_health(ep, False)
            await asyncio.sleep(random.uniform(*WATCH_BACKOFF_S))

    def _set_health(self, ep, healthy: bool) -> None:  # noqa: ANN001 - Endpoint
        if ep.healthy is not healthy:
            log.info("router: %s %s is %s", ep.service, ep.address,
                     "SERVING" if healthy else "NOT_SERVING")
            ep.set_health(healthy)
            self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self._on_change()

    def _spawn(self, coro, name: str) -> None:  # noqa: ANN001 - a coroutine
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        # a task that died of an error stays in the set: alive() reports it
        task.add_done_callback(
            lambda t: self._tasks.discard(t) if t.cancelled() or t.exception() is None else None)
