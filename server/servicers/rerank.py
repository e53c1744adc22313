"""The rerank hop: ``RerankService`` over a ``Reranker`` engine, batched across requests.

A request is validated (limits, top_n, model) before any work, tokenized and cut to the
engine's window off the event loop, refused under the REJECT policy if a pair had to be
cut, and then its items (pairs, or texts for late interaction) go through the project's
one ``DynamicBatcher``, which packs items of concurrent requests under a token budget.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

import grpc

from backbone.v1 import common_pb2, rerank_service_pb2, rerank_service_pb2_grpc
from router.admission import Priority
from router.batcher import BatchPolicy, DynamicBatcher
from server.calls import deadline_of, hop_timing, priority_of
from server.config import RerankConfig
from server.engines import registry
from server.engines.reranker import (
    REJECT,
    TRUNCATE,
    RerankLimits,
    RerankOutcome,
    Reranker,
    enforce_truncation_policy,
    rank,
    validate_request,
)
from server.errors import Unavailable
from server.hop import HopContext
from server.servicers.batched import BatchedHop

log = logging.getLogger(__name__)

HOP = "rerank"
PROBE_QUERY = "what is the capital of france"
PROBE_DOCUMENTS = (
    "Paris is the capital and most populous city of France.",
    "Bananas are an edible fruit produced by large herbaceous flowering plants.",
)


class RerankHop(BatchedHop):
    """Serves RerankService; also reranks in-process for the pipeline."""

    name = "rerank"
    service_names = ("backbone.v1.RerankService",)

    def __init__(self, engine: Reranker | None = None) -> None:
        """``engine`` None: built from the config at ``start`` (tests may inject one)."""
        self._engine = engine
        # Only an engine the hop built itself is closed at stop; an injected one is shared.
        self._owns_engine = False
        self._batcher: DynamicBatcher | None = None
        self._config = RerankConfig()
        self.limits = RerankLimits()

    # -- Hop protocol ----------------------------------------------------------------

    async def start(self, ctx: HopContext) -> None:
        """Load the engine, start the batcher, warm up and check a real probe."""
        cfg = ctx.config.rerank
        self._config = cfg
        self.limits = RerankLimits(max_documents=cfg.max_documents, max_text_chars=cfg.max_text_chars)
        if self._engine is None:
            self._engine = await asyncio.to_thread(
                registry.load, registry.RERANK, cfg.engine, cfg
            )
            self._owns_engine = True
        policy = BatchPolicy(
            max_batch_size=cfg.max_batch_size,
            max_wait_s=cfg.max_wait_ms / 1000.0,
            token_budget=cfg.token_budget,
            max_queue=cfg.max_queue,
            max_queue_tokens=cfg.max_queue_tokens,
            max_queue_delay_s=cfg.max_queue_delay_ms / 1000.0,
            default_deadline_s=cfg.default_deadline_ms / 1000.0,
        )
        self._batcher = DynamicBatcher(HOP, self._engine.run_batch, policy)
        self._watch_batcher(HOP)
        await self._batcher.start()
        probe = await self.rerank(PROBE_QUERY, list(PROBE_DOCUMENTS), 0)
        scores = [r.score for r in probe.results]
        if len(scores) != len(PROBE_DOCUMENTS) or not all(math.isfinite(s) for s in scores):
            raise RuntimeError(f"rerank probe returned {scores}")
        log.info("rerank engine %s ready (window %d tokens)", self.model_name, self._engine.window)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register RerankService."""
        rerank_service_pb2_grpc.add_RerankServiceServicer_to_server(RerankServicer(self), server)

    async def stop(self) -> None:
        """Stop the batcher (waiting callers get UNAVAILABLE), then release the engine."""
        await super().stop()
        if self._engine is not None and self._owns_engine:
            self._engine.close()

    # -- in-process API --------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """Name of the served reranker."""
        return self._require_engine().name

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_n: int = 0,
        *,
        truncation: str = TRUNCATE,
        model: str = "",
        deadline: float | None = None,
        priority: Priority = Priority.NORMAL,
    ) -> RerankOutcome:
        """Rerank ``documents`` for ``query``: best first, the first ``top_n`` (0: all).

        Validates before any work; ``deadline`` is a ``time.monotonic()`` instant (None:
        the hop's default). A request that cannot finish before it is refused at once,
        before tokenising (``router.admission``).
        """
        started = time.perf_counter()
        engine = self._require_engine()
        validate_request(
            query, documents, top_n, self.limits, model=model, served_model=engine.name
        )
        if self._batcher is None:
            raise Unavailable("rerank hop is not started")
        self._batcher.check_admission(deadline=deadline, priority=priority, items=len(documents))
        prepared = await asyncio.to_thread(engine.prepare, query, list(documents))
        enforce_truncation_policy(prepared, truncation, engine.window)
        outputs, timing = await self._batcher.submit(
            prepared.items, prepared.costs, deadline, priority
        )
        scores = await asyncio.to_thread(engine.finish, prepared, outputs)
        return RerankOutcome(
            results=rank(scores, prepared.truncated, top_n),
            model=engine.name,
            truncated_pairs=prepared.truncated_pairs,
            prompt_tokens=prepared.prompt_tokens,
            queue_s=timing.queue_s,
            compute_s=timing.compute_s,
            total_s=time.perf_counter() - started,
            batch_size=timing.batch_size,
        )

    def _require_engine(self) -> Reranker:
        if self._engine is None:
            raise Unavailable("rerank model is not loaded yet")
        return self._engine


def truncation_of(request: rerank_service_pb2.RerankRequest) -> str:
    """The request's truncation policy (UNSPECIFIED means truncate)."""
    return REJECT if request.truncation == common_pb2.TRUNCATION_POLICY_REJECT else TRUNCATE


def to_response(
    outcome: RerankOutcome, documents: Sequence[str], return_documents: bool
) -> rerank_service_pb2.RerankResponse:
    """Build the RerankResponse of one request."""
    response = rerank_service_pb2.RerankResponse(
        model=outcome.model,
        truncated_pairs=outcome.truncated_pairs,
        usage=common_pb2.Usage(
            prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens
        ),
        timings=[
            hop_timing(
                HOP, queue_s=outcome.queue_s, compute_s=outcome.compute_s,
                total_s=outcome.total_s, batch_size=outcome.batch_size,
            )
        ],
    )
    for result in outcome.results:
        response.results.add(
            index=result.index,
            score=result.score,
            truncated=result.truncated,
            document=documents[result.index] if return_documents else "",
        )
    return response


class RerankServicer(rerank_service_pb2_grpc.RerankServiceServicer):
    """Thin servicer: protobuf in, hop core, protobuf out."""

    def __init__(self, hop: RerankHop) -> None:
        self._hop = hop

    async def Rerank(self, request, context):  # noqa: N802 - gRPC method name
        """Score every document against the query; best first."""
        documents = request.documents  # a repeated field: len() without copying
        outcome = await self._hop.rerank(
            request.query,
            documents,
            request.top_n,
            truncation=truncation_of(request),
            model=request.model,
            deadline=deadline_of(context),
            priority=priority_of(context),
        )
        return to_response(outcome, documents, request.return_documents)
