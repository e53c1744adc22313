"""The embedding hop: ``EmbeddingService`` over an ``Embedder`` with dynamic batching."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from backbone.v1 import common_pb2, embedding_service_pb2, embedding_service_pb2_grpc
from router.admission import Priority
from router.batcher import BatchPolicy, BatchTiming, DynamicBatcher
from server.calls import deadline_of, hop_timing, priority_of
from server.config import EmbeddingConfig
from server.engines import registry
from server.engines.embedder import Embedder
from router.errors import MAX_MODEL_NAME_CHARS, check_name_length
from server.errors import InvalidArgument, NotFound, Unavailable
from server.hop import HopContext
from server.servicers.batched import BatchedHop

log = logging.getLogger(__name__)

# Above this many characters, tokenisation runs in a thread so the event loop stays free.
TOKENIZE_INLINE_CHARS = 8192
WARMUP_TEXTS = ("warm up", "a somewhat longer sentence to warm up the embedding model " * 4)


@dataclass(frozen=True)
class EmbedOptions:
    """Per-request options, validated."""

    normalize: bool = False
    truncate: bool = True
    dimensions: int = 0


@dataclass(frozen=True)
class EmbedResult:
    """Vectors of one request with their token counts and timing."""

    vectors: np.ndarray
    tokens: list[int]
    truncated: list[bool]
    timing: BatchTiming
    total_s: float


def check_inputs(texts: Sequence[str], limits: EmbeddingConfig) -> None:
    """Reject bad input before any work: count, empties, per-text and total size."""
    if not texts:
        raise InvalidArgument("inputs is empty: give at least one text", reason="EMPTY_INPUT")
    if len(texts) > limits.max_inputs:
        raise InvalidArgument(
            f"{len(texts)} inputs; at most {limits.max_inputs} per request",
            reason="TOO_MANY_INPUTS", metadata={"limit": limits.max_inputs},
        )
    total = 0
    for i, text in enumerate(texts):
        if not text:
            raise InvalidArgument(f"inputs[{i}] is empty", reason="EMPTY_INPUT")
        if len(text) > limits.max_text_chars:
            raise InvalidArgument(
                f"inputs[{i}] has {len(text)} characters; at most {limits.max_text_chars}",
                reason="INPUT_TOO_LARGE", metadata={"limit": limits.max_text_chars, "index": i},
            )
        total += len(text)
    size = total if total > limits.max_request_bytes else sum(len(t.encode()) for t in texts)
    if size > limits.max_request_bytes:
        raise InvalidArgument(
            f"request has {size} bytes of text; at most {limits.max_request_bytes}",
            reason="INPUT_TOO_LARGE", metadata={"limit": limits.max_request_bytes},
        )


def shape_vectors(vectors: np.ndarray, options: EmbedOptions) -> np.ndarray:
    """Apply the output dimension (leading components) and optional L2 normalisation."""
    if options.dimensions:
        vectors = vectors[:, : options.dimensions]
    if options.normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


class EmbeddingHop(BatchedHop):
    """Serves EmbeddingService; also embeds in-process for neighbours (search, ingest)."""

    name = "embedding"
    service_names = ("backbone.v1.EmbeddingService",)

    def __init__(self, embedder: Embedder | None = None) -> None:
        self._embedder = embedder
        # Items are what the engine runs: texts, or their tokens (Embedder.prepare).
        self._batcher: DynamicBatcher[Any, np.ndarray] | None = None
        self._limits = EmbeddingConfig()
        self.model_name = ""

    # -- Hop protocol ----------------------------------------------------------------

    async def start(self, ctx: HopContext) -> None:
        """Load the model, start the batcher, warm up and answer a real probe."""
        cfg = ctx.config.embedding
        self._limits = cfg
        # The model loads on the first lane's thread: the torch engine's load-time packing
        # check runs the model, and all of its work must stay on one thread (see
        # DynamicBatcher.run_in_worker). The engine decides the lanes, so the batcher that
        # loads it is replaced once it is known.
        loader = DynamicBatcher("embed", self._run_batch, self._policy(cfg, None))
        if self._embedder is None:
            self._embedder = await loader.run_in_worker(
                registry.load, registry.EMBEDDING, cfg.engine, cfg
            )
        policy = self._policy(cfg, self._embedder)
        # With one lane, running alone is running in that lane.
        alone = self._embedder.runs_alone and policy.lanes > 1
        if policy == loader.policy and not alone:
            self._batcher = loader
        else:
            await loader.stop()
            self._batcher = DynamicBatcher(
                "embed", self._run_batch, policy, run_alone=self._run_alone if alone else None,
            )
        self.model_name = self._embedder.name
        log.info("embedding model %s: %s engine, %d lane(s), batches of %d at most",
                 self.model_name, type(self._embedder).__name__, policy.lanes,
                 policy.max_batch_size)
        self._watch_batcher("embed")
        await self._batcher.start()
        await self.embed(list(WARMUP_TEXTS), EmbedOptions())
        probe = await self.embed(["probe"], EmbedOptions(normalize=True))
        if probe.vectors.shape != (1, self.dimension) or not np.isfinite(probe.vectors).all():
            raise RuntimeError(f"embedding probe returned {probe.vectors.shape}")

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register EmbeddingService."""
        embedding_service_pb2_grpc.add_EmbeddingServiceServicer_to_server(
            EmbeddingServicer(self), server
        )

    # -- in-process API --------------------------------------------------------------

    @property
    def dimension(self) -> int:
        """Native output dimension of the model."""
        return self._require_embedder().dimension

    @property
    def model_path(self) -> str:
        """Local directory of the model (for its tokenizer)."""
        return self._require_embedder().model_path

    @property
    def max_seq_length(self) -> int:
        """Longest input in tokens."""
        return self._require_embedder().max_seq_length

    async def embed_texts(
        self, texts: list[str], *, normalize: bool = False, deadline: float | None = None
    ) -> np.ndarray:
        """Vectors (n, dimension) for ``texts`` through the batcher; limits checked."""
        check_inputs(texts, self._limits)
        return (await self.embed(texts, EmbedOptions(normalize=normalize), deadline)).vectors

    async def embed(
        self, texts: list[str], options: EmbedOptions, deadline: float | None = None,
        priority: Priority = Priority.NORMAL,
    ) -> EmbedResult:
        """Embed already-validated texts; the core of both the RPC and in-process use.

        Admission by deadline (``router.admission``): refused at once, before
        tokenising, when the texts cannot be embedded before ``deadline`` (a
        ``time.monotonic()`` instant; None: the hop's default deadline)."""
        started = time.perf_counter()
        embedder = self._require_embedder()
        if self._batcher is None:
            raise Unavailable("embedding hop is not started")
        if options.dimensions > embedder.dimension:
            raise InvalidArgument(
                f"dimensions {options.dimensions} exceeds the model's {embedder.dimension}",
                reason="DIMENSION_MISMATCH", metadata={"limit": embedder.dimension},
            )
        # A request that cannot finish in time is refused before it is tokenised: under
        # overload most requests are refused, and tokenising them would only slow the
        # engine further. The batcher checks again with the real token counts.
        self._batcher.check_admission(deadline=deadline, priority=priority, items=len(texts))
        if sum(map(len, texts)) > TOKENIZE_INLINE_CHARS:
            inputs, tokens = await asyncio.to_thread(embedder.prepare, texts)
        else:
            inputs, tokens = embedder.prepare(texts)
        limit = embedder.max_seq_length
        truncated = [n > limit for n in tokens]
        if not options.truncate and any(truncated):
            index = truncated.index(True)
            raise InvalidArgument(
                f"inputs[{index}] has {tokens[index]} tokens; the model reads at most {limit}"
                " (truncation policy REJECT)",
                reason="INPUT_TOO_LARGE", metadata={"limit": limit, "index": index},
            )
        costs = [min(n, limit) for n in tokens]
        rows, timing = await self._batcher.submit(inputs, costs, deadline, priority)
        vectors = shape_vectors(np.stack(rows), options)
        return EmbedResult(vectors, costs, truncated, timing, time.perf_counter() - started)

    def _require_embedder(self) -> Embedder:
        if self._embedder is None:
            raise Unavailable("embedding model is not loaded yet")
        return self._embedder

    def _run_batch(self, inputs: list[Any]) -> list[np.ndarray]:
        assert self._embedder is not None
        return list(self._embedder.embed(inputs))

    def _run_alone(self, inputs: list[Any]) -> list[np.ndarray]:
        assert self._embedder is not None
        return list(self._embedder.embed_alone(inputs))

    @staticmethod
    def _policy(cfg: EmbeddingConfig, embedder: Embedder | None) -> BatchPolicy:
        """The batching policy for ``cfg``, within what the engine can do."""
        limit = (embedder.batch_limit if embedder is not None else 0) or cfg.max_batch_size
        size = min(cfg.max_batch_size, limit)
        lanes = embedder.lanes if embedder is not None else 1
        return BatchPolicy(
            max_batch_size=size, max_wait_s=cfg.max_wait_ms / 1000.0,
            token_budget=cfg.token_budget, max_queue=cfg.max_queue,
            max_queue_tokens=cfg.max_queue_tokens,
            max_queue_delay_s=cfg.max_queue_delay_ms / 1000.0,
            default_deadline_s=cfg.default_deadline_ms / 1000.0,
            lanes=lanes,
            # A text per call leaves nothing to group: hand each lane its next text ahead
            # of time, so it starts without waiting for the event loop.
            lane_depth=2 if size == 1 else 1,
        )


