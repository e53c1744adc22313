"""BM25 keyword search over payload texts, on ``bm25s``.

bm25s builds a static index, so the collection rebuilds it lazily: a keyword search after
writes first re-indexes the live rows (invariant: ``KeywordIndex.version`` equals the
collection's write version it was built from; rows are the live rows at that version).
Tokenisation is bm25s's (lower-case, English stopwords, no stemmer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

STOPWORDS = "english"


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """bm25s tokens of each text (as strings, so query and corpus share no vocab ids)."""
    import bm25s  # imported on first keyword use: it pulls in scipy and numba (~0.5 s)

    return bm25s.tokenize(
        list(texts), return_ids=False, stopwords=STOPWORDS, show_progress=False
    )


class KeywordIndex:
    """A BM25 index over the texts of a fixed set of rows."""

    def __init__(self, rows: np.ndarray, texts: Sequence[str], version: int) -> None:
        """Index ``texts`` (one per entry of ``rows``) as of write ``version``."""
        self.rows = np.asarray(rows, dtype=np.int64)
        self.version = version
        self._bm25: Any = None
        if len(texts):
            import bm25s

            self._bm25 = bm25s.BM25()
            self._bm25.index(tokenize(texts), show_progress=False)

    def search(
        self, queries: Sequence[str], k: int, mask: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, ``(rows, scores)`` of up to k best rows with a positive BM25 score.

        ``mask`` is over collection rows; only rows where it is true are returned.
        """
        empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
        if self._bm25 is None or k <= 0:
            return [empty for _ in queries]
        weight = None
        if mask is not None:
            weight = mask[self.rows].astype(np.float32)
        k = min(k, self.rows.shape[0])
        docs, scores = self._bm25.retrieve(
            tokenize(queries), k=k, show_progress=False, n_threads=1, weight_mask=weight
        )
        out = []
        for doc_row, score_row in zip(docs, scores, strict=True):
            keep = score_row > 0
            out.append((self.rows[doc_row[keep]], score_row[keep].astype(np.float32)))
        return out
