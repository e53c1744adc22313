"""``model="auto"`` in the generation hop: score the request, choose a tier, cap it.

The policy lives in :mod:`router.complexity` (the score) and :mod:`router.model_routing`
(the tier); this module wires them to the hop's models and neighbours:

- the **text scored** is the last user turn (or the raw prompt); the conversation depth is
  the number of user/assistant turns;
- the **learned part** asks the embedding hop of the same process
  (``HopContext.local["embedding"]``, no network) for the MiniLM vector, only when
  ``routing.learned`` says so (by default only for scores near a tier boundary) and
  within ``routing.embed_timeout_ms``; with no embedding hop in the process (split
  deployment), on a refusal or on timeout, the features decide alone;
- the **load view** is this hop's own: the tier's in-flight count and its model's
  admitted requests against the model's running slots. With several generation replicas
  each decides on its own load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from router.complexity import ComplexityScorer, Score
from router.errors import BackboneError
from router.model_routing import ModelRouter, RouteDecision, Tier, TierLoad, tiers_from
from server.config import ConfigError

if TYPE_CHECKING:
    from server.config import RoutingConfig
    from server.engines.generator import GenerationRequest, ServedModel

log = logging.getLogger(__name__)

#: Characters of the scored text sent to the embedding model (it reads ~256 tokens).
EMBED_CHARS = 2000


def check_tier_models(tiers: Sequence[Tier], served: Sequence[str]) -> None:
    """ConfigError unless every tier names a served model ("" is the default one)."""
    for tier in tiers:
        if tier.model and tier.model not in served:
            raise ConfigError(
                f"routing tier {tier.name!r} names model {tier.model!r}, which this process "
                f"does not serve (served: {', '.join(served)}; add it to "
                f"[[generation.extra_models]] or fix [[routing.tiers]])"
            )


def scored_text(request: GenerationRequest) -> tuple[str, int]:
    """The text to score (the last user turn, else the prompt) and the turn count."""
    if not request.messages:
        return request.prompt, 1
    turns = [m for m in request.messages if m.role != "system"]
    last = next((m.content for m in reversed(turns) if m.role == "user"), "")
    return last or request.messages[-1].content, max(1, len(turns))


class AutoRouter:
    """Routes ``auto`` requests among the tiers of one generation hop."""

    def __init__(
        self,
        config: RoutingConfig,
        models: Mapping[str, ServedModel],
        default: ServedModel,
        embedding: Any | None = None,
    ) -> None:
        tiers = tiers_from(config.tiers)
        check_tier_models(tiers, list(models))
        self.config = config
        self.router = ModelRouter(tiers, config.spill_margin)
        self.models = {t.name: models[t.model] if t.model else default for t in tiers}
        try:
            self.scorer = ComplexityScorer.load(config.weights_file or None)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        use_learned = config.learned != "off" and self.scorer.has_learned
        # The embedding hop's in-process API (EmbeddingHop.embed_texts), or None.
        self.embedding = embedding if use_learned and hasattr(embedding, "embed_texts") else None

    def load(self, tier: Tier) -> TierLoad:
        """The tier's current load (this process's view)."""
        model = self.models[tier.name]
        return TierLoad(
            tier_in_flight=self.router.in_flight[tier.name],
            model_in_flight=model.gate.in_flight,
            model_max_running=model.spec.max_running,
            max_running=tier.max_running,
        )

    def _wants_embedding(self, base: Score) -> bool:
        if self.embedding is None:
            return False
        if self.config.learned == "always":
            return True
        band = self.config.learned_band
        return any(abs(base.score - edge) < band for edge in self.router.boundaries)

    async def score(self, request: GenerationRequest) -> Score:
        """The request's complexity score: features, plus the embedding when wanted."""
        text, turns = scored_text(request)
        base = self.scorer.score_features(text, turns)
        if not self._wants_embedding(base) or not text.strip():
            return base
        try:
            vectors = await asyncio.wait_for(
                self.embedding.embed_texts([text[:EMBED_CHARS]], normalize=True),
                self.config.embed_timeout_ms / 1000,
            )
        except (asyncio.TimeoutError, BackboneError) as exc:
            log.debug("routing: embedding unavailable (%s); features decide", exc)
            return base
        try:
            return self.scorer.score_with_embedding(base, vectors[0])
        except ValueError as exc:  # the embedding hop serves a model of another dimension
            log.debug("routing: embedding does not fit the learned model (%s); features decide", exc)
            return base

    async def decide(self, request: GenerationRequest, task: str = "") -> RouteDecision:
        """Score ``request`` and choose its tier; ``task`` is the caller's hint."""
        score = await self.score(request)
        hint = task.strip().lower() or None
        return self.router.choose(score, hint or score.task, self.load)

    def model_of(self, decision: RouteDecision) -> ServedModel:
        """The served model of the chosen tier."""
        return self.models[decision.tier.name]

    @staticmethod
    def capped(request: GenerationRequest, tier: Tier) -> GenerationRequest:
        """``request`` with an explicit max_tokens lowered to the tier's cap."""
        cap, asked = tier.max_tokens_cap, request.params.max_tokens
        if cap and asked is not None and asked > cap:
            return replace(request, params=replace(request.params, max_tokens=cap))
        return request

    @contextlib.contextmanager
    def holding(self, tier: Tier) -> Iterator[None]:
        """Count one request in flight on ``tier`` while the block runs."""
        self.router.acquire(tier)
        try:
            yield
        finally:
            self.router.release(tier)
