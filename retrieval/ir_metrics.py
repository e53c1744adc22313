"""Retrieval metrics over graded relevance judgements (as pytrec_eval/BEIR compute them).

Shared by the quality test (tests/search/test_msmarco_quality.py) and perf/quality_bench.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """nDCG@k with linear gains (the grade) and log2(rank + 1) discounts."""
    dcg = sum(qrels.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranking[:k]))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents (grade > 0) found in the first k."""
    relevant = {doc for doc, g in qrels.items() if g > 0}
    return len(relevant & set(ranking[:k])) / len(relevant) if relevant else 0.0


def doc_ranking(chunk_ids: Sequence[str]) -> list[str]:
    """Document ids of a ranking of chunk ids ("<doc>#<n>"), each at its best rank."""
    return list(dict.fromkeys(cid.rsplit("#", 1)[0] for cid in chunk_ids))
