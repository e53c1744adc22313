"""The retrieval-augmented pipeline's policy: Retrieve and Answer over ``Upstream`` hops.

Retrieve: embed the query (dense mode; keyword and hybrid queries go to search as text),
search ``search_top_k`` candidates with the filter, rerank them to ``top_n`` (unless
skipped, or the deadline budget skips it), and return sources carrying both scores and
the point metadata. Answer: Retrieve, pack the sources into the model's context window
(``router.prompt_packing``), then stream generation: the sources first, the deltas, and a
final event with the finish reason, usage, every hop's timing, the model that ran and
every degradation. ``model`` passes through untouched (``auto`` is the generation hop's
complexity routing; the final reports the model it chose).

Calls go through ``router.hop_api.Upstream`` only (in-process or gRPC: the same code);
the deadline budget is ``router.budget``. No grpc imports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from router import budget
from router.deadlines import remaining_s
from router.errors import InvalidArgument
from router.guardrails import Finding, GuardrailSettings, Screen
from router.hop_api import (
    DENSE,
    HYBRID,
    KEYWORD,
    Delta,
    Embedded,
    Finished,
    GenerateCall,
    HopTime,
    SearchCall,
    Upstream,
)
from router.prompt_packing import CALIBRATION, DEFAULT_SYSTEM_PROMPT, pack, token_bound
from router.semantic_cache import SemanticCache, partition_key

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 8192
DEFAULT_SEARCH_TOP_K = 50
DEFAULT_TOP_N = 5
MAX_SEARCH_TOP_K = 1000
#: Output tokens kept free in the window when the request sets no max_tokens.
DEFAULT_ANSWER_TOKENS = 256
#: Added to the one-message probe's tokens for the template's tokens per message (a
#: role name longer than "user").
TEMPLATE_SLACK_TOKENS = 4


@dataclass(frozen=True)
class ModelWindow:
    """What the pipeline learns once per counting model."""

    context_tokens: int
    #: The template's tokens per message for ``prompt_packing.token_bound``; None when
    #: the model's tokenizer broke the bound on the calibration text (always count).
    per_message: int | None


@dataclass(frozen=True)
class RetrieveSpec:
    """A validated Retrieve request (``filter``/``params`` are wire values passed through)."""

    query: str
    collection: str
    search_top_k: int = DEFAULT_SEARCH_TOP_K
    top_n: int = DEFAULT_TOP_N
    skip_rerank: bool = False
    mode: str = DENSE
    filter: Any = None


@dataclass(frozen=True)
class AnswerSpec:
    """A validated Answer request; ``sampling`` is the wire value, passed through."""

    retrieve: RetrieveSpec
    model: str = ""
    sampling: Any = None
    max_tokens: int | None = None
    system_prompt: str = ""
    history: tuple[tuple[str, str], ...] = ()
    #: Deterministic sampling (temperature 0 or top_k 1) and the cache not skipped.
    cacheable: bool = False
    #: Stable renderings of the filter and the sampling parameters (cache keys).
    filter_key: str = ""
    sampling_key: str = ""
    #: The request's guardrail policies (detector, policy) over the server's.
    guardrails: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Source:
    """A retrieved passage with both scores (rerank 0 when not reranked)."""

    id: str
    text: str
    search_score: float
    rerank_score: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Retrieved:
    """Sources best first, the hops' timings ("pipeline" last), the degradations."""

    sources: list[Source]
    timings: list[HopTime]
    degradations: list[str]
    #: The tier the budget chose for generation (degradation step 3), or None.
    small_tier: budget.SmallTier | None = None


@dataclass(frozen=True)
class AnswerFinal:
    """The end of an Answer stream."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    timings: list[HopTime]
    degradations: list[str]
    sources_used: int
    cache_hit: bool = False
    guardrails: tuple[Finding, ...] = ()


@dataclass(frozen=True)
class CachedAnswer:
    """What the semantic cache replays: the sources, the deltas' texts, the final."""

    sources: list[Source]
    deltas: tuple[str, ...]
    final: AnswerFinal

    @property
    def size(self) -> int:
        """Approximate bytes held."""
        return 512 + sum(len(s.text) + len(s.id) + 64 for s in self.sources) + sum(
            len(d) for d in self.deltas
        )


