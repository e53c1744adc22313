"""An embedding-hop-like gRPC server for the network tests: grpc.health.v1 SERVING for
backbone.v1.EmbeddingService, and Embed answering one vector whose first value is this
replica's number (so a caller can tell replicas apart).

    python -m tests.cluster.fake_hop HOST PORT REPLICA
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from backbone.v1 import embedding_service_pb2, embedding_service_pb2_grpc

SERVICE = "backbone.v1.EmbeddingService"


class FakeEmbedding(embedding_service_pb2_grpc.EmbeddingServiceServicer):
    """Answers every input with ``[replica, 0, 0, 0]``."""

    def __init__(self, replica: int) -> None:
        self.replica = replica

    async def Embed(self, request, context):  # noqa: N802 - gRPC method name
        """One vector per input."""
        vector = embedding_service_pb2.Embedding(values=[float(self.replica), 0.0, 0.0, 0.0])
        return embedding_service_pb2.EmbedResponse(embeddings=[vector] * len(request.inputs))


async def serve(host: str, port: int, replica: int) -> None:
    """Serve until SIGTERM."""
    server = grpc.aio.server()
    embedding_service_pb2_grpc.add_EmbeddingServiceServicer_to_server(FakeEmbedding(replica), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await checker.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    print("serving", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0.5)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
