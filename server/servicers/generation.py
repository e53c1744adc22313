"""The generation hop: ``GenerationService`` over one or more :class:`Generator` engines.

The servicer only converts protobuf to the domain types of
:mod:`server.engines.generator` and back; validation, admission, timing and model
selection live there. A client that cancels, disconnects or runs out of deadline makes
grpc cancel the handler; the cancellation unwinds through the (explicitly closed)
iterators down to the engine, which aborts the sequence before its next step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

import grpc

from backbone.v1 import common_pb2, generation_service_pb2 as pb, generation_service_pb2_grpc
from server.engines import registry as engine_registry
from router.model_routing import tiers_from
from server.engines.auto_route import AutoRouter, check_tier_models
from server.engines.generator import (
    AUTO_MODEL,
    ChatTurn,
    GenerationFinal,
    GenerationParams,
    GenerationRequest,
    Generator,
    ModelRegistry,
    ServedModel,
    TokenDelta,
    model_specs,
    validate_request,
)
from server import metrics
from server.calls import deadline_of, hop_timing, priority_of
from server.errors import DeadlineTooShort, Unavailable
from server.hop import HopContext

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
PROBE_PROMPT = "Hello"
#: Trailing metadata key explaining an ``auto`` request's routing (JSON).
ROUTE_METADATA = "backbone-route"


def params_from(sampling: pb.SamplingParams) -> GenerationParams:
    """Domain sampling parameters; unset proto fields take the contract's defaults."""
    has = sampling.HasField
    defaults = GenerationParams()
    return GenerationParams(
        temperature=sampling.temperature if has("temperature") else defaults.temperature,
        top_p=sampling.top_p if has("top_p") else defaults.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens if has("max_tokens") else None,
        stop=tuple(sampling.stop),
        seed=sampling.seed if has("seed") else None,
        repetition_penalty=(
            sampling.repetition_penalty if has("repetition_penalty") else defaults.repetition_penalty
        ),
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
    )


def turns_from(messages) -> tuple[ChatTurn, ...]:
    """Domain chat turns."""
    return tuple(ChatTurn(m.role, m.content) for m in messages)


def request_from(request: pb.GenerateRequest) -> GenerationRequest:
    """The domain request; a server-assigned id when the caller gave none."""
    return GenerationRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=request.prompt,
        messages=turns_from(request.messages),
        params=params_from(request.sampling),
    )


def final_message(request_id: str, model: str, final: GenerationFinal) -> pb.GenerateResponse:
    """The last message of a stream."""
    us = lambda s: max(0, round(s * 1e6))  # noqa: E731
    return pb.GenerateResponse(
        request_id=request_id,
        final=pb.GenerateFinal(
            finish_reason=FINISH_REASONS[final.finish_reason],
            usage=common_pb2.Usage(
                prompt_tokens=final.prompt_tokens,
                completion_tokens=final.completion_tokens,
                total_tokens=final.prompt_tokens + final.completion_tokens,
            ),
            time_to_first_token_us=us(final.ttft_s),
            time_per_output_token_us=us(final.tpot_s),
            timings=[
                hop_timing(
                    "generate", queue_s=final.queue_s, compute_s=final.compute_s,
                    total_s=final.total_s, batch_size=final.batch_size,
                )
            ],
            model=model,
        ),
    )