def retrieve_spec(
    query: str, collection: str, search_top_k: int, top_n: int, skip_rerank: bool,
    mode: str, filter: Any,
) -> RetrieveSpec:
    """Validate and default a Retrieve request (0 means "the default")."""
    if not query.strip():
        raise InvalidArgument("query is empty", reason="EMPTY_INPUT")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidArgument(
            f"query exceeds {MAX_QUERY_CHARS} characters", reason="INPUT_TOO_LARGE",
            metadata={"limit": MAX_QUERY_CHARS},
        )
    if not collection:
        raise InvalidArgument("collection is empty", reason="EMPTY_INPUT")
    k = search_top_k or DEFAULT_SEARCH_TOP_K
    if not 1 <= k <= MAX_SEARCH_TOP_K:
        raise InvalidArgument(
            f"search_top_k must be 1-{MAX_SEARCH_TOP_K}", reason="INVALID_TOP_K",
            metadata={"limit": MAX_SEARCH_TOP_K},
        )
    n = top_n or min(DEFAULT_TOP_N, k)
    if not 1 <= n <= k:
        raise InvalidArgument(
            "top_n must be 1-search_top_k", reason="INVALID_TOP_K", metadata={"limit": k}
        )
    if mode not in (DENSE, KEYWORD, HYBRID):
        raise InvalidArgument(f"unknown mode {mode!r}", metadata={"field": "mode"})
    return RetrieveSpec(query, collection, k, n, skip_rerank, mode, filter)