def options_from(request: embedding_service_pb2.EmbedRequest) -> EmbedOptions:
    """Validated options of an EmbedRequest."""
    return EmbedOptions(
        normalize=request.normalize,
        truncate=request.truncation != common_pb2.TRUNCATION_POLICY_REJECT,
        dimensions=request.dimensions,
    )


def to_response(result: EmbedResult, model: str) -> embedding_service_pb2.EmbedResponse:
    """Build the EmbedResponse of one request."""
    dims = int(result.vectors.shape[1])
    response = embedding_service_pb2.EmbedResponse(
        model=model,
        dimensions=dims,
        usage=common_pb2.Usage(prompt_tokens=sum(result.tokens), total_tokens=sum(result.tokens)),
        timings=[
            hop_timing(
                "embed", queue_s=result.timing.queue_s, compute_s=result.timing.compute_s,
                total_s=result.total_s, batch_size=result.timing.batch_size,
            )
        ],
    )
    for row, tokens, cut in zip(result.vectors.tolist(), result.tokens, result.truncated):
        response.embeddings.add(values=row, tokens=tokens, truncated=cut)
    return response


class EmbeddingServicer(embedding_service_pb2_grpc.EmbeddingServiceServicer):
    """Thin servicer: protobuf in, hop core, protobuf out."""

    def __init__(self, hop: EmbeddingHop) -> None:
        self._hop = hop

    async def _handle(
        self, request: embedding_service_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedding_service_pb2.EmbedResponse:
        if request.model and request.model != self._hop.model_name:
            check_name_length(request.model, "model", MAX_MODEL_NAME_CHARS)
            raise NotFound("the embedding model is not served here",
                           reason="MODEL_NOT_FOUND", metadata={"model": request.model})
        texts = list(request.inputs)
        check_inputs(texts, self._hop._limits)
        result = await self._hop.embed(
            texts, options_from(request), deadline_of(context), priority_of(context)
        )
        return to_response(result, self._hop.model_name)

    async def Embed(self, request, context):  # noqa: N802 - gRPC method name
        """Embed one batch of texts."""
        return await self._handle(request, context)

    async def EmbedStream(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[embedding_service_pb2.EmbedStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[embedding_service_pb2.EmbedStreamResponse]:
        """One response per request message, in order."""
        async for message in request_iterator:
            response = await self._handle(message.request, context)
            yield embedding_service_pb2.EmbedStreamResponse(response=response, id=message.id)
