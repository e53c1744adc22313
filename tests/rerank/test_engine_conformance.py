"""Every rerank engine that loads here honours the Reranker protocol the same way.

Parametrized over the real engines (the bundled MiniLM late-interaction default and a
real saved cross-encoder directory); the same suite is what would run on a GPU host.
"""

from __future__ import annotations

import math

import pytest

from server.engines.reranker import Reranker, score_in_process


@pytest.fixture(scope="module", params=["maxsim", "cross_encoder"])
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Reranker)
    assert engine.name and engine.window >= 32


def test_prepare_accounts_for_every_document(engine):
    docs = ["short", "", "a somewhat longer document about nothing in particular " * 3]
    prepared = engine.prepare("a query", docs)
    assert len(prepared.truncated) == len(prepared.pair_tokens) == len(docs)
    assert len(prepared.costs) == len(prepared.items) >= 1
    assert all(0 < n <= engine.window for n in prepared.pair_tokens)
    assert prepared.truncated_pairs == 0


def test_truncation_starts_exactly_past_the_window(engine):
    # "hello" is one token; the query "q" is one token; a pair adds 3 special tokens (BERT).
    room = engine.window - 3 - 1
    fits = engine.prepare("q", ["hello " * room])
    over = engine.prepare("q", ["hello " * (room + 1)])
    assert fits.truncated == [False] and fits.pair_tokens == [engine.window]
    assert over.truncated == [True] and over.pair_tokens == [engine.window]


def test_long_query_keeps_half_the_window_and_the_document_the_rest(engine):
    prepared = engine.prepare("word " * 1000, ["hello " * 1000, "hi"])
    assert prepared.truncated == [True, True]
    budget = engine.window - 3
    assert prepared.pair_tokens == [engine.window, budget // 2 + 1 + 3]


def test_scores_are_finite_deterministic_and_include_empty_documents(engine):
    docs = ["Paris is the capital of France.", "", "Bananas are yellow."]
    first = score_in_process(engine, "capital of france", docs, batch_size=3)
    second = score_in_process(engine, "capital of france", docs, batch_size=1)
    assert all(math.isfinite(s) for s in first)
    assert first == pytest.approx(second, abs=1e-5)
