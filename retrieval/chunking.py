"""Token-aware chunking: windows of N embedding-model tokens with overlap.

Windows are cut on the model's own tokenizer (a Hugging Face fast tokenizer) and mapped
back to character spans of the original text, so a chunk is a verbatim slice of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retrieval.errors import InvalidArgument

DEFAULT_CHUNK_TOKENS = 512
DEFAULT_OVERLAP_TOKENS = 50


@dataclass(frozen=True)
class ChunkSettings:
    """Window and overlap in tokens, as actually used."""

    chunk_tokens: int
    overlap_tokens: int


def resolve_settings(chunk_tokens: int, overlap_tokens: int, max_tokens: int) -> ChunkSettings:
    """Fill defaults (0 means default), cap the window at ``max_tokens``, check overlap."""
    chunk = chunk_tokens or DEFAULT_CHUNK_TOKENS
    chunk = min(chunk, max_tokens)
    overlap = DEFAULT_OVERLAP_TOKENS if overlap_tokens == 0 else overlap_tokens
    if overlap_tokens == 0 and overlap >= chunk:
        overlap = chunk // 4
    if overlap >= chunk:
        raise InvalidArgument(
            f"overlap_tokens ({overlap}) must be below chunk_tokens ({chunk})",
            metadata={"field": "overlap_tokens", "chunk_tokens": chunk},
        )
    return ChunkSettings(chunk, overlap)


class TokenChunker:
    """Splits texts into overlapping token windows of a tokenizer."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        """``tokenizer`` is a fast HF tokenizer; ``max_tokens`` the longest window the
        model embeds without truncation (its max sequence length minus special tokens)."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("token-aware chunking needs a fast tokenizer (offsets)")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    @classmethod
    def from_model_path(cls, model_path: str) -> TokenChunker:
        """Load the tokenizer of a sentence-transformers model directory (offline)."""
        import json
        from pathlib import Path

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        max_seq = tokenizer.model_max_length
        config = Path(model_path) / "sentence_bert_config.json"
        if config.exists():
            max_seq = int(json.loads(config.read_text()).get("max_seq_length", max_seq))
        special = tokenizer.num_special_tokens_to_add(pair=False)
        # Chunking tokenises whole documents; silence the "longer than the model" warning.
        tokenizer.model_max_length = 1 << 30
        return cls(tokenizer, max(1, max_seq - special))

    def chunk(self, text: str, settings: ChunkSettings) -> list[str]:
        """The windows of ``text``: each at most ``chunk_tokens`` tokens, consecutive
        windows sharing ``overlap_tokens``; the last window ends at the text's end."""
        encoding = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        offsets = encoding["offset_mapping"]
        n = len(offsets)
        if n == 0:
            return []
        step = settings.chunk_tokens - settings.overlap_tokens
        chunks = []
        start = 0
        while True:
            end = min(start + settings.chunk_tokens, n)
            chunks.append(text[offsets[start][0] : offsets[end - 1][1]])
            if end == n:
                return chunks
            start += step