class Pipeline:
    """Retrieve and Answer over the four hops, within each request's deadline."""

    def __init__(
        self, upstream: Upstream, latency: budget.LatencyModel | None = None,
        default_system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        cache: SemanticCache | None = None, guardrails: GuardrailSettings | None = None,
        log_text: bool = False,
        small_tier: budget.SmallTier | None = None,
    ) -> None:
        self.upstream = upstream
        self.guardrails = guardrails
        self.log_text = log_text
        #: Where ``auto`` falls back to when its generation does not fit the deadline.
        self.small_tier = small_tier
        #: Context window and template size per counting model, learnt at its first use.
        self._windows: dict[str, ModelWindow] = {}
        self.latency = latency or budget.LatencyModel()
        self.default_system_prompt = default_system_prompt
        self.cache = cache

    async def _model_window(self, counting: str, deadline: float | None) -> ModelWindow:
        """The model's window, and whether its tokenizer keeps ``token_bound`` (checked on
        ``CALIBRATION``): then a prompt whose bound fits is not counted."""
        probe = await self.upstream.count_tokens(counting, (("user", "x"),), deadline=deadline)
        per_message = probe.tokens + TEMPLATE_SLACK_TOKENS
        calibration = (("system", CALIBRATION), ("user", CALIBRATION))
        checked = await self.upstream.count_tokens(counting, calibration, deadline=deadline)
        bound = token_bound(calibration, per_message)
        if checked.tokens > bound:
            log.warning("the tokenizer of model %r counts %d tokens where the byte bound is "
                        "%d: every prompt is counted", counting or "(default)",
                        checked.tokens, bound)
            return ModelWindow(probe.max_context_tokens, None)
        return ModelWindow(probe.max_context_tokens, per_message)

    async def _embed(self, query: str, deadline: float | None) -> Embedded:
        t0 = time.perf_counter()
        embedded = await self.upstream.embed([query], deadline=deadline)
        self.latency.observe("embed", time.perf_counter() - t0)
        return embedded

    async def retrieve(
        self, spec: RetrieveSpec, deadline: float | None, *, answering: bool = False,
        embedded: Embedded | None = None, model: str = "",
    ) -> Retrieved:
        """Embed (unless ``embedded`` is given), search, rerank (see the module doc);
        ``answering``: the plan leaves time to generate with ``model``."""
        began = time.perf_counter()
        plan = budget.make_plan(
            self.latency, remaining_s(deadline), rerank=not spec.skip_rerank,
            search_top_k=spec.search_top_k, top_n=spec.top_n, generate=answering,
            embed=spec.mode == DENSE and embedded is None,
            generate_model=model, small_tier=self.small_tier,
        )
        timings: list[HopTime] = []
        vector = None
        if spec.mode == DENSE:
            if embedded is None:
                embedded = await self._embed(spec.query, deadline)
            vector = embedded.vectors[0]
            timings.append(embedded.timing)
        call = SearchCall(
            spec.collection, plan.search_top_k, spec.mode,
            text="" if vector is not None else spec.query, vector=vector, filter=spec.filter,
        )
        t0 = time.perf_counter()
        searched = await self.upstream.search(call, deadline=deadline)
        self.latency.observe("search", time.perf_counter() - t0)
        timings.extend(searched.timings)
        hits = searched.hits
        rerank = plan.rerank and len(hits) > 0
        if rerank and not budget.fits(self.latency, "rerank", remaining_s(deadline), len(hits)):
            rerank = False  # never start a hop that cannot finish
            plan.degradations.append("rerank_skipped: deadline")
        if rerank:
            t0 = time.perf_counter()
            ranked = await self.upstream.rerank(
                spec.query, [h.text for h in hits], spec.top_n, deadline=deadline
            )
            self.latency.observe("rerank", time.perf_counter() - t0, len(hits))
            timings.append(ranked.timing)
            sources = [
                Source(hits[r.index].id, hits[r.index].text, hits[r.index].score, r.score,
                       hits[r.index].metadata)
                for r in ranked.results
            ]
        else:
            sources = [Source(h.id, h.text, h.score, 0.0, h.metadata) for h in hits[: spec.top_n]]
        timings.append(HopTime("pipeline", total_s=time.perf_counter() - began))
        return Retrieved(sources, timings, plan.degradations, plan.small_tier)

    async def answer(
        self, spec: AnswerSpec, deadline: float | None
    ) -> AsyncIterator[list[Source] | Delta | AnswerFinal]:
        """The Answer stream: the sources, deltas, one ``AnswerFinal``."""
        began = time.perf_counter()
        r = spec.retrieve
        # Guardrails first: a blocked question costs nothing; a redacted one is what is
        # retrieved for, cached under and put in the prompt.
        screen = None
        if self.guardrails is not None:
            screen = Screen(self.guardrails.with_overrides(dict(spec.guardrails)), self.log_text)
            r = replace(r, query=screen.question(r.query))
        system_prompt = spec.system_prompt or self.default_system_prompt
        cache = self.cache if self.cache is not None and self.cache.settings.enabled else None
        partition = embedded = None
        if cache is not None and spec.cacheable:
            version = await self.upstream.collection_version(r.collection, deadline=deadline)
            partition = partition_key(
                r.collection, version, spec.filter_key, r.mode, r.search_top_k, r.top_n,
                r.skip_rerank, spec.model, system_prompt, spec.sampling_key, spec.history,
            )
            hit = cache.lookup_exact(partition, r.query)
            if hit is None and r.mode == DENSE:
                embedded = await self._embed(r.query, deadline)
                hit = cache.lookup_semantic(partition, r.query, embedded.vectors[0])
            elif hit is None:
                cache.stats.misses += 1  # no semantic lookup without the query's embedding
            if hit is not None:
                timings = [embedded.timing] if embedded is not None else []
                timings.append(HopTime("pipeline", total_s=time.perf_counter() - began))
                async for event in _replay(hit.value, timings):
                    yield event
                return
        retrieved = await self.retrieve(
            r, deadline, answering=True, embedded=embedded, model=spec.model
        )
        if screen is not None:  # a passage carrying instructions never reaches the prompt
            retrieved.sources = screen.passages(retrieved.sources)
        timings = [t for t in retrieved.timings if t.hop != "pipeline"]
        degradations = list(retrieved.degradations)
        model, cap = spec.model, 0
        if retrieved.small_tier is not None:  # budget step 3: auto's cheapest tier
            model, cap = retrieved.small_tier.model, retrieved.small_tier.max_tokens_cap
        # Under "auto" the prompt is counted with the default model's tokenizer (the
        # generation hop picks the model later); a named model counts with its own.
        counting = "" if model == "auto" else model

        async def count(messages) -> int:
            out = await self.upstream.count_tokens(counting, messages, deadline=deadline)
            return out.tokens

        known = self._windows.get(counting)
        sources_sent = known is None
        if known is None:  # a model's window and tokenizer do not change: asked once
            yield retrieved.sources  # not held up by the round trips that learn it
            known = self._windows[counting] = await self._model_window(counting, deadline)
        reserve = spec.max_tokens or DEFAULT_ANSWER_TOKENS
        window = max(0, known.context_tokens - reserve)
        packed = await pack(
            count, system_prompt=system_prompt,
            sources=[s.text for s in retrieved.sources], history=spec.history,
            question=r.query, window=window, per_message=known.per_message,
        )
        dropped = len(retrieved.sources) - packed.sources_used
        if packed.truncated:
            degradations.append(f"sources_truncated: {','.join(map(str, packed.truncated))}")
        if dropped:
            degradations.append(f"sources_dropped: {dropped}")
        t0 = time.perf_counter()
        final: Finished | None = None
        texts: list[str] = []
        stream = self.upstream.generate(
            GenerateCall(model, packed.messages, spec.sampling, max_tokens_cap=cap),
            deadline=deadline,
        )
        # Once the window is known, the request starts before the sources go out: their
        # write overlaps the engine's prefill instead of delaying the first token.
        head = asyncio.ensure_future(_next_event(stream))
        # Redacted deltas carry text only (their token ids no longer match it).
        redactor = screen.answer_stream() if screen is not None else None
        try:
            if not sources_sent:
                await asyncio.sleep(0)  # its synchronous start (tokenising, submitting) first
                yield retrieved.sources
            event = await head
            while event is not None:
                if isinstance(event, Delta):
                    if redactor is not None:
                        event = Delta(redactor.feed(event.text))
                    if event.text or redactor is None:  # all held back: nothing to send
                        texts.append(event.text)
                        yield event
                else:  # the last event: the held-back tail goes now, before the close
                    final = event
                    tail = _flush(redactor)
                    redactor = None
                    if tail:
                        texts.append(tail)
                        yield Delta(tail)
                event = await _next_event(stream)
        finally:
            await _settle(head)
            await stream.aclose()
        tail = _flush(redactor)  # a stream that ended without its final event
        if tail:
            texts.append(tail)
            yield Delta(tail)
        elapsed = time.perf_counter() - t0
        self.latency.observe("generate", elapsed)
        self.latency.observe(budget.generate_key(model), elapsed)
        assert final is not None, "a generation stream ends with a final event"
        timings.append(final.timing)
        timings.append(HopTime("pipeline", total_s=time.perf_counter() - began))
        done = AnswerFinal(
            final.finish_reason, final.prompt_tokens, final.completion_tokens, final.model,
            timings, degradations, packed.sources_used,
            guardrails=tuple(screen.findings) if screen is not None else (),
        )
        # Only complete answers of the full plan are kept (a degraded one is not what the
        # same question would get with time to spare).
        # Nor answers the guardrails touched (a replay would not report their findings).
        touched = screen is not None and bool(screen.findings)
        if (partition is not None and final.finish_reason in ("stop", "length")
                and not degradations and not touched):
            value = CachedAnswer(retrieved.sources, tuple(texts), done)
            cache.store(
                partition, r.query, embedded.vectors[0] if embedded is not None else None,
                value, value.size,
            )
        yield done


async def _next_event(stream: AsyncIterator[Any]) -> Any:
    """The stream's next event; None at its end."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _settle(task: asyncio.Future) -> None:
    """Cancel ``task`` unless done and wait for it, its outcome consumed (the caller left,
    or failed, before it was awaited); a cancellation of the caller itself propagates."""
    if task.done():
        if not task.cancelled():
            task.exception()
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:  # noqa: BLE001 - its error has no one left to reach
        log.debug("generation start failed after the answer ended", exc_info=True)


def _flush(redactor: Any) -> str:
    """The text an answer redactor still holds, its findings reported ("" for None)."""
    if redactor is None:
        return ""
    tail = redactor.flush()
    redactor.report()
    return tail


async def _replay(
    cached: CachedAnswer, timings: list[HopTime]
) -> AsyncIterator[list[Source] | Delta | AnswerFinal]:
    """A cached answer as a stream: its sources, its deltas, a final saying it is a hit
    (usage is the original generation's; timings are this request's)."""
    yield cached.sources
    for text in cached.deltas:
        yield Delta(text)
    f = cached.final
    yield AnswerFinal(
        f.finish_reason, f.prompt_tokens, f.completion_tokens, f.model, timings, [],
        f.sources_used, cache_hit=True,
    )

