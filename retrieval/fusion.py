"""Fusion of a dense and a keyword ranking into one hybrid ranking.

Three methods (``Fusion``):

* ``RRF``: weighted Reciprocal Rank Fusion, score = 2 alpha / (k + rank_dense)
  + 2 (1 - alpha) / (k + rank_keyword), ranks from 1, a ranking that misses an item adds
  0 (alpha = 0.5 is the classic unweighted RRF, scores included);
* ``CONVEX_MINMAX``: alpha * dense' + (1 - alpha) * keyword', where x' is the score
  min-max normalised to [0, 1] over that ranking's candidates;
* ``CONVEX_ZSCORE``: the same with z-scores ((x - mean) / std over the candidates).

In the convex methods an item missing from one ranking's candidates scores no better
than that ranking's worst candidate there (min-max: 0; z-score: the lowest z-score; see
:func:`normalize`). alpha is the dense weight in [0, 1]; the keyword weight is 1 - alpha, for RRF too.
Bruch, Gai, Ingber (2022), "An Analysis of Fusion Functions for Hybrid Retrieval", find
the convex combination better and more robust than RRF; ``perf/quality_bench.py`` sweeps
alpha on the MS MARCO subset (the default is chosen there, see ``DEFAULT_DENSE_WEIGHT``).
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.errors import InvalidArgument


class Fusion(enum.Enum):
    """How a hybrid search fuses its dense and keyword rankings."""

    RRF = "rrf"
    CONVEX_MINMAX = "convex_minmax"
    CONVEX_ZSCORE = "convex_zscore"


DEFAULT_FUSION = Fusion.CONVEX_MINMAX
# Dense weight of the convex methods. MS MARCO subset (perf/quality_bench.py, min-max):
# nDCG@10 is at or above dense for every alpha in [0.55, 0.85] (0.7996-0.8032, dense
# 0.7977), argmax 0.75 on 43 judged queries. 0.8 stays on that plateau but leans towards
# dense: where BM25 is much weaker than dense (sets where RRF loses to dense), a smaller
# keyword share bounds the loss; costs 0.002 against the noisy argmax here.
DEFAULT_DENSE_WEIGHT = 0.8
# RRF weights the rankings equally unless asked otherwise (the classic RRF).
DEFAULT_RRF_DENSE_WEIGHT = 0.5
DEFAULT_RRF_K = 60


@dataclass(frozen=True)
class FusionDefaults:
    """What a hybrid search uses when the request leaves a fusion setting unset."""

    method: Fusion = DEFAULT_FUSION
    dense_weight: float = DEFAULT_DENSE_WEIGHT
    rrf_dense_weight: float = DEFAULT_RRF_DENSE_WEIGHT
    rrf_k: int = DEFAULT_RRF_K

    def weight_for(self, method: Fusion) -> float:
        """The default dense weight of ``method``."""
        return self.rrf_dense_weight if method is Fusion.RRF else self.dense_weight


def check_weight(weight: float, field: str = "dense_weight") -> float:
    """A dense weight must be a number in [0, 1]."""
    if not 0.0 <= weight <= 1.0:  # also rejects NaN
        raise InvalidArgument(f"{field} must be in [0, 1]", metadata={"field": field})
    return float(weight)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Hashable]], k: int, top: int,
    weights: Sequence[float] | None = None,
) -> list[tuple[Hashable, float]]:
    """Fuse best-first rankings: score(item) = sum over rankings of w / (k + rank).

    Ranks start at 1; ``weights`` default to 1 each. Ties break by the best single rank,
    then by first appearance, so the result is deterministic. Returns the ``top`` best
    ``(item, score)`` pairs.
    """
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    scores: dict[Hashable, float] = {}
    best_rank: dict[Hashable, int] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
            best_rank[item] = min(best_rank.get(item, rank), rank)
    order = {item: i for i, item in enumerate(scores)}
    fused = sorted(scores.items(), key=lambda kv: (-kv[1], best_rank[kv[0]], order[kv[0]]))
    return fused[:top]


def normalize(scores: np.ndarray, method: Fusion) -> tuple[np.ndarray, float]:
    """Normalised scores and the value for an item the ranking did not return.

    Min-max: scores to [0, 1] (all equal: 1), missing 0. Z-score: (x - mean) / std (all
    equal: 0), missing the lowest z-score (all equal: -1). Missing is never above a
    candidate, so a ranking cannot promote what it did not rank.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores, 0.0
    if method is Fusion.CONVEX_MINMAX:
        low, span = scores.min(), scores.max() - scores.min()
        return ((scores - low) / span if span > 0 else np.ones_like(scores)), 0.0
    std = scores.std()
    if std > 0:
        z = (scores - scores.mean()) / std
        return z, float(z.min())
    return np.zeros_like(scores), -1.0


def convex_fusion(
    dense: tuple[np.ndarray, np.ndarray], keyword: tuple[np.ndarray, np.ndarray],
    alpha: float, method: Fusion, top: int,
) -> tuple[np.ndarray, np.ndarray]:
    """alpha * normalised dense + (1 - alpha) * normalised keyword, best ``top`` first.

    Each argument is ``(items, scores)`` with higher scores better (negate distances
    first). Items are int64 ids (rows); ties break by the lower item.
    """
    items = np.union1d(dense[0], keyword[0]).astype(np.int64)
    fused = np.zeros(items.shape[0], dtype=np.float64)
    for (ids, raw), weight in ((dense, alpha), (keyword, 1.0 - alpha)):
        if ids.size == 0 or weight == 0.0:
            continue
        norm, missing = normalize(raw, method)
        column = np.full(items.shape[0], missing)
        column[np.searchsorted(items, ids)] = norm
        fused += weight * column
    order = np.lexsort((items, -fused))[:top]
    return items[order], fused[order].astype(np.float32)


def fuse(
    dense: tuple[np.ndarray, np.ndarray], keyword: tuple[np.ndarray, np.ndarray],
    method: Fusion, dense_weight: float, rrf_k: int, top: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The hybrid ranking of two best-first ``(rows, scores)`` rankings (higher better)."""
    if method is Fusion.RRF:
        fused = reciprocal_rank_fusion(
            [dense[0].tolist(), keyword[0].tolist()], k=rrf_k, top=top,
            # Doubled so that equal weights (0.5) give the classic unweighted RRF scores.
            weights=[2.0 * dense_weight, 2.0 * (1.0 - dense_weight)],
        )
        rows = np.asarray([row for row, _ in fused], dtype=np.int64)
        return rows, np.asarray([score for _, score in fused], dtype=np.float32)
    return convex_fusion(dense, keyword, dense_weight, method, top)
