"""Fake hops for the upstream and pipeline policy tests: real grpc.aio servers on port 0
whose engines are scripted (deterministic vectors, canned errors with ErrorInfo and
RetryInfo), recording what each call carried (deadline, metadata)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import grpc
import grpc.aio
import numpy as np
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from backbone.v1 import embedding_service_pb2 as emb_pb
from backbone.v1 import embedding_service_pb2_grpc as emb_grpc

DIM = 384


def fake_vector(text: str) -> np.ndarray:
    """A deterministic DIM-dim float32 vector for a text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


async def abort_rich(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, reason: str,
    retry_s: float | None = None, metadata: dict[str, str] | None = None,
) -> None:
    """End the call the way the server's interceptor does: status + ErrorInfo (+ RetryInfo)."""
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="backbone.v1", metadata=metadata))
    details.append(info)
    if retry_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_s * 1e9))
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    status = status_pb2.Status(code=code.value[0], message=f"scripted {code.name}", details=details)
    await context.abort(
        code, status.message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )


@dataclass
class EmbedScript:
    """What the fake embedding hop saw and the failure it answers with (None: succeed)."""

    time_remaining: list[float | None] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    failure: tuple[grpc.StatusCode, str, float | None] | None = None


class FakeEmbedding(emb_grpc.EmbeddingServiceServicer):
    """EmbeddingService with a deterministic fake model."""

    def __init__(self, script: EmbedScript) -> None:
        self.script = script

    async def Embed(self, request, context):  # noqa: N802 - gRPC method name
        self.script.time_remaining.append(context.time_remaining())
        self.script.metadata.append(dict(context.invocation_metadata()))
        if self.script.failure is not None:
            code, reason, retry_s = self.script.failure
            await abort_rich(context, code, reason, retry_s)
        return emb_pb.EmbedResponse(
            embeddings=[emb_pb.Embedding(values=fake_vector(t).tolist()) for t in request.inputs],
            model="fake", dimensions=DIM,
            timings=[{"hop": "embed", "compute_us": 10, "total_us": 12, "batch_size": len(request.inputs)}],
        )


@dataclass
class FakeServer:
    """A running fake server."""

    address: str
    server: grpc.aio.Server

    async def stop(self) -> None:
        """Stop at once."""
        await self.server.stop(None)


async def start_fake(servicers, credentials: grpc.ServerCredentials | None = None) -> FakeServer:
    """A grpc.aio server on 127.0.0.1:0 with ``servicers`` [(add_fn, servicer)]."""
    server = grpc.aio.server()
    for add, servicer in servicers:
        add(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return FakeServer(f"127.0.0.1:{port}", server)