class GenerationHop:
    """Serves ``backbone.v1.GenerationService`` for every configured model.

    ``generators`` (tests, benchmarks) maps model names to already started engines that
    the hop uses instead of building its own; it neither starts nor stops those.
    """

    name = "generation"
    service_names = ("backbone.v1.GenerationService",)

    def __init__(self, generators: Mapping[str, Generator] | None = None) -> None:
        self._given = dict(generators or {})
        self._owned: list[Generator] = []
        self.registry: ModelRegistry | None = None
        # Routes model="auto" among [[routing.tiers]]; None: no tiers, "auto" = default.
        self.auto: AutoRouter | None = None

    async def start(self, ctx: HopContext) -> None:
        """Load every model's engine, warm it, and answer a real probe through the hop."""
        otlp = ctx.config.telemetry.otlp_endpoint
        specs = [replace(s, otlp_traces_endpoint=otlp) for s in model_specs(ctx.config.generation)]
        # A tier naming an unknown model fails here, before any engine loads.
        tiers = tiers_from(ctx.config.routing.tiers)
        check_tier_models(tiers, [s.name for s in specs])
        models: list[ServedModel] = []
        try:
            for index, spec in enumerate(specs):
                generator = self._given.get(spec.name)
                if generator is None:
                    generator = engine_registry.load(
                        engine_registry.GENERATION, spec.engine, spec
                    )
                    self._owned.append(generator)
                    await generator.start()
                models.append(ServedModel(spec, generator, default=index == 0))
            for model in models:
                model.ready = True
                await self._probe(model)
        except BaseException:
            await self.stop()
            raise
        self.registry = ModelRegistry(models)
        metrics.watch_queue("generate", lambda: sum(m.gate.waiting for m in models))
        if tiers:
            self.auto = AutoRouter(
                ctx.config.routing, self.registry.models, self.registry.default,
                embedding=ctx.local.get("embedding"),
            )
        log.info("generation: serving %s", ", ".join(f"{s.name} ({s.engine})" for s in specs))

    @staticmethod
    async def _probe(model: ServedModel) -> None:
        request = GenerationRequest(
            request_id=f"probe-{uuid.uuid4().hex}",
            prompt=PROBE_PROMPT,
            params=GenerationParams(temperature=0.0, max_tokens=2),
        )
        final = None
        async with contextlib.aclosing(model.stream(request, time.perf_counter())) as events:
            async for event in events:
                if isinstance(event, GenerationFinal):
                    final = event
        if final is None or final.completion_tokens < 1:
            raise RuntimeError(f"generation probe of {model.name!r} produced no tokens")

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the GenerationService servicer."""
        generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self), server
        )

    def healthy(self) -> bool:
        """False once any engine died."""
        if self.registry is None:
            return True  # not started yet: health is NOT_SERVING until start returns
        return all(m.generator.healthy() for m in self.registry.models.values())

    async def stop(self) -> None:
        """Stop the engines this hop started."""
        owned, self._owned = self._owned, []
        for generator in reversed(owned):
            try:
                await generator.stop()
            except Exception:  # noqa: BLE001 - stop the others regardless
                log.exception("stopping a generation engine failed")

    def require_registry(self) -> ModelRegistry:
        """The models, or UNAVAILABLE before start."""
        if self.registry is None:
            raise Unavailable("the generation hop is not started")
        return self.registry


class GenerationServicer(generation_service_pb2_grpc.GenerationServiceServicer):
    """Thin protobuf <-> domain adapter."""

    def __init__(self, hop: GenerationHop) -> None:
        self.hop = hop

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream deltas, then one final message."""
        received = time.perf_counter()
        registry = self.hop.require_registry()
        domain = replace(
            request_from(request), deadline=deadline_of(context), priority=priority_of(context)
        )
        auto = self.hop.auto if request.model == AUTO_MODEL else None
        if auto is None:
            model, cap, holding = registry.resolve(request.model), 0, contextlib.nullcontext()
            if request.model == AUTO_MODEL:
                route = {"tier": None, "model": model.name, "spilled": False,
                         "reason": "no routing tiers configured: the default model"}
                context.set_trailing_metadata(((ROUTE_METADATA, json.dumps(route)),))
        else:
            decision = await auto.decide(domain, request.task)
            model, cap = auto.model_of(decision), decision.tier.max_tokens_cap
            domain = auto.capped(domain, decision.tier)
            holding = auto.holding(decision.tier)
            context.set_trailing_metadata(((ROUTE_METADATA, decision.to_json(model.name)),))
        validate_request(domain, model.limits)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineTooShort("the deadline expired before generation started")
        rid = domain.request_id
        with holding:
            stream = registry.stream(model, domain, received, cap)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if isinstance(event, TokenDelta):
                        yield pb.GenerateResponse(
                            request_id=rid,
                            delta=pb.GenerateDelta(text=event.text, token_ids=event.token_ids),
                        )
                    else:
                        yield final_message(rid, model.name, event)

    async def Abort(  # noqa: N802 - gRPC method name
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        """Abort a running generation by id."""
        aborted = await self.hop.require_registry().abort(request.request_id)
        return pb.AbortResponse(aborted=aborted)

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """The served models, default first."""
        registry = self.hop.require_registry()
        ordered = [registry.default] + [
            m for m in registry.models.values() if m is not registry.default
        ]
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=m.name,
                    engine=m.spec.engine,
                    max_context_tokens=m.limits.max_context_tokens,
                    max_tokens_cap=m.limits.max_tokens_cap,
                    ready=m.ready and m.generator.healthy(),
                    default=m is registry.default,
                )
                for m in ordered
            ]
        )

    async def CountTokens(  # noqa: N802 - gRPC method name
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.CountTokensResponse:
        """Prompt tokens after the chat template, and the context size."""
        model = self.hop.require_registry().resolve(request.model)
        tokens = await model.count_tokens(request.prompt, turns_from(request.messages))
        return pb.CountTokensResponse(
            tokens=tokens, max_context_tokens=model.limits.max_context_tokens
        )
