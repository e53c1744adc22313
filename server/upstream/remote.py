"""Upstreams over gRPC (split deployment): typed stubs on one channel per address.

Every call carries the process's bearer token and the caller's remaining deadline minus
the reserve (``wire.timeout_for``), runs on a channel with the process's TLS settings
(``wire.client_options``; idempotent unary methods retried on UNAVAILABLE by the channel's
service config), and maps a failed status with ``wire.upstream_error``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np

from backbone.v1 import (
    embedding_service_pb2 as emb_pb,
    embedding_service_pb2_grpc as emb_grpc,
    generation_service_pb2 as gen_pb,
    generation_service_pb2_grpc as gen_grpc,
    rerank_service_pb2 as rr_pb,
    rerank_service_pb2_grpc as rr_grpc,
    vector_search_service_pb2 as vs_pb,
    vector_search_service_pb2_grpc as vs_grpc,
)
from clients.channel import ClientOptions, call_metadata, open_aio_channel
from router.hop_api import (
    Delta,
    Embedded,
    Finished,
    GenerateCall,
    HopTime,
    Ranked,
    Reranked,
    SearchCall,
    Searched,
    TokenCount,
)
from server.config import Config
from server.upstream.local import search_request, searched_from
from server.upstream.wire import cap_max_tokens, client_options, timeout_for, upstream_error

# Remote embedding calls carry at most this many texts (the embedding hop's default cap).
REMOTE_EMBED_BATCH = 256
FINISH_REASONS = {
    gen_pb.FINISH_REASON_STOP: "stop",
    gen_pb.FINISH_REASON_LENGTH: "length",
    gen_pb.FINISH_REASON_ABORT: "abort",
}


class _Remote:
    """A channel to one upstream address; the subclass names the hop and its stub."""

    hop = ""
    #: grpc.aio client interceptors of the channel (the upstream layer sets OpenTelemetry's).
    interceptors: tuple = ()

    def __init__(self, config: Config, address: str, *, channel=None) -> None:  # noqa: ANN001
        self._config = config
        self.options: ClientOptions = client_options(config, address)
        # Invariant: the channel is created lazily inside the event loop that uses it,
        # unless one is given (the router's in-process channel, which is not ours to close).
        self._channel: grpc.aio.Channel | None = channel
        self._owned = channel is None
        self._metadata = call_metadata(self.options)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel (opened on first use)."""
        if self._channel is None:
            self._channel = open_aio_channel(self.options, list(self.interceptors) or None)
        return self._channel

    def _kwargs(self, deadline: float | None) -> dict:
        return {"timeout": timeout_for(self._config, deadline, self.hop), "metadata": self._metadata}

    async def _unary(self, method, request, deadline: float | None):
        try:
            return await method(request, **self._kwargs(deadline))
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err, self.hop) from None

    async def close(self) -> None:
        """Close the channel (when this client opened it)."""
        if self._channel is not None and self._owned:
            await self._channel.close()
        self._channel, self._owned = None, True


class RemoteEmbedding(_Remote):
    """EmbeddingService at an address."""

    hop = "embedding"

    def __init__(self, config: Config, address: str, model_path: str, *, channel=None) -> None:  # noqa: ANN001
        super().__init__(config, address, channel=channel)
        #: Learnt from the first answer (None until then).
        self.dimension: int | None = None
        #: The model's local directory (for the chunking tokenizer).
        self.model_path = model_path

    async def embed(self, texts: Sequence[str], *, deadline: float | None = None) -> Embedded:
        """Vectors and the summed "embed" timing of the calls made: the hop's own times,
        as the other hops report theirs (the wire legs are the caller's; when the hop
        reports no timing, the time the calls took)."""
        import time

        stub = emb_grpc.EmbeddingServiceStub(self.channel)
        began = time.perf_counter()
        rows: list[list[float]] = []
        queue = compute = total = 0
        texts = list(texts)
        for start in range(0, len(texts), REMOTE_EMBED_BATCH):
            request = emb_pb.EmbedRequest(inputs=texts[start : start + REMOTE_EMBED_BATCH])
            response = await self._unary(stub.Embed, request, deadline)
            rows.extend(list(e.values) for e in response.embeddings)
            for t in response.timings:
                queue += t.queue_us
                compute += t.compute_us
                total += t.total_us
        vectors = np.asarray(rows, dtype=np.float32)
        self.dimension = int(vectors.shape[1])
        took = total / 1e6 if total else time.perf_counter() - began
        return Embedded(vectors, HopTime("embed", queue / 1e6, compute / 1e6, took, len(texts)))


