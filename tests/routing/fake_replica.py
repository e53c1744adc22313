"""A fake-but-real-gRPC replica for the routing tests: EmbeddingService (Embed,
EmbedStream), GenerationService (Generate, Abort) and grpc.health.v1 on a grpc.aio
server, with injectable delay and faults, reporting its load like a real hop.

Policy tests need replicas whose speed and failures they choose; the real hops are used
where the test claims real-hop behaviour (replica death). Run in-process
(``FakeReplica``) or as a process (``python -m tests.routing.fake_replica --port 0
--delay-ms 5``; it prints "backbone serving on HOST:PORT" like ``backbone serve``).

Faults: an Embed whose first input is "bad" answers INVALID_ARGUMENT (ErrorInfo
INVALID_INPUT); ``fail_all`` answers every call UNAVAILABLE; ``delay_s`` delays each
Embed; ``token_delay_s`` paces Generate's tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from backbone.v1 import (
    embedding_service_pb2 as epb,
    embedding_service_pb2_grpc,
    generation_service_pb2 as gpb,
    generation_service_pb2_grpc,
)
from server.errors import InvalidArgument, Unavailable
from server.interceptors import abort_with
from server.load_report import load_metadata

EMBED = "backbone.v1.EmbeddingService"
GENERATE = "backbone.v1.GenerationService"


class FakeReplica(embedding_service_pb2_grpc.EmbeddingServiceServicer,
                  generation_service_pb2_grpc.GenerationServiceServicer):
    """One fake replica; ``start()`` opens 127.0.0.1:``port`` (0 picks one)."""

    def __init__(self, name: str = "r", *, delay_s: float = 0.0, token_delay_s: float = 0.005,
                 port: int = 0, host: str = "127.0.0.1") -> None:
        self.name = name
        self.delay_s = delay_s
        self.token_delay_s = token_delay_s
        self.fail_all = False
        self.host = host
        self.port = port
        self.calls = 0
        self.active_generations = 0
        self.generations_cancelled = 0
        self.generations_ended_early = 0  # cancelled, or closed before their final message
        self.last_metadata: dict[str, str] = {}
        self.last_time_remaining: float | None = None
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._in_flight = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = grpc.aio.server()
        embedding_service_pb2_grpc.add_EmbeddingServiceServicer_to_server(self, self._server)
        generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(self, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:{self.port}")
        await self._server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", EMBED, GENERATE):
            await self.health.set(name, status)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    def _seen(self, context) -> None:
        self.calls += 1
        self.last_metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.last_time_remaining = context.time_remaining()

    async def Embed(self, request, context):  # noqa: N802
        self._seen(context)
        if self.fail_all:
            await abort_with(context, Unavailable(f"{self.name} is failing"))
        if request.inputs and request.inputs[0] == "bad":
            await abort_with(context, InvalidArgument("bad input"))
        self._in_flight += 1
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self._in_flight -= 1
        context.set_trailing_metadata(load_metadata(0.0, self._in_flight))
        return epb.EmbedResponse(
            model=self.name, dimensions=2,
            embeddings=[epb.Embedding(values=[float(len(t)), 1.0]) for t in request.inputs])

    async def EmbedStream(self, requests, context):  # noqa: N802
        self._seen(context)
        async for item in requests:
            yield epb.EmbedStreamResponse(id=item.id, response=epb.EmbedResponse(
                model=self.name, embeddings=[epb.Embedding(values=[float(len(t))]) for t in item.request.inputs]))

    async def Generate(self, request, context):  # noqa: N802
        self._seen(context)
        if self.fail_all:
            await abort_with(context, Unavailable(f"{self.name} is failing"))
        self.active_generations += 1
        finished = False
        try:
            words = (request.prompt or "x").split()
            for i in range(max(1, request.sampling.max_tokens or 8)):
                await asyncio.sleep(self.token_delay_s)
                yield gpb.GenerateResponse(request_id=self.name, delta=gpb.GenerateDelta(
                    text=words[i % len(words)] + " ", token_ids=[i]))
            yield gpb.GenerateResponse(request_id=self.name, final=gpb.GenerateFinal(model=self.name))
            finished = True
        except asyncio.CancelledError:
            self.generations_cancelled += 1
            raise
        finally:
            self.active_generations -= 1
            self.generations_ended_early += not finished

    async def Abort(self, request, context):  # noqa: N802
        return gpb.AbortResponse(aborted=request.request_id == self.name)


async def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--name", default="fake")
    args = parser.parse_args(argv)
    replica = FakeReplica(args.name, delay_s=args.delay_ms / 1e3, port=args.port, host=args.host)
    await replica.start()
    print(f"backbone serving on {replica.address}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
