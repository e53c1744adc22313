"""Engines for the typed-client tests: the REAL hops (servicers, cores, FAISS, batchers)
around engines whose model is not what these tests are about.

* :class:`HashEmbedder` - deterministic vectors from a text's words; the bundled MiniLM's
  tokenizer directory as ``model_path`` (the search hop chunks with it);
* :class:`OverlapReranker` - scores a document by the query words it contains;
* :class:`HonestGenerator` - tokens "t0", "t1", ...; it tracks every request it has not
  finished the way an engine does (added when generation starts, removed when it ends,
  is aborted, or its stream is closed), so ``num_unfinished()`` is the truth a
  cancellation test can rely on. A request whose prompt contains "hold" emits one token,
  then waits for ``release`` (an ``asyncio.Event``) before the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence

import numpy as np

from server.engines.embedder import EmbedderBase, bundled_model_path
from server.engines.generator import (
    ChatTurn,
    GenerationEvent,
    GenerationFinal,
    GenerationParams,
    TokenDelta,
)
from server.engines.reranker import Prepared

DIM = 16


def word_vector(text: str) -> np.ndarray:
    """The sum of a fixed random vector per (lower-cased) word: similar texts are near."""
    total = np.zeros(DIM, dtype=np.float32)
    for word in text.lower().split():
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        total += np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return total


class HashEmbedder(EmbedderBase):
    """An Embedder of ``DIM`` dimensions; a word is a token."""

    name = "hash-embedder"
    dimension = DIM
    max_seq_length = 256

    def __init__(self) -> None:
        self.model_path = str(bundled_model_path())

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Words per text."""
        return [len(t.split()) for t in texts]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One word-sum vector per text."""
        return np.stack([word_vector(t) for t in texts])


class OverlapReranker:
    """A Reranker: the score of a document is the number of query words it contains."""

    name = "overlap"
    window = 512

    def prepare(self, query: str, documents: Sequence[str]) -> Prepared:
        """One item per document; its cost is its words."""
        items = [(query, doc) for doc in documents]
        tokens = [len(query.split()) + len(d.split()) for d in documents]
        return Prepared(items=items, costs=tokens, truncated=[False] * len(items),
                        pair_tokens=tokens)

    def run_batch(self, payloads: list[tuple[str, str]]) -> list[float]:
        """Shared words per pair."""
        return [float(len(set(q.lower().split()) & set(d.lower().split()))) for q, d in payloads]

    def finish(self, prepared: Prepared, outputs: list[float]) -> list[float]:
        """The outputs are the scores."""
        return list(outputs)

    def close(self) -> None:
        """Nothing to release."""


class HonestGenerator:
    """A Generator that keeps an engine's books of unfinished requests (see the module)."""

    engine = "vllm"  # stands in for the configured engine of the default model

    def __init__(self) -> None:
        self.unfinished: set[str] = set()
        self.release = asyncio.Event()
        self.holding = asyncio.Event()  # set while a "hold" request waits on release
        self.aborted: list[str] = []
        self.idle = asyncio.Event()  # set whenever the last unfinished request ends
        self._abort_events: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        """Nothing to load."""

    async def stop(self) -> None:
        """Nothing to release."""

    def prompt_token_ids(self, prompt: str, messages: Sequence[ChatTurn]) -> list[int]:
        """One token per word; the word "hold" is token 0 (see ``generate``)."""
        text = prompt or " ".join(f"{m.role}: {m.content}" for m in messages)
        return [0 if w == "hold" else 1 + len(w) for w in text.split()]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        """``max_tokens`` tokens, or fewer when aborted; held after the first if asked."""
        assert params.max_tokens is not None
        self.unfinished.add(request_id)
        self.idle.clear()
        aborted = self._abort_events[request_id] = asyncio.Event()
        try:
            produced = 0
            for index in range(params.max_tokens):
                if aborted.is_set():
                    break
                yield TokenDelta(f"t{index} ", (100 + index,))
                produced += 1
                if index == 0 and 0 in prompt_token_ids:
                    self.holding.set()
                    await _first(self.release, aborted)
            reason = "abort" if aborted.is_set() else "length"
            yield GenerationFinal(reason, len(prompt_token_ids), produced)
        finally:
            # Every way out (finished, aborted, stream closed by a cancelled caller).
            self.unfinished.discard(request_id)
            self._abort_events.pop(request_id, None)
            if not self.unfinished:
                self.idle.set()

    async def abort(self, request_id: str) -> bool:
        """Abort a running request; False when it is not running here."""
        event = self._abort_events.get(request_id)
        if event is None:
            return False
        self.aborted.append(request_id)
        event.set()
        return True

    def num_unfinished(self) -> int:
        """Requests started and not yet ended."""
        return len(self.unfinished)

    def healthy(self) -> bool:
        """Always."""
        return True


async def _first(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
