"""One ``grpc.aio`` server process: hops, health, reflection, limits, TLS, shutdown.

Start-up order: register every hop's servicers (and UNIMPLEMENTED placeholders for the
contract's other services), open the port with health reporting NOT_SERVING, then start
the hops one by one (load, warm, probe); each hop's services turn SERVING when its start
returns, the overall status ("") when all have. A watchdog turns a hop's services
NOT_SERVING when one of its background tasks dies. Shutdown flips health first, then lets
in-flight calls finish within the grace period (calls still running just before it ends
are answered UNAVAILABLE, so a client may retry them elsewhere), then stops the hops.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import Config
from server.errors import NotImplementedYet
from server.hop import Hop, HopContext
from server.interceptors import CachedHandlers, GuardInterceptor, MetricsInterceptor, abort_with
from server.load_report import LoadReportInterceptor
from server import telemetry

log = logging.getLogger(__name__)

# Hop name -> "module:Class"; imported only when the hop is served.
HOP_FACTORIES: dict[str, str] = {
    "embedding": "server.servicers.embedding:EmbeddingHop",
    "search": "server.servicers.search:SearchHop",
    "rerank": "server.servicers.rerank:RerankHop",
    "generation": "server.servicers.generation:GenerationHop",
    "pipeline": "server.servicers.pipeline:PipelineHop",
    # The front door of a split deployment: forwards the four hops' services to their
    # replicas (config [router]); not part of the embedded default.
    "router": "server.router.hop:RouterHop",
}
# The embedded default serves these, in this order (search needs embedding in-process,
# the pipeline calls the four before it).
DEFAULT_HOPS: tuple[str, ...] = ("embedding", "search", "rerank", "generation", "pipeline")

# Every service of the contract, for reflection and UNIMPLEMENTED placeholders.
CONTRACT_MODULES = (
    "backbone.v1.embedding_service_pb2",
    "backbone.v1.vector_search_service_pb2",
    "backbone.v1.rerank_service_pb2",
    "backbone.v1.generation_service_pb2",
    "backbone.v1.pipeline_service_pb2",
    "backbone.v1.router_service_pb2",
)
ROUTER_SERVICE = "backbone.v1.RouterService"
WATCHDOG_PERIOD_S = 1.0
# Shutdown: calls still running this long before the grace period ends (at most half of
# it) are answered by the server, ahead of gRPC core's own cut.
CUT_MARGIN_S = 0.5


def contract_services() -> list[str]:
    """Fully qualified names of every service in the contract."""
    names = []
    for module in CONTRACT_MODULES:
        file = importlib.import_module(module).DESCRIPTOR
        names.extend(s.full_name for s in file.services_by_name.values())
    return names


def build_hop(name: str) -> Hop:
    """Instantiate the hop registered under ``name``."""
    try:
        target = HOP_FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown service {name!r}; choose from {sorted(HOP_FACTORIES)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


def unimplemented_handler(service_name: str) -> grpc.GenericRpcHandler:
    """Answers every method of ``service_name`` with UNIMPLEMENTED + ErrorInfo.

    Requests are never decoded (no request deserializer: the behaviour gets raw bytes), so
    any payload, even an undecodable one, gets the same UNIMPLEMENTED answer."""
    pool = descriptor_pool.Default()
    service = pool.FindServiceByName(service_name)

    def make(method) -> grpc.RpcMethodHandler:
        resp_cls = message_factory.GetMessageClass(method.output_type)
        err = NotImplementedYet(f"{service_name}/{method.name} is not implemented yet")

        async def refuse(request, context):
            await abort_with(context, err)

        if method.server_streaming:

            async def refuse_stream(request, context):
                await abort_with(context, err)
                yield  # pragma: no cover - makes this an async generator

            behaviour = refuse_stream
        else:
            behaviour = refuse
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        return kind(
            behaviour,
            request_deserializer=None,
            response_serializer=resp_cls.SerializeToString,
        )

    return grpc.method_handlers_generic_handler(
        service_name, {m.name: make(m) for m in service.methods}
    )


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS (and mTLS when a client CA is set) credentials, or None for plaintext."""
    s = config.server
    if not s.tls_cert:
        return None
    key = Path(s.tls_key).read_bytes()
    cert = Path(s.tls_cert).read_bytes()
    ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class BackboneServer:
    """A running (or about to run) server process with its hops."""

    def __init__(self, config: Config, hops: Sequence[Hop], tracer_provider=None) -> None:
        self.config = config
        self.hops = list(hops)
        self.health = health.aio.HealthServicer()
        # A provider given by the caller (tests) is theirs; one built from [telemetry] is ours.
        self._own_provider = None
        if tracer_provider is None:
            tracer_provider = self._own_provider = telemetry.provider_for(config.telemetry)
        self.context = HopContext(config, health=self.health, tracer_provider=tracer_provider)
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._guard = GuardInterceptor(config.server.auth_token)
        self._watchdog: asyncio.Task | None = None
        self._ready = asyncio.Event()

    @property
    def address(self) -> str:
        """host:port the server listens on."""
        return f"{self.config.server.host}:{self.port}"

    async def start(self) -> None:
        """Open the port (health NOT_SERVING), then start every hop and report SERVING."""
        s = self.config.server
        self._server = grpc.aio.server(
            interceptors=[
                # Outermost: the chain below is built once per method, not per call.
                CachedHandlers(),
                # The server span covers the whole call, errors included.
                telemetry.server_interceptor(self.context.tracer_provider),
                MetricsInterceptor(),
                self._guard,
                LoadReportInterceptor(
                    {name: hop for hop in self.hops for name in hop.service_names},
                    lambda: len(self._guard.in_flight),
                ),
            ],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        served: set[str] = set()
        for hop in self.hops:
            hop.add_to_server(self._server)
            served.update(hop.service_names)
        in_process_router = ROUTER_SERVICE not in served
        if in_process_router:
            # The embedded default answers ListEndpoints with its own hops ("in-process").
            from server.router.servicer import add_in_process_router

            add_in_process_router(self._server, self.hops)
            served.add(ROUTER_SERVICE)
        contract = contract_services()
        for name in contract:
            if name not in served:
                self._server.add_generic_rpc_handlers((unimplemented_handler(name),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [*contract, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self._server,
        )
        for name in ["", *served]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        bind = f"{s.host}:{s.port}"
        creds = server_credentials(self.config)
        if creds is None:
            self.port = self._server.add_insecure_port(bind)
        else:
            self.port = self._server.add_secure_port(bind, creds)
        await self._server.start()
        log.info("listening on %s:%d (%s)", s.host, self.port, "TLS" if creds else "plaintext")
        for hop in self.hops:
            await hop.start(self.context)
            self.context.local[hop.name] = hop
            freeze_startup_objects()
            for name in hop.service_names:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("hop %s is serving", hop.name)
        if in_process_router:
            await self.health.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._watchdog = asyncio.create_task(self._watch(), name="hop-watchdog")
        self._ready.set()

    async def _watch(self) -> None:
        """Turn a hop's services NOT_SERVING once it reports unhealthy."""
        down: set[str] = set()
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            for hop in self.hops:
                if hop.name in down or _reports_healthy(hop):
                    continue
                down.add(hop.name)
                log.error("hop %s is unhealthy; reporting NOT_SERVING", hop.name)
                for name in ("", *hop.service_names):
                    await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Flip health to NOT_SERVING, finish in-flight calls within ``grace``, stop hops."""
        grace = self.config.server.grace_seconds if grace is None else grace
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            # gRPC refuses new calls from here on and cuts the ones still running when the
            # grace ends with a bare "Cancelling all calls" (no ErrorInfo, unlike every
            # other error here): answer those UNAVAILABLE, reason UNAVAILABLE, a little before.
            stopping = asyncio.ensure_future(self._server.stop(grace))
            await asyncio.wait({stopping}, timeout=grace - min(CUT_MARGIN_S, grace / 2))
            if not stopping.done():
                cut = self._guard.in_flight.cut()
                if cut:
                    log.warning("grace period over: %d call(s) still in flight answered UNAVAILABLE", cut)
            await stopping
        for hop in reversed(self.hops):
            try:
                await hop.stop()
            except Exception:  # noqa: BLE001 - stopping the others matters more
                log.exception("stopping hop %s failed", hop.name)
        telemetry.shutdown(self._own_provider)

    async def wait_for_termination(self) -> None:
        """Block until the gRPC server ends."""
        assert self._server is not None
        await self._server.wait_for_termination()


def freeze_startup_objects() -> None:
    """Collect the garbage of loading a model, then exclude what survived from later
    garbage collections.

    Loading models leaves hundreds of thousands of long-lived Python objects (here ~470k
    after the embedding hop); a full collection walks them all and stops every thread
    holding the GIL for ~260 ms, which showed as 200-300 ms outliers in answers that
    otherwise take 1 ms. Frozen, they are skipped: the same collection takes ~0.2 ms.
    """
    gc.collect()
    gc.freeze()


def _reports_healthy(hop: Hop) -> bool:
    """``hop.healthy()``, where a raising check counts as unhealthy (the watchdog must live)."""
    try:
        return bool(hop.healthy())
    except Exception:  # noqa: BLE001 - a broken check is a sick hop, not a dead watchdog
        log.exception("health check of hop %s raised", hop.name)
        return False


def hops_for(names: Iterable[str]) -> list[Hop]:
    """Build the named hops, in the order the embedded default starts them."""
    wanted = list(dict.fromkeys(names))
    ordered = [n for n in DEFAULT_HOPS if n in wanted] + [n for n in wanted if n not in DEFAULT_HOPS]
    return [build_hop(n) for n in ordered]
