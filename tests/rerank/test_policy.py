"""Pure rerank policy: the truncation plan, limits, ranking, the REJECT policy, the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.config import ConfigError, RerankConfig, load_config
from server.engines import registry
from server.engines.maxsim_reranker import TextVectors, VectorCache, pair_score
from server.engines.reranker import (
    REJECT,
    TRUNCATE,
    Prepared,
    RerankLimits,
    enforce_truncation_policy,
    plan_pair,
    rank,
    validate_request,
)
from server.errors import InvalidArgument, NotFound

LIMITS = RerankLimits(max_documents=10, max_text_chars=50)


@pytest.mark.parametrize(
    ("query", "doc", "window", "expected"),
    [
        (5, 20, 256, (5, 20, False)),  # fits: nothing cut
        (5, 300, 256, (5, 248, True)),  # document fills what the query left
        (300, 5, 256, (126, 5, True)),  # the query keeps at most half the content budget
        (300, 300, 256, (126, 127, True)),
        (126, 127, 256, (126, 127, False)),  # exactly the window
        (0, 0, 8, (0, 0, False)),
    ],
)
def test_plan_pair_keeps_query_to_half_and_fills_the_rest(query, doc, window, expected):
    plan = plan_pair(query, doc, window, special_tokens=3)
    assert (plan.query_keep, plan.doc_keep, plan.truncated) == expected
    assert plan.query_keep + plan.doc_keep + 3 <= window


def test_plan_pair_refuses_a_window_without_room():
    with pytest.raises(ValueError):
        plan_pair(1, 1, window=4, special_tokens=3)


class NoIteration(list):
    """A document list that fails if anything iterates it (only len() is allowed)."""

    def __iter__(self):
        raise AssertionError("the documents were iterated")


@pytest.mark.parametrize(
    ("query", "documents", "top_n", "reason"),
    [
        ("", ["a"], 0, "EMPTY_INPUT"),
        ("  \n", ["a"], 0, "EMPTY_INPUT"),
        ("q", [], 0, "EMPTY_INPUT"),
        ("q", NoIteration(["d"] * 100_000), 0, "TOO_MANY_INPUTS"),
        ("q", ["a", "b"], 3, "INVALID_TOP_K"),
        ("q" * 51, ["a"], 0, "INPUT_TOO_LARGE"),
        ("q", ["a", "b" * 51], 0, "INPUT_TOO_LARGE"),
    ],
    ids=["empty-query", "blank-query", "no-docs", "100k-docs", "top-n", "long-query", "long-doc"],
)
def test_bad_requests_get_their_reason(query, documents, top_n, reason):
    with pytest.raises(InvalidArgument) as info:
        validate_request(query, documents, top_n, LIMITS)
    assert info.value.reason == reason and info.value.status == "INVALID_ARGUMENT"


def test_good_requests_pass_and_top_n_may_equal_the_count():
    validate_request("q", ["a", "b"], 2, LIMITS)
    validate_request("q", ["a", "b"], 0, LIMITS)
    validate_request("q", ["a"], 0, LIMITS, model="m", served_model="m")


def test_unknown_model_is_not_found():
    with pytest.raises(NotFound) as info:
        validate_request("q", ["a"], 0, LIMITS, model="other", served_model="m")
    assert info.value.reason == "MODEL_NOT_FOUND" and info.value.status == "NOT_FOUND"


def test_rank_is_best_first_stable_on_ties_and_cut_at_top_n():
    scores = [0.1, 0.9, 0.5, 0.9, float("nan")]
    truncated = [False, False, True, False, False]
    ranked = rank(scores, truncated, 0)
    assert [r.index for r in ranked] == [1, 3, 2, 0, 4]  # ties keep input order, NaN last
    assert ranked[2].truncated and not ranked[0].truncated
    assert [r.index for r in rank(scores, truncated, 2)] == [1, 3]


def test_reject_policy_refuses_truncated_pairs_only():
    prepared = Prepared(items=[], costs=[], truncated=[False, True], pair_tokens=[10, 256])
    enforce_truncation_policy(prepared, TRUNCATE, 256)
    with pytest.raises(InvalidArgument) as info:
        enforce_truncation_policy(prepared, REJECT, 256)
    assert info.value.reason == "INPUT_TOO_LARGE" and info.value.metadata["index"] == "1"
    fits = Prepared(items=[], costs=[], truncated=[False], pair_tokens=[10])
    enforce_truncation_policy(fits, REJECT, 256)
    assert prepared.truncated_pairs == 1 and prepared.prompt_tokens == 266


def vectors(rows: int, seed: int) -> TextVectors:
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((rows, 8)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    pooled = rng.standard_normal(8).astype(np.float32)
    return TextVectors(tokens=tokens, pooled=pooled / np.linalg.norm(pooled))


def test_vector_cache_is_lru_and_bounded_in_bytes():
    one = vectors(4, 0)
    cache = VectorCache(max_bytes=2 * one.nbytes)
    cache.put(b"a", one)
    cache.put(b"b", vectors(4, 1))
    assert cache.get(b"a") is one  # "a" is now the most recent
    cache.put(b"c", vectors(4, 2))  # evicts "b", the least recently used
    assert cache.get(b"b") is None and cache.get(b"a") is one and cache.get(b"c") is not None
    assert cache.nbytes <= cache.max_bytes and len(cache) == 2
    disabled = VectorCache(0)
    disabled.put(b"a", one)
    assert disabled.get(b"a") is None and len(disabled) == 0


def test_pair_score_is_cosine_plus_mean_maxsim():
    q, d = vectors(3, 3), vectors(5, 4)
    want = float(q.pooled @ d.pooled) + float((q.tokens @ d.tokens.T).max(axis=1).mean())
    assert math.isclose(pair_score(q, d), want, rel_tol=1e-6)
    empty = TextVectors(tokens=np.zeros((0, 8), np.float32), pooled=d.pooled)
    assert math.isclose(pair_score(q, empty), float(q.pooled @ d.pooled), rel_tol=1e-6)


def test_unknown_engine_and_missing_model_path_are_config_errors():
    with pytest.raises(ConfigError, match="not one of maxsim, cross_encoder"):
        load_config(overrides={"rerank": {"engine": "colbert"}})
    with pytest.raises(ConfigError):
        registry.load(registry.RERANK, "cross_encoder", RerankConfig(model_path=""))


def test_rerank_threads_set_torchs_intra_op_threads_from_the_config(monkeypatch):
    import torch

    from server.engines import maxsim_reranker
    from server.engines.reranker import apply_torch_threads

    assert RerankConfig().threads == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        apply_torch_threads(0)
        assert torch.get_num_threads() == 2, "0 leaves torch's default"
        apply_torch_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ConfigError):
            apply_torch_threads(-1)
        seen = []
        monkeypatch.setattr(maxsim_reranker, "apply_torch_threads", seen.append)
        monkeypatch.setattr(maxsim_reranker.MaxSimReranker, "__init__", lambda self, *a, **k: None)
        maxsim_reranker.MaxSimReranker.from_config(RerankConfig(threads=3))
        assert seen == [3]
    finally:
        torch.set_num_threads(before)
