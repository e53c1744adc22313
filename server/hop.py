"""The shape every hop (embedding, search, rerank, generation) takes inside a server process.

A hop owns its engine and its servicer. The process builds the hops named on the command
line (all of them for the embedded default), starts them in order, registers them on one
``grpc.aio`` server, and reports each hop's services SERVING in ``grpc.health.v1`` only
once ``start()`` has returned (model loaded, warmed, real probe answered).

Hops that need another hop (search embeds text queries, the pipeline calls everything)
find it in ``HopContext.local`` when it runs in the same process, and otherwise build a
gRPC client to the address their config section names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import grpc.aio

    from server.config import Config


@dataclass
class HopContext:
    """What a hop gets from the process: the config and its in-process neighbours."""

    config: Config
    # Started hops of this process by name ("embedding", "search", ...), for in-process
    # calls that skip the network in the embedded default.
    local: dict[str, Any] = field(default_factory=dict)
    # The process's grpc.health.v1 servicer (``await health.set(name, status)``), for
    # hops whose health changes while they run (the router follows its replicas').
    health: Any = None
    # The process's OpenTelemetry tracer provider (None: the global one), for the spans
    # and client interceptors of calls to other hops (``server.telemetry``).
    tracer_provider: Any = None


@runtime_checkable
class Hop(Protocol):
    """One hop of the backbone served by this process."""

    #: Short name used on the command line and in HopContext.local ("embedding").
    name: str
    #: Fully qualified gRPC service names this hop serves (for health and reflection).
    service_names: tuple[str, ...]

    async def start(self, ctx: HopContext) -> None:
        """Load the engine, warm it and answer one real probe; raise if it cannot serve."""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register this hop's servicers on the server."""

    def healthy(self) -> bool:
        """False once a background task the hop depends on has died."""

    async def stop(self) -> None:
        """Release the engine; called after in-flight calls finished or the grace ran out."""
