"""The deadline budget of one pipeline request: measured hop latencies, a plan that fits.

Each hop's latency is tracked as an EWMA of what the pipeline measured around its calls
(rerank per candidate document, the others per call), starting from priors. A request's
plan is the full one (embed, search ``search_top_k`` candidates, rerank, generate) when
the estimates fit in what is left of its deadline; otherwise it degrades, in this
documented order, each step recorded:

1. ``rerank_skipped: deadline`` — sources in search order;
2. ``candidates_reduced: <n>`` — search takes only ``top_n`` candidates;
3. ``smaller_tier: <tier>`` — under ``model="auto"``, when the answer's generation (what
   ``auto`` measured) does not fit even without rerank, the cheapest ranged tier of
   ``[routing.tiers]`` generates instead (its model, its ``max_tokens_cap``), if its
   measured estimate fits;

and when even the minimum plan (embed + search, plus the cheapest generation for Answer)
does not fit, the request is refused at once with DEADLINE_TOO_SHORT, before any hop
runs. The pipeline re-checks before every hop (``fits``): a hop whose estimate exceeds
what is left is not started. Generation is measured per model asked for
(``generate:<model>``, ``generate:auto``), falling back to all generations (``generate``).

No grpc imports; the clock is injectable for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.errors import DeadlineTooShort

#: Priors in seconds, used until a hop has been measured: embed and search per call,
#: rerank per candidate document, generate per call (to the end of a short answer).
PRIORS = {"embed": 0.02, "search": 0.01, "rerank": 0.02, "generate": 1.0}
#: Weight of the newest measurement in the EWMA.
ALPHA = 0.2
#: Kept back for the pipeline's own work (prompt packing, the answer's way back), seconds.
SLACK_S = 0.005


class LatencyModel:
    """EWMA latency per hop (seconds per call; rerank: per candidate)."""

    def __init__(self, priors: dict[str, float] | None = None, alpha: float = ALPHA) -> None:
        self._ewma: dict[str, float] = dict(PRIORS if priors is None else priors)
        self._alpha = alpha

    def observe(self, hop: str, seconds: float, items: int = 1) -> None:
        """Record one call of ``hop`` that took ``seconds`` for ``items`` items."""
        per = seconds / max(1, items) if hop == "rerank" else seconds
        old = self._ewma.get(hop)
        self._ewma[hop] = per if old is None else (1 - self._alpha) * old + self._alpha * per

    def estimate(self, hop: str, items: int = 1, fallback: str | None = None) -> float:
        """Expected seconds of one call of ``hop`` (for ``items`` candidates when rerank);
        unmeasured, ``fallback``'s estimate (else 0)."""
        per = self._ewma.get(hop)
        if per is None:
            per = self._ewma.get(fallback, 0.0) if fallback else 0.0
        return per * items if hop == "rerank" else per


def generate_key(model: str) -> str:
    """The latency model's key of generations that asked for ``model``."""
    return f"generate:{model}"


@dataclass(frozen=True)
class SmallTier:
    """The cheapest tier ``auto`` can fall back to: its name, model ("" = the default
    model) and output cap (0: none)."""

    name: str
    model: str
    max_tokens_cap: int = 0


@dataclass
class Plan:
    """What a request will do, and what was given up to fit its deadline."""

    rerank: bool
    search_top_k: int
    degradations: list[str] = field(default_factory=list)
    #: The tier generation falls back to (step 3), or None: the model asked for.
    small_tier: SmallTier | None = None


def make_plan(
    model: LatencyModel,
    remaining_s: float | None,
    *,
    rerank: bool,
    search_top_k: int,
    top_n: int,
    generate: bool,
    embed: bool = True,
    generate_model: str = "",
    small_tier: SmallTier | None = None,
) -> Plan:
    """The fullest plan whose estimated time fits ``remaining_s`` (None: no deadline).
    ``generate_model``: the model the Answer asks for; ``small_tier``: step 3's tier
    (used only when that model is "auto")."""
    plan = Plan(rerank=rerank, search_top_k=search_top_k)
    if remaining_s is None:
        return plan
    budget = remaining_s - SLACK_S
    base = (model.estimate("embed") if embed else 0.0) + model.estimate("search")
    full = smallest = base
    if generate:
        full += model.estimate(generate_key(generate_model), fallback="generate")
        smallest = full
        if small_tier is not None and generate_model == "auto":
            smallest = base + model.estimate(generate_key(small_tier.model), fallback="generate")
    if min(full, smallest) > budget:
        needed = min(full, smallest)
        raise DeadlineTooShort(
            f"the deadline leaves {max(0.0, remaining_s) * 1000:.0f} ms; the minimum plan "
            f"needs about {needed * 1000:.0f} ms",
            metadata={"needed_ms": round(needed * 1000)},
        )
    if full > budget:
        # Only the smaller tier fits: take every step before it too.
        if plan.rerank:
            plan.rerank = False
            plan.degradations.append("rerank_skipped: deadline")
        if search_top_k > top_n:
            plan.search_top_k = top_n
            plan.degradations.append(f"candidates_reduced: {top_n}")
        plan.small_tier = small_tier
        plan.degradations.append(f"smaller_tier: {small_tier.name}")
        return plan
    base = full
    if plan.rerank and base + model.estimate("rerank", search_top_k) > budget:
        plan.rerank = False
        plan.degradations.append("rerank_skipped: deadline")
    if not plan.rerank and search_top_k > top_n and base > budget * 0.8:
        # Close to the edge: take only what will be returned.
        plan.search_top_k = top_n
        plan.degradations.append(f"candidates_reduced: {top_n}")
    return plan


def fits(model: LatencyModel, hop: str, remaining_s: float | None, items: int = 1) -> bool:
    """True when ``hop`` is expected to finish in ``remaining_s`` (None: no deadline)."""
    return remaining_s is None or model.estimate(hop, items) <= remaining_s - SLACK_S
