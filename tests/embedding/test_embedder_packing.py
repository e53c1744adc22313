"""Padding-free batches: packed rows give the vectors SentenceTransformer.encode gives."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from server.engines.embedder import pack_rows


def test_pack_rows_first_fit_longest_first():
    lengths = [200, 30, 150, 90, 400, 60]
    rows = pack_rows(lengths, 384)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert rows[0] == [4]  # longer than a row: alone
    for row in rows[1:]:
        assert sum(lengths[i] for i in row) <= 384
    assert len(rows) == 3  # 400 | 200+150+30 | 90+60


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


@pytest.fixture(scope="module")
def mixed_texts(msmarco_dir) -> list[str]:
    with open(msmarco_dir / "corpus.jsonl") as fh:
        passages = [json.loads(line)["text"] for _, line in zip(range(200), fh)]
    rng = random.Random(3)
    texts = [rng.choice(passages)[: rng.choice([5, 40, 300, 3000])] for _ in range(40)]
    texts.append(" ".join(passages[:10]))  # over 256 tokens: cut like encode cuts it
    texts.append("x")
    return texts


def test_bundled_model_packs_and_matches_encode_of_each_text(minilm, mixed_texts):
    assert minilm.packs
    packed = minilm.embed(mixed_texts)
    alone = np.stack([minilm._model.encode(t, convert_to_numpy=True) for t in mixed_texts])
    assert packed.shape == alone.shape == (len(mixed_texts), minilm.dimension)
    assert cosine(packed, alone).min() >= 0.9999
    # Rows of different sizes: the same texts packed with narrow rows agree too.
    row_tokens = minilm.pack_row_tokens
    try:
        minilm.pack_row_tokens = minilm.max_seq_length
        narrow = minilm.embed(mixed_texts)
    finally:
        minilm.pack_row_tokens = row_tokens
    assert cosine(narrow, alone).min() >= 0.9999


def test_packing_that_disagrees_with_padded_output_is_turned_off(minilm, monkeypatch):
    assert minilm._packing_matches()
    monkeypatch.setattr(
        minilm, "_embed_packed",
        lambda texts: np.random.default_rng(0).normal(size=(len(texts), minilm.dimension)).astype(np.float32),
    )
    assert not minilm._packing_matches()
