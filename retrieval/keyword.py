"""BM25 keyword search over payload texts, maintained incrementally with every write.

Tokenisation is bm25s's (lower case, words of 2+ word characters, English stopwords
removed) followed by the Snowball English stemmer (PyStemmer) unless the collection turned
stemming off; corpus and queries always go through the same :func:`tokenize`.

The index is an inverted index of term frequencies that the collection updates inside
each write (:meth:`KeywordIndex.sync`): new rows are tokenised and appended, rows the
write killed (replaced or deleted points) leave the statistics. Scores are computed at
query time from the current statistics with bm25s's default "lucene" BM25
(k1 = 1.5, b = 0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5))), so a search right after a
write ranks exactly as a fresh full build of the live rows would.

Invariants: ``n_rows`` rows of the collection's point table are indexed; ``live[r]`` is
true exactly for indexed live rows; ``df``, ``n_docs`` and ``total_len`` count live rows
only; postings may still hold dead rows, which scoring masks out.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

STOPWORDS = "english"
K1 = 1.5
B = 0.75


@lru_cache(maxsize=1)
def _english_stemmer():
    import Stemmer  # PyStemmer: the Snowball stemmers in C

    return Stemmer.Stemmer("english")


def tokenize(texts: Sequence[str], stem: bool = True) -> list[list[str]]:
    """Tokens of each text: bm25s's tokeniser and stopwords, stemmed when ``stem``."""
    import bm25s  # imported on first keyword use: it pulls in scipy and numba (~0.5 s)

    tokens = bm25s.tokenize(
        list(texts), return_ids=False, stopwords=STOPWORDS, show_progress=False,
        stemmer=_english_stemmer() if stem else None,
    )
    return [[t for t in doc if t] for doc in tokens]


class KeywordIndex:
    """An incrementally maintained BM25 index over the rows of a point table."""

    def __init__(self, stem: bool = True) -> None:
        """An empty index; :meth:`sync` brings it up to a table's state."""
        self.stem = stem
        self.n_rows = 0
        self.live = np.zeros(0, dtype=bool)
        self.n_docs = 0
        self.total_len = 0
        self._vocab: dict[str, int] = {}
        self._post_rows: list[array] = []  # per term id: rows (int64)
        self._post_tf: list[array] = []  # per term id: term frequency in that row
        self._df: list[int] = []
        self._doc_len = array("q")
        self._doc_terms: list[np.ndarray] = []  # per row: its distinct term ids

    def sync(self, texts: Sequence[str], table_live: np.ndarray) -> None:
        """Catch up with a table of ``len(table_live)`` rows (``texts`` per row).

        Rows beyond ``n_rows`` are new (appended dead rows are indexed as dead); rows the
        table marks dead but this index still counts leave the statistics.
        """
        n_old, n_new = self.n_rows, int(table_live.shape[0])
        if n_old:
            died = np.flatnonzero(self.live[:n_old] & ~table_live[:n_old])
            for row in died.tolist():
                self._forget(row)
        if n_new > n_old:
            alive = np.asarray(table_live[n_old:n_new], dtype=bool)
            live_rows = [n_old + i for i in np.flatnonzero(alive).tolist()]
            tokens = tokenize([texts[r] for r in live_rows], self.stem) if live_rows else []
            by_row = dict(zip(live_rows, tokens, strict=True))
            live = np.zeros(n_new, dtype=bool)
            live[:n_old] = self.live[:n_old]
            self.live = live
            for row in range(n_old, n_new):
                self._add(row, by_row.get(row))
            self.n_rows = n_new

    def _add(self, row: int, tokens: list[str] | None) -> None:
        if tokens is None:  # a dead row: keep row numbers aligned, index nothing
            self._doc_len.append(0)
            self._doc_terms.append(np.empty(0, dtype=np.int64))
            return
        counts = Counter(tokens)
        ids = []
        for term, tf in counts.items():
            tid = self._vocab.get(term)
            if tid is None:
                tid = self._vocab[term] = len(self._df)
                self._post_rows.append(array("q"))
                self._post_tf.append(array("f"))
                self._df.append(0)
            self._post_rows[tid].append(row)
            self._post_tf[tid].append(float(tf))
            self._df[tid] += 1
            ids.append(tid)
        self._doc_len.append(len(tokens))
        self._doc_terms.append(np.asarray(ids, dtype=np.int64))
        self.live[row] = True
        self.n_docs += 1
        self.total_len += len(tokens)

    def _forget(self, row: int) -> None:
        for tid in self._doc_terms[row].tolist():
            self._df[tid] -= 1
        self.n_docs -= 1
        self.total_len -= self._doc_len[row]
        self.live[row] = False

    def remap(self, old_to_new: np.ndarray, n_rows: int) -> None:
        """Renumber rows after the table's compaction (``-1``: dropped, must be dead)."""
        for tid in range(len(self._df)):
            rows = np.frombuffer(self._post_rows[tid], dtype=np.int64).copy()
            tfs = np.frombuffer(self._post_tf[tid], dtype=np.float32).copy()
            new = old_to_new[rows]
            keep = new >= 0
            self._post_rows[tid] = array("q", new[keep].tobytes())
            self._post_tf[tid] = array("f", tfs[keep].tobytes())
        kept = np.flatnonzero(old_to_new[: self.n_rows] >= 0)
        order = kept[np.argsort(old_to_new[kept], kind="stable")]
        lengths = np.frombuffer(self._doc_len, dtype=np.int64)
        self._doc_len = array("q", lengths[order].tobytes())
        self._doc_terms = [self._doc_terms[r] for r in order.tolist()]
        live = np.zeros(n_rows, dtype=bool)
        live[old_to_new[kept]] = self.live[kept]
        self.live, self.n_rows = live, n_rows

    def search(
        self, queries: Sequence[str], k: int, mask: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, ``(rows, scores)`` of up to k best rows with a positive BM25 score.

        ``mask`` is over table rows; only rows where it is true are returned. Ties break
        by the lower row (earlier write), so results are deterministic.
        """
        empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
        if self.n_docs == 0 or k <= 0:
            return [empty for _ in queries]
        allowed = self.live if mask is None else self.live & mask[: self.n_rows]
        lengths = np.frombuffer(self._doc_len, dtype=np.int64).astype(np.float32)
        norm = K1 * (1.0 - B + B * lengths / (self.total_len / self.n_docs))
        out = []
        for tokens in tokenize(queries, self.stem):
            scores = np.zeros(self.n_rows, dtype=np.float32)
            for term in tokens:  # a repeated query term counts again, as in bm25s
                tid = self._vocab.get(term)
                if tid is None or self._df[tid] <= 0:
                    continue
                df = self._df[tid]
                idf = math.log(1.0 + (self.n_docs - df + 0.5) / (df + 0.5))
                rows = np.frombuffer(self._post_rows[tid], dtype=np.int64)
                tf = np.frombuffer(self._post_tf[tid], dtype=np.float32)
                scores[rows] += idf * tf / (tf + norm[rows])
            scores[~allowed] = 0.0
            hits = np.flatnonzero(scores > 0)
            if hits.size > k:
                top = np.argpartition(-scores[hits], k - 1)[:k]
                hits = hits[top]
            order = np.lexsort((hits, -scores[hits]))
            rows = hits[order].astype(np.int64)
            out.append((rows, scores[rows]))
        return out
