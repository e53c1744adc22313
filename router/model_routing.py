"""Which tier (and so which served model) answers a ``model="auto"`` request, and why.

A **tier** names a served model, its relative cost, optionally the score range
``[min, max)`` it takes (the last range is closed at 1.0) and optionally the task types
it takes ("code"), plus per-tier caps: ``max_tokens_cap`` (completion tokens at most;
0: the model's own) and ``max_running`` (requests of this tier at once before it counts
as saturated; 0: only the model's running slots count).

The decision (:meth:`ModelRouter.choose`), in order:

1. **task rule**: a task type (the request's hint, else the one the scorer detected)
   that a tier lists picks that tier; load does not move it;
2. **score**: the tier whose range holds the score;
3. **spill**: when that tier is saturated (see :class:`TierLoad`) and the score lies
   within ``spill_margin`` of the next cheaper tier's range, and that tier is not
   saturated, the request goes down there (``spilled``). Otherwise it stays and queues
   in its model's admission, which refuses by the deadline rule.

The load view is the caller's (the generation hop's own running/waiting counts per
model and this router's in-flight count per tier): with several generation replicas
each decides on its own load.

No grpc, no server imports: pure policy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from router.complexity import Score

TIER_KEYS = frozenset(
    {"name", "model", "cost", "scores", "tasks", "max_tokens_cap", "max_running"}
)


@dataclass(frozen=True)
class Tier:
    """One routing tier (see the module docstring)."""

    name: str
    # A served model name; "" means the process's default model.
    model: str = ""
    cost: float = 1.0
    # [min, max) of the complexity score; None: the tier takes tasks only.
    scores: tuple[float, float] | None = None
    tasks: tuple[str, ...] = ()
    max_tokens_cap: int = 0
    max_running: int = 0

    def takes(self, score: float) -> bool:
        """True when ``score`` lies in this tier's range (1.0 falls in the top range)."""
        if self.scores is None:
            return False
        low, high = self.scores
        return low <= score < high or (high >= 1.0 and score >= 1.0)


def _tier(values: Mapping[str, object], index: int) -> Tier:
    if not isinstance(values, Mapping):
        raise ValueError(f"routing.tiers[{index}] must be a table")
    unknown = set(values) - TIER_KEYS
    if unknown:
        raise ValueError(f"routing.tiers[{index}]: unknown keys {sorted(unknown)}")
    name = str(values.get("name", "")).strip()
    if not name:
        raise ValueError(f"routing.tiers[{index}] needs a name")
    scores = values.get("scores")
    if scores is not None:
        if not isinstance(scores, Sequence) or isinstance(scores, str) or len(scores) != 2:
            raise ValueError(f"routing tier {name!r}: scores must be [min, max]")
        low, high = float(scores[0]), float(scores[1])
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"routing tier {name!r}: scores [{low}, {high}) not within [0, 1]")
        scores = (low, high)
    tasks = values.get("tasks", ())
    if isinstance(tasks, str):
        tasks = [tasks]
    tier = Tier(
        name=name,
        model=str(values.get("model", "")),
        cost=float(values.get("cost", 1.0)),
        scores=scores,
        tasks=tuple(str(t).strip().lower() for t in tasks),
        max_tokens_cap=int(values.get("max_tokens_cap", 0)),
        max_running=int(values.get("max_running", 0)),
    )
    if tier.cost <= 0:
        raise ValueError(f"routing tier {name!r}: cost must be > 0")
    if tier.scores is None and not tier.tasks:
        raise ValueError(f"routing tier {name!r}: give scores, tasks or both")
    if tier.max_tokens_cap < 0 or tier.max_running < 0:
        raise ValueError(f"routing tier {name!r}: caps must be >= 0")
    return tier


def tiers_from(value: object) -> tuple[Tier, ...]:
    """Parse tiers from a list of tables (TOML) or a JSON string (env / ``--set``).

    The score ranges must tile [0, 1] without gaps or overlaps; names are unique.
    ValueError says what is wrong. An empty value gives no tiers (routing off).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise ValueError(f"routing.tiers is not JSON: {exc}") from exc
    if not isinstance(value, Sequence):
        raise ValueError("routing.tiers must be a list of tables")
    tiers = tuple(_tier(v, i) for i, v in enumerate(value))
    if not tiers:
        return ()
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate routing tier names: {names}")
    ranged = sorted((t for t in tiers if t.scores), key=lambda t: t.scores[0])
    if not ranged:
        raise ValueError("routing.tiers: at least one tier needs a score range")
    edge = 0.0
    for tier in ranged:
        if abs(tier.scores[0] - edge) > 1e-9:
            raise ValueError(
                f"routing tier {tier.name!r} starts at {tier.scores[0]}, the ranges must "
                f"tile [0, 1] (expected {edge})"
            )
        edge = tier.scores[1]
    if abs(edge - 1.0) > 1e-9:
        raise ValueError(f"routing.tiers: the score ranges end at {edge}, not 1.0")
    return tiers


@dataclass(frozen=True)
class TierLoad:
    """What the caller knows about a tier's load when a request arrives."""

    # Requests this router has in flight on the tier.
    tier_in_flight: int
    # The tier's model: requests admitted, and how many it runs at once.
    model_in_flight: int
    model_max_running: int
    max_running: int = 0

    @property
    def saturated(self) -> bool:
        """True when a new request would wait: the tier's own budget or its model's
        running slots are used up."""
        if self.max_running and self.tier_in_flight >= self.max_running:
            return True
        return self.model_in_flight >= self.model_max_running

    def describe(self) -> str:
        """Short text for ``reason``."""
        if self.max_running and self.tier_in_flight >= self.max_running:
            return f"tier running {self.tier_in_flight}/{self.max_running}"
        return f"model running {self.model_in_flight}/{self.model_max_running}"


