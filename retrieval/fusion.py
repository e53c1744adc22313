"""Reciprocal Rank Fusion of several rankings."""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Hashable]], k: int, top: int
) -> list[tuple[Hashable, float]]:
    """Fuse best-first rankings: score(item) = sum over rankings of 1 / (k + rank).

    Ranks start at 1. Ties break by the best single rank, then by first appearance, so
    the result is deterministic. Returns the ``top`` best ``(item, score)`` pairs.
    """
    scores: dict[Hashable, float] = {}
    best_rank: dict[Hashable, int] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            best_rank[item] = min(best_rank.get(item, rank), rank)
    order = {item: i for i, item in enumerate(scores)}
    fused = sorted(scores.items(), key=lambda kv: (-kv[1], best_rank[kv[0]], order[kv[0]]))
    return fused[:top]
