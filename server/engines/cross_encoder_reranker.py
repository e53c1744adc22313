"""Cross-encoder reranking: any local sentence-transformers ``CrossEncoder`` directory.

Point ``rerank.model_path`` at a downloaded cross-encoder (bge-reranker, an ms-marco
MiniLM cross-encoder, ...). Nothing is fetched: the directory is loaded with
``local_files_only``.

One batcher item is one (query, document) pair, already tokenized and cut to the window
by the shared policy (``server.engines.reranker.plan_pair``); its cost is its token count.
A batch is padded to its longest pair and run through the CrossEncoder's own modules, so a
score equals ``CrossEncoder.predict`` on the same (untruncated) pair, whatever else shared
the batch: padding is masked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import ConfigError, RerankConfig
from server.engines.reranker import (
    Prepared,
    RerankerBase,
    apply_torch_threads,
    cut_encoding,
    plan_pair,
)


@dataclass(frozen=True)
class PairItem:
    """One tokenized pair: what the batcher carries for the cross-encoder."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]


class CrossEncoderReranker(RerankerBase):
    """A ``Reranker`` over a local CrossEncoder model directory."""

    @classmethod
    def from_config(cls, config: RerankConfig) -> CrossEncoderReranker:
        """The engine for a ``[rerank]`` section (registry entry "cross_encoder")."""
        if not config.model_path:
            raise ConfigError(
                "rerank.engine = cross_encoder needs rerank.model_path (a local model directory)"
            )
        apply_torch_threads(config.threads)
        return cls(config.model_path, device=config.device)

    def __init__(self, model_path: str | Path, device: str = "cpu", max_seq_length: int = 0) -> None:
        """Load the model from ``model_path`` (blocking). ``max_seq_length`` 0: the model's."""
        # Offline by construction: a local directory, never a hub id.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import CrossEncoder
        from tokenizers import Tokenizer

        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        self._torch = torch
        self.model = CrossEncoder(str(path), device=device, local_files_only=True)
        self.model.eval()
        if self.model.num_labels != 1:
            raise ValueError(
                f"{path} has {self.model.num_labels} labels; a reranker needs one relevance score"
            )
        tokenizer = self.model.tokenizer
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path} has no fast (tokenizers) tokenizer")
        self.name = path.name
        limit = self.model.max_seq_length or 512
        positions = getattr(self.model.model.config, "max_position_embeddings", limit)
        self.window = min(limit, positions, max_seq_length or limit)
        # A private copy of the Rust tokenizer with truncation and padding off: the policy
        # here decides what is kept, and the copy is never reconfigured, so threads share it.
        self._tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._pad_id = tokenizer.pad_token_id or 0
        self._with_types = "token_type_ids" in tokenizer.model_input_names
        self._specials = tokenizer.num_special_tokens_to_add(pair=True)

    # -- Reranker ---------------------------------------------------------------------

    def prepare(self, query: str, documents: Sequence[str]) -> Prepared:
        """Tokenize every pair and cut it to the window by the shared policy."""
        encodings = self._tok.encode_batch([query, *documents], add_special_tokens=False)
        q_enc, doc_encs = encodings[0], encodings[1:]
        items: list[PairItem] = []
        truncated: list[bool] = []
        for d_enc in doc_encs:
            plan = plan_pair(len(q_enc.ids), len(d_enc.ids), self.window, self._specials)
            pair = self._tok.post_process(
                cut_encoding(q_enc, plan.query_keep),
                cut_encoding(d_enc, plan.doc_keep),
                add_special_tokens=True,
            )
            items.append(PairItem(tuple(pair.ids), tuple(pair.type_ids)))
            truncated.append(plan.truncated)
        costs = [len(item.input_ids) for item in items]
        return Prepared(items=list(items), costs=costs, truncated=truncated, pair_tokens=costs)

    def run_batch(self, payloads: list[PairItem]) -> list[float]:
        """Score a batch of pairs: pad, run the CrossEncoder's modules, apply its activation."""
        torch = self._torch
        width = max(len(p.input_ids) for p in payloads)
        ids = torch.full((len(payloads), width), self._pad_id, dtype=torch.long)
        types = torch.zeros((len(payloads), width), dtype=torch.long)
        mask = torch.zeros((len(payloads), width), dtype=torch.long)
        for row, p in enumerate(payloads):
            n = len(p.input_ids)
            ids[row, :n] = torch.tensor(p.input_ids)
            types[row, :n] = torch.tensor(p.token_type_ids)
            mask[row, :n] = 1
        features: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self._with_types:
            features["token_type_ids"] = types
        with torch.inference_mode():
            scores = self.model(features)["scores"].float()
            if self.model.activation_fn is not None:
                scores = self.model.activation_fn(scores)
        return [float(s) for s in scores.reshape(len(payloads), -1)[:, 0]]

    def finish(self, prepared: Prepared, outputs: list[float]) -> list[float]:
        """The pair scores are the document scores."""
        return [float(s) for s in outputs]

    def close(self) -> None:
        """Nothing to release beyond the engine itself (the model goes with it)."""