@dataclass(frozen=True)
class RouteDecision:
    """The tier chosen for one request and the explanation sent as ``backbone-route``."""

    tier: Tier
    score: Score
    task: str | None
    spilled: bool
    reason: str

    def to_json(self, model: str, top: int = 3) -> str:
        """The ``backbone-route`` trailing metadata value (compact JSON)."""
        return json.dumps(
            {
                "tier": self.tier.name,
                "model": model,
                "score": round(self.score.score, 4),
                "learned": self.score.learned,
                "task": self.task,
                "features": [{"name": n, "contribution": c} for n, c in self.score.top(top)],
                "spilled": self.spilled,
                "reason": self.reason,
            },
            separators=(",", ":"),
        )


class ModelRouter:
    """Chooses tiers and counts this process's requests in flight per tier."""

    def __init__(self, tiers: Sequence[Tier], spill_margin: float = 0.1) -> None:
        if not tiers:
            raise ValueError("no routing tiers")
        self.tiers = tuple(tiers)
        self.by_name = {t.name: t for t in self.tiers}
        self.spill_margin = spill_margin
        # Score tiers, cheapest range first (tiers_from checked that they tile [0, 1]).
        self.ranged = sorted((t for t in self.tiers if t.scores), key=lambda t: t.scores[0])
        self.in_flight: dict[str, int] = {t.name: 0 for t in self.tiers}

    @property
    def boundaries(self) -> tuple[float, ...]:
        """Inner edges between score ranges (where a small score change moves tiers)."""
        return tuple(t.scores[0] for t in self.ranged[1:])

    @property
    def expensive(self) -> Tier:
        """The costliest tier."""
        return max(self.tiers, key=lambda t: t.cost)

    def task_tier(self, task: str | None) -> Tier | None:
        """The cheapest tier listing ``task``, or None."""
        if not task:
            return None
        takers = [t for t in self.tiers if task in t.tasks]
        return min(takers, key=lambda t: t.cost) if takers else None

    def score_tier(self, score: float) -> Tier:
        """The tier whose range holds ``score`` (clamped to [0, 1])."""
        score = min(1.0, max(0.0, score))
        return next((t for t in self.ranged if t.takes(score)), self.ranged[-1])

    def choose(
        self, score: Score, task: str | None, load: Callable[[Tier], TierLoad]
    ) -> RouteDecision:
        """The decision for one request; ``load`` reports a tier's current load."""
        by_task = self.task_tier(task)
        if by_task is not None:
            return RouteDecision(by_task, score, task, False, f"task {task!r} rule")
        tier = self.score_tier(score.score)
        where = f"score {score.score:.3f} in [{tier.scores[0]:g}, {tier.scores[1]:g})"
        current = load(tier)
        if not current.saturated:
            return RouteDecision(tier, score, task, False, where)
        index = self.ranged.index(tier)
        if index == 0:
            return RouteDecision(
                tier, score, task, False, f"{where}; saturated ({current.describe()}), queued"
            )
        lower = self.ranged[index - 1]
        distance = score.score - tier.scores[0]
        if distance >= self.spill_margin:
            return RouteDecision(
                tier, score, task, False,
                f"{where}; saturated ({current.describe()}), not within "
                f"{self.spill_margin:g} of {lower.name!r}: queued",
            )
        lower_load = load(lower)
        if lower_load.saturated:
            return RouteDecision(
                tier, score, task, False,
                f"{where}; saturated ({current.describe()}), {lower.name!r} saturated "
                f"too: queued",
            )
        return RouteDecision(
            lower, score, task, True,
            f"{where}; {tier.name!r} saturated ({current.describe()}), score within "
            f"{self.spill_margin:g} of {lower.name!r}: spilled",
        )

    def acquire(self, tier: Tier) -> None:
        """Count a request in flight on ``tier``."""
        self.in_flight[tier.name] += 1

    def release(self, tier: Tier) -> None:
        """Uncount a request of ``tier``."""
        assert self.in_flight[tier.name] > 0, "release without acquire"
        self.in_flight[tier.name] -= 1
