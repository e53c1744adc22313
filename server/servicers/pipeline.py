"""The pipeline hop: ``PipelineService`` (Retrieve, Answer) over the other four hops.

The servicer only converts protobuf to ``router.pipeline``'s domain types and back; the
policy (budget, packing, the order of the hops) lives there, and the hops are reached
through ``server.upstream`` (in-process in the embedded default, gRPC when split).
The answer stream is an async generator (what the OpenTelemetry aio instrumentation
supports; handlers calling ``context.write()`` break it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format

from backbone.v1 import (
    common_pb2,
    generation_service_pb2 as gen_pb,
    pipeline_service_pb2 as pb,
    pipeline_service_pb2_grpc as pb_grpc,
    vector_search_service_pb2 as vs_pb,
)
from router.errors import InvalidArgument, Unavailable
from router.guardrails import settings_from as guardrail_settings
from router.hop_api import DENSE, HYBRID, KEYWORD, Delta
from router.pipeline import AnswerFinal, AnswerSpec, Pipeline, Source, retrieve_spec
from router.prompt_packing import DEFAULT_SYSTEM_PROMPT
from router.semantic_cache import CacheSettings, SemanticCache
from server.calls import deadline_of
from server.hop import HopContext
from server.upstream import Upstreams, timing_to_proto

log = logging.getLogger(__name__)

MODES = {
    vs_pb.SEARCH_MODE_UNSPECIFIED: DENSE,
    vs_pb.SEARCH_MODE_DENSE: DENSE,
    vs_pb.SEARCH_MODE_KEYWORD: KEYWORD,
    vs_pb.SEARCH_MODE_HYBRID: HYBRID,
}
FINISH = {
    "stop": gen_pb.FINISH_REASON_STOP,
    "length": gen_pb.FINISH_REASON_LENGTH,
    "abort": gen_pb.FINISH_REASON_ABORT,
}
ROLES = ("user", "assistant")
POLICY = {
    pb.GUARDRAIL_POLICY_OFF: "off", pb.GUARDRAIL_POLICY_FLAG: "flag",
    pb.GUARDRAIL_POLICY_REDACT: "redact", pb.GUARDRAIL_POLICY_BLOCK: "block",
}


def spec_from(request: pb.RetrieveRequest):
    """The validated domain request."""
    if request.mode not in MODES:
        raise InvalidArgument(f"unknown mode value {request.mode}", metadata={"field": "mode"})
    return retrieve_spec(
        request.query, request.collection, request.search_top_k, request.top_n,
        request.skip_rerank, MODES[request.mode],
        request.filter if request.HasField("filter") else None,
    )


def answer_spec_from(request: pb.AnswerRequest) -> AnswerSpec:
    """The validated domain Answer request."""
    for i, turn in enumerate(request.history):
        if turn.role not in ROLES:
            raise InvalidArgument(
                f"history[{i}].role must be user or assistant", metadata={"field": "history"}
            )
    sampling = request.sampling if request.HasField("sampling") else None
    deterministic = sampling is not None and (
        (sampling.HasField("temperature") and sampling.temperature == 0.0)
        or (sampling.HasField("top_k") and sampling.top_k == 1)
    )
    retrieve = request.retrieve
    guardrails = []
    for detector, policy in sorted(request.guardrails.items()):
        if policy not in POLICY:  # UNSPECIFIED: the server's policy
            if policy != pb.GUARDRAIL_POLICY_UNSPECIFIED:
                raise InvalidArgument(f"unknown guardrail policy value {policy}",
                                      metadata={"field": "guardrails"})
            continue
        guardrails.append((detector, POLICY[policy]))
    return AnswerSpec(
        retrieve=spec_from(request.retrieve),
        model=request.model,
        sampling=sampling,
        max_tokens=sampling.max_tokens if sampling and sampling.HasField("max_tokens") else None,
        system_prompt=request.system_prompt,
        history=tuple((t.role, t.content) for t in request.history),
        cacheable=deterministic and not request.skip_cache and not guardrails,
        filter_key=retrieve.filter.SerializeToString(deterministic=True).hex(),
        sampling_key=sampling.SerializeToString(deterministic=True).hex() if sampling else "",
        guardrails=tuple(guardrails),
    )


def source_to_proto(source: Source) -> pb.Source:
    """Wire source."""
    out = pb.Source(
        id=source.id, text=source.text, search_score=source.search_score,
        rerank_score=source.rerank_score,
    )
    if source.metadata:
        json_format.ParseDict(source.metadata, out.metadata)
    return out


def final_to_proto(final: AnswerFinal) -> pb.AnswerResponse:
    """The last message of an Answer stream."""
    return pb.AnswerResponse(final=pb.AnswerFinal(
        finish_reason=FINISH.get(final.finish_reason, gen_pb.FINISH_REASON_STOP),
        usage=common_pb2.Usage(
            prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens,
            total_tokens=final.prompt_tokens + final.completion_tokens,
        ),
        timings=[timing_to_proto(t) for t in final.timings],
        model=final.model,
        degradations=final.degradations,
        cache_hit=final.cache_hit,
        sources_used=final.sources_used,
        guardrails=[pb.GuardrailFinding(
            detector=f.detector, target=f.target, action=f.action, count=f.count,
            source_id=f.source_id,
        ) for f in final.guardrails],
    ))


class PipelineHop:
    """Serves PipelineService; needs the other hops in-process or at ``[upstream]``."""

    name = "pipeline"
    service_names = ("backbone.v1.PipelineService",)

    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None
        self.cache: SemanticCache | None = None
        self._upstreams: Upstreams | None = None

    async def start(self, ctx: HopContext) -> None:
        """Build the upstream path and the pipeline (hops are reached on first use)."""
        cfg = ctx.config.pipeline
        self._upstreams = Upstreams(ctx)
        self.cache = SemanticCache(CacheSettings(
            enabled=cfg.cache, max_entries=cfg.cache_max_entries,
            max_bytes=int(cfg.cache_max_mb * 1024 * 1024), ttl_s=cfg.cache_ttl_s,
            threshold=cfg.cache_threshold,
        ))
        self.pipeline = Pipeline(
            self._upstreams, default_system_prompt=cfg.system_prompt or DEFAULT_SYSTEM_PROMPT,
            cache=self.cache, guardrails=guardrail_settings(cfg.guardrails),
            log_text=ctx.config.server.log_payloads,
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register PipelineService."""
        pb_grpc.add_PipelineServiceServicer_to_server(PipelineServicer(self), server)

    def healthy(self) -> bool:
        """No background task of its own."""
        return True

    async def stop(self) -> None:
        """Close the upstream channels."""
        if self._upstreams is not None:
            await self._upstreams.close()

    def require(self) -> Pipeline:
        """The pipeline, or UNAVAILABLE before start."""
        if self.pipeline is None:
            raise Unavailable("the pipeline hop is not started")
        return self.pipeline


