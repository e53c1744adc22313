"""In-process upstreams (the embedded default): direct calls into this process's hops.

Each adapter converts to and from the domain types of ``router.hop_api`` and calls the
hop's own in-process API; the hop validates and raises ``router.errors`` itself, so
errors need no mapping here.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from backbone.v1 import generation_service_pb2 as gen_pb
from backbone.v1 import vector_search_service_pb2 as vs_pb
from router.deadlines import expired
from router.errors import DeadlineTooShort
from router.hop_api import (
    Delta,
    Embedded,
    Finished,
    Found,
    GenerateCall,
    HopTime,
    Ranked,
    Reranked,
    SearchCall,
    Searched,
    TokenCount,
)
from server.upstream.wire import cap_max_tokens, plain_struct, timing_from_proto

MODES = {
    "dense": vs_pb.SEARCH_MODE_DENSE,
    "keyword": vs_pb.SEARCH_MODE_KEYWORD,
    "hybrid": vs_pb.SEARCH_MODE_HYBRID,
}


def _check_time(deadline: float | None, hop: str) -> None:
    # Invariant shared with the gRPC adapters: a hop is never started once the caller's
    # deadline has passed.
    if expired(deadline):
        raise DeadlineTooShort(f"no time left for the {hop} hop")


def search_request(call: SearchCall) -> vs_pb.SearchRequest:
    """The wire request of a domain search (payloads always returned)."""
    request = vs_pb.SearchRequest(
        collection=call.collection, top_k=call.top_k, mode=MODES[call.mode], with_payload=True
    )
    if call.vector is not None:
        request.vector.values.extend(np.asarray(call.vector, dtype=np.float32).tolist())
    else:
        request.text = call.text
    if call.filter is not None:
        request.filter.CopyFrom(call.filter)
    if call.params is not None:
        request.params.CopyFrom(call.params)
    return request


def searched_from(response: vs_pb.SearchResponse) -> Searched:
    """Domain hits and timings of a search response."""
    hits = [Found(h.id, h.score, h.payload.text, plain_struct(h.payload.metadata))
            for h in response.hits]
    return Searched(hits, [timing_from_proto(t) for t in response.timings])


class LocalEmbedding:
    """The embedding hop of this process."""

    def __init__(self, hop: Any) -> None:
        self._hop = hop

    @property
    def dimension(self) -> int | None:
        """Output dimension."""
        return int(self._hop.dimension)

    @property
    def model_path(self) -> str:
        """Model directory (for the chunking tokenizer)."""
        return str(self._hop.model_path)

    async def embed(self, texts: Sequence[str], *, deadline: float | None = None) -> Embedded:
        """Vectors (not normalised) and the "embed" timing."""
        _check_time(deadline, "embedding")
        began = time.perf_counter()
        vectors = await self._hop.embed_texts(list(texts), normalize=False, deadline=deadline)
        took = time.perf_counter() - began
        return Embedded(
            np.asarray(vectors, dtype=np.float32), HopTime("embed", 0.0, took, took, len(texts))
        )

    async def close(self) -> None:
        """Nothing to release."""


class LocalSearch:
    """The search hop of this process."""

    def __init__(self, hop: Any) -> None:
        self._hop = hop

    async def search(self, call: SearchCall, *, deadline: float | None = None) -> Searched:
        """One search through the hop's core (validation included)."""
        _check_time(deadline, "search")
        # Validated as the wire request is; the hits come back as domain values, with no
        # wire response built and parsed again (~25 us a hit with its payload).
        prepared = self._hop.prepare(search_request(call))
        results, timings = await self._hop.search_queries([prepared], deadline)
        hits = [
            Found(h.id, h.score, h.payload.text, dict(h.payload.metadata))
            if h.payload is not None else Found(h.id, h.score, "")
            for h in results[0]
        ]
        return Searched(hits, [timing_from_proto(t) for t in timings])

    async def collection_version(self, name: str, *, deadline: float | None = None) -> int:
        """The collection's version (NOT_FOUND when unknown)."""
        return int(self._hop.collection(name).version)

    async def close(self) -> None:
        """Nothing to release."""


class LocalRerank:
    """The rerank hop of this process."""

    def __init__(self, hop: Any) -> None:
        self._hop = hop

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int, *, deadline: float | None = None
    ) -> Reranked:
        """Documents best first with the hop's "rerank" timing."""
        _check_time(deadline, "rerank")
        out = await self._hop.rerank(query, list(documents), top_n, deadline=deadline)
        return Reranked(
            [Ranked(r.index, r.score) for r in out.results],
            HopTime("rerank", out.queue_s, out.compute_s, out.total_s, out.batch_size),
        )

    async def close(self) -> None:
        """Nothing to release."""


class LocalGeneration:
    """The generation hop of this process (its model registry)."""

    def __init__(self, hop: Any) -> None:
        self._hop = hop

    def _domain(self, call: GenerateCall):
        from server.engines.generator import ChatTurn, GenerationRequest
        from server.servicers.generation import params_from

        sampling = gen_pb.SamplingParams()
        if call.sampling is not None:
            sampling.CopyFrom(call.sampling)
        cap_max_tokens(sampling, call.max_tokens_cap)
        return GenerationRequest(
            request_id=call.request_id or uuid.uuid4().hex,
            messages=tuple(ChatTurn(r, c) for r, c in call.messages),
            params=params_from(sampling),
        )

    async def generate(
        self, call: GenerateCall, *, deadline: float | None = None
    ) -> AsyncIterator[Delta | Finished]:
        """Deltas, then one ``Finished``; closing this generator aborts the sequence."""
        from server.engines.generator import GenerationFinal, TokenDelta, validate_request

        _check_time(deadline, "generation")
        received = time.perf_counter()
        registry = self._hop.require_registry()
        model = registry.resolve(call.model)
        domain = self._domain(call)
        validate_request(domain, model.limits)
        async with contextlib.aclosing(registry.stream(model, domain, received)) as events:
            async for event in events:
                if isinstance(event, TokenDelta):
                    yield Delta(event.text, tuple(event.token_ids))
                elif isinstance(event, GenerationFinal):
                    yield Finished(
                        event.finish_reason, event.prompt_tokens, event.completion_tokens,
                        model.name,
                        HopTime("generate", event.queue_s, event.compute_s, event.total_s,
                                event.batch_size),
                        event.ttft_s,
                    )

    async def count_tokens(
        self, model: str, messages: Sequence[tuple[str, str]], *, deadline: float | None = None
    ) -> TokenCount:
        """Tokens of ``messages`` under the model's chat template."""
        from server.engines.generator import ChatTurn

        _check_time(deadline, "generation")
        served = self._hop.require_registry().resolve(model)
        tokens = await served.count_tokens("", [ChatTurn(r, c) for r, c in messages])
        return TokenCount(tokens, served.limits.max_context_tokens)

    async def close(self) -> None:
        """Nothing to release."""