class RemoteSearch(_Remote):
    """VectorSearchService at an address."""

    hop = "search"

    async def search(self, call: SearchCall, *, deadline: float | None = None) -> Searched:
        """One search with payloads."""
        stub = vs_grpc.VectorSearchServiceStub(self.channel)
        return searched_from(await self._unary(stub.Search, search_request(call), deadline))

    async def collection_version(self, name: str, *, deadline: float | None = None) -> int:
        """The collection's version (NOT_FOUND when unknown)."""
        stub = vs_grpc.VectorSearchServiceStub(self.channel)
        request = vs_pb.DescribeCollectionRequest(name=name)
        return int((await self._unary(stub.DescribeCollection, request, deadline)).collection.version)


class RemoteRerank(_Remote):
    """RerankService at an address."""

    hop = "rerank"

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int, *, deadline: float | None = None
    ) -> Reranked:
        """Documents best first with the hop's "rerank" timing."""
        stub = rr_grpc.RerankServiceStub(self.channel)
        request = rr_pb.RerankRequest(query=query, documents=list(documents), top_n=top_n)
        response = await self._unary(stub.Rerank, request, deadline)
        timing = next((t for t in response.timings if t.hop == "rerank"), None)
        return Reranked(
            [Ranked(r.index, r.score) for r in response.results],
            HopTime("rerank", timing.queue_us / 1e6, timing.compute_us / 1e6,
                    timing.total_us / 1e6, timing.batch_size) if timing else HopTime("rerank"),
        )


class RemoteGeneration(_Remote):
    """GenerationService at an address."""

    hop = "generation"

    async def generate(
        self, call: GenerateCall, *, deadline: float | None = None
    ) -> AsyncIterator[Delta | Finished]:
        """Deltas, then one ``Finished``; closing this generator cancels the call."""
        stub = gen_grpc.GenerationServiceStub(self.channel)
        request = gen_pb.GenerateRequest(
            model=call.model, request_id=call.request_id,
            messages=[gen_pb.ChatMessage(role=r, content=c) for r, c in call.messages],
        )
        if call.sampling is not None:
            request.sampling.CopyFrom(call.sampling)
        cap_max_tokens(request.sampling, call.max_tokens_cap)
        stream = stub.Generate(request, **self._kwargs(deadline))
        try:
            async for message in stream:
                if message.HasField("delta"):
                    yield Delta(message.delta.text, tuple(message.delta.token_ids))
                elif message.HasField("final"):
                    f = message.final
                    t = next((t for t in f.timings if t.hop == "generate"), None)
                    yield Finished(
                        FINISH_REASONS.get(f.finish_reason, "stop"), f.usage.prompt_tokens,
                        f.usage.completion_tokens, f.model,
                        HopTime("generate", t.queue_us / 1e6, t.compute_us / 1e6,
                                t.total_us / 1e6, t.batch_size) if t else HopTime("generate"),
                        f.time_to_first_token_us / 1e6,
                    )
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err, self.hop) from None
        finally:
            stream.cancel()  # no-op once the call has ended

    async def count_tokens(
        self, model: str, messages: Sequence[tuple[str, str]], *, deadline: float | None = None
    ) -> TokenCount:
        """Tokens of ``messages`` under the model's chat template."""
        stub = gen_grpc.GenerationServiceStub(self.channel)
        request = gen_pb.CountTokensRequest(
            model=model, messages=[gen_pb.ChatMessage(role=r, content=c) for r, c in messages]
        )
        response = await self._unary(stub.CountTokens, request, deadline)
        return TokenCount(response.tokens, response.max_context_tokens)