class PipelineServicer(pb_grpc.PipelineServiceServicer):
    """Thin protobuf <-> domain adapter."""

    def __init__(self, hop: PipelineHop) -> None:
        self.hop = hop

    async def Retrieve(self, request, context):  # noqa: N802 - gRPC method name
        """Embed, search, rerank; the sources with every hop's timing."""
        retrieved = await self.hop.require().retrieve(spec_from(request), deadline_of(context))
        return pb.RetrieveResponse(
            sources=[source_to_proto(s) for s in retrieved.sources],
            timings=[timing_to_proto(t) for t in retrieved.timings],
            degradations=retrieved.degradations,
        )

    async def Answer(  # noqa: N802 - gRPC method name
        self, request: pb.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerResponse]:
        """The sources, then token deltas, then the final message."""
        spec = answer_spec_from(request)
        events = self.hop.require().answer(spec, deadline_of(context))
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                if isinstance(event, Delta):
                    yield pb.AnswerResponse(delta=gen_pb.GenerateDelta(
                        text=event.text, token_ids=event.token_ids
                    ))
                elif isinstance(event, AnswerFinal):
                    yield final_to_proto(event)
                else:
                    yield pb.AnswerResponse(
                        sources=pb.AnswerSources(sources=[source_to_proto(s) for s in event])
                    )
