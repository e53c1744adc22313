"""Fake hops for the upstream and pipeline policy tests: real grpc.aio servers on port 0
whose engines are scripted (deterministic vectors, canned errors with ErrorInfo and
RetryInfo), recording what each call carried (deadline, metadata)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import grpc
import grpc.aio
import numpy as np
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from backbone.v1 import embedding_service_pb2 as emb_pb
from backbone.v1 import embedding_service_pb2_grpc as emb_grpc
from backbone.v1 import generation_service_pb2 as gen_pb
from backbone.v1 import generation_service_pb2_grpc as gen_grpc
from backbone.v1 import rerank_service_pb2 as rr_pb
from backbone.v1 import rerank_service_pb2_grpc as rr_grpc
from backbone.v1 import vector_search_service_pb2 as vs_pb
from backbone.v1 import vector_search_service_pb2_grpc as vs_grpc

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


async def start_fake(
    servicers, credentials: grpc.ServerCredentials | None = None, interceptors=None
) -> FakeServer:
    """A grpc.aio server on 127.0.0.1:0 with ``servicers`` [(add_fn, servicer)]."""
    server = grpc.aio.server(interceptors=interceptors)
    for add, servicer in servicers:
        add(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return FakeServer(f"127.0.0.1:{port}", server)


# ----------------------------------------------------------------- the other fake hops


@dataclass
class HopScript:
    """What the fake search, rerank and generation hops saw and how they behave."""

    searches: list[vs_pb.SearchRequest] = field(default_factory=list)
    reranks: list[rr_pb.RerankRequest] = field(default_factory=list)
    generations: list[gen_pb.GenerateRequest] = field(default_factory=list)
    counts: int = 0
    rerank_failure: tuple[grpc.StatusCode, str, float | None] | None = None
    rerank_delay_s: float = 0.0
    max_context_tokens: int = 2048
    answer: tuple[str, ...] = ("Green tea ", "is unoxidised ", "[1].")
    version: int = 1


def passage(i: int) -> str:
    """The fake corpus's i-th passage (about 20 words)."""
    return f"passage {i}: " + " ".join(f"word{i}x{j}" for j in range(20))


class FakeSearch(vs_grpc.VectorSearchServiceServicer):
    """Answers top_k hits p0, p1, ... with falling scores and their payloads."""

    def __init__(self, script: HopScript) -> None:
        self.script = script

    async def Search(self, request, context):  # noqa: N802
        self.script.searches.append(request)
        hits = [
            vs_pb.Hit(id=f"p{i}", score=1.0 - i / 100, payload=vs_pb.Payload(text=passage(i)))
            for i in range(request.top_k)
        ]
        for i, hit in enumerate(hits):
            hit.payload.metadata.update({"rank": i, "source": "fake"})
        return vs_pb.SearchResponse(hits=hits, timings=[{"hop": "search", "total_us": 50}])

    async def DescribeCollection(self, request, context):  # noqa: N802
        return vs_pb.DescribeCollectionResponse(
            collection=vs_pb.CollectionInfo(name=request.name, dimension=DIM, version=self.script.version)
        )


class FakeRerank(rr_grpc.RerankServiceServicer):
    """Reverses the order (a scripted, visible reordering)."""

    def __init__(self, script: HopScript) -> None:
        self.script = script

    async def Rerank(self, request, context):  # noqa: N802
        self.script.reranks.append(request)
        if self.script.rerank_failure is not None:
            code, reason, retry_s = self.script.rerank_failure
            await abort_rich(context, code, reason, retry_s)
        await asyncio.sleep(self.script.rerank_delay_s)
        n = len(request.documents)
        order = list(reversed(range(n)))[: request.top_n or n]
        return rr_pb.RerankResponse(
            results=[rr_pb.RerankResult(index=i, score=float(i)) for i in order],
            timings=[{"hop": "rerank", "total_us": 100, "batch_size": n}],
        )


def count_tokens(messages) -> int:
    """The fake tokenizer: words plus 4 per message (the chat template)."""
    return sum(len(m.content.split()) + 4 for m in messages)


class FakeGeneration(gen_grpc.GenerationServiceServicer):
    """Streams the scripted answer; "auto" reports a routed model name."""

    def __init__(self, script: HopScript) -> None:
        self.script = script

    async def Generate(self, request, context):  # noqa: N802
        self.script.generations.append(request)
        for piece in self.script.answer:
            yield gen_pb.GenerateResponse(delta=gen_pb.GenerateDelta(text=piece, token_ids=[1]))
        model = "fake-small" if request.model == "auto" else (request.model or "fake-default")
        yield gen_pb.GenerateResponse(final=gen_pb.GenerateFinal(
            finish_reason=gen_pb.FINISH_REASON_STOP,
            usage={"prompt_tokens": count_tokens(request.messages),
                   "completion_tokens": len(self.script.answer)},
            timings=[{"hop": "generate", "total_us": 300}], model=model,
        ))

    async def CountTokens(self, request, context):  # noqa: N802
        self.script.counts += 1
        return gen_pb.CountTokensResponse(
            tokens=count_tokens(request.messages), max_context_tokens=self.script.max_context_tokens
        )


FAKE_HOP_SERVICES = (
    "backbone.v1.EmbeddingService", "backbone.v1.VectorSearchService",
    "backbone.v1.RerankService", "backbone.v1.GenerationService",
)


async def start_fake_hops(embed: EmbedScript, hops: HopScript) -> FakeServer:
    """One fake server with all four hops, each SERVING in grpc.health.v1 (a router can
    put it in rotation)."""
    checker = health.aio.HealthServicer()
    fake = await start_fake([
        (emb_grpc.add_EmbeddingServiceServicer_to_server, FakeEmbedding(embed)),
        (vs_grpc.add_VectorSearchServiceServicer_to_server, FakeSearch(hops)),
        (rr_grpc.add_RerankServiceServicer_to_server, FakeRerank(hops)),
        (gen_grpc.add_GenerationServiceServicer_to_server, FakeGeneration(hops)),
        (health_pb2_grpc.add_HealthServicer_to_server, checker),
    ])
    for service in ("", *FAKE_HOP_SERVICES):
        await checker.set(service, health_pb2.HealthCheckResponse.SERVING)
    return fake
