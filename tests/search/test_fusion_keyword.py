"""Pure policy of hybrid search: the fusion functions and the incremental BM25 index."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import InvalidArgument
from retrieval.fusion import Fusion, check_weight, fuse, normalize, reciprocal_rank_fusion
from retrieval.keyword import KeywordIndex, tokenize

DENSE = (np.array([1, 2, 3]), np.array([0.9, 0.8, 0.5], dtype=np.float32))
KEYWORD = (np.array([3, 4]), np.array([10.0, 2.0], dtype=np.float32))


def test_weighted_rrf_moves_the_heavier_ranking_up():
    assert [i for i, _ in reciprocal_rank_fusion([["a", "b"], ["b", "a"]], 60, 2, [1, 1])] == ["a", "b"]
    assert [i for i, _ in reciprocal_rank_fusion([["a", "b"], ["b", "a"]], 60, 2, [1, 3])] == ["b", "a"]


def test_rrf_at_equal_weights_is_classic_rrf():
    rows, scores = fuse(DENSE, KEYWORD, Fusion.RRF, 0.5, 60, 10)
    classic = reciprocal_rank_fusion([[1, 2, 3], [3, 4]], k=60, top=10)
    assert rows.tolist() == [i for i, _ in classic]
    assert np.allclose(scores, [s for _, s in classic])


def test_convex_minmax_by_hand():
    rows, scores = fuse(DENSE, KEYWORD, Fusion.CONVEX_MINMAX, 0.7, 60, 10)
    # dense' = {1: 1, 2: 0.75, 3: 0}, keyword' = {3: 1, 4: 0}, missing counts 0.
    assert rows.tolist() == [1, 2, 3, 4]
    assert np.allclose(scores, [0.7, 0.525, 0.3, 0.0])
    rows, scores = fuse(DENSE, KEYWORD, Fusion.CONVEX_MINMAX, 0.2, 60, 2)
    assert rows.tolist() == [3, 1] and np.allclose(scores, [0.8, 0.2])


def test_convex_zscore_matches_the_formula():
    rows, scores = fuse(DENSE, KEYWORD, Fusion.CONVEX_ZSCORE, 0.6, 60, 10)
    d = (DENSE[1] - DENSE[1].mean()) / DENSE[1].std()
    k = (KEYWORD[1] - KEYWORD[1].mean()) / KEYWORD[1].std()
    expected = {1: 0.6 * d[0] + 0.4 * k.min(), 2: 0.6 * d[1] + 0.4 * k.min(),
                3: 0.6 * d[2] + 0.4 * k[0], 4: 0.6 * d.min() + 0.4 * k[1]}
    order = sorted(expected, key=lambda r: -expected[r])
    assert rows.tolist() == order
    assert np.allclose(scores, [expected[r] for r in order], atol=1e-6)


@pytest.mark.parametrize("method", list(Fusion))
def test_weight_one_is_dense_order_and_zero_is_keyword_order(method):
    assert fuse(DENSE, KEYWORD, method, 1.0, 60, 3)[0].tolist() == [1, 2, 3]
    # Keyword only: its best comes first (its worst ties with the points it never ranked).
    assert fuse(DENSE, KEYWORD, method, 0.0, 60, 2)[0].tolist()[0] == 3


def test_normalize_constant_scores_and_weight_bounds():
    norm, missing = normalize(np.array([2.0, 2.0]), Fusion.CONVEX_MINMAX)
    assert norm.tolist() == [1.0, 1.0] and missing == 0.0
    norm, missing = normalize(np.array([2.0, 2.0]), Fusion.CONVEX_ZSCORE)
    assert norm.tolist() == [0.0, 0.0] and missing == -1.0
    # One keyword candidate: it beats everything keyword did not rank.
    for method in (Fusion.CONVEX_MINMAX, Fusion.CONVEX_ZSCORE):
        one = (np.array([4]), np.array([3.0], dtype=np.float32))
        assert fuse(DENSE, one, method, 0.0, 60, 1)[0].tolist() == [4]
    assert check_weight(0.0) == 0.0 and check_weight(1.0) == 1.0
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(InvalidArgument):
            check_weight(bad)


def test_stemmer_is_applied_to_corpus_and_query_alike():
    assert tokenize(["Rotating the rotated wheels"]) == [["rotat", "rotat", "wheel"]]
    assert tokenize(["Rotating the wheels"], stem=False) == [["rotating", "wheels"]]
    texts = ["how to rotate a wheel", "the cat sat"]
    for stem, found in ((True, [0]), (False, [])):
        index = KeywordIndex(stem=stem)
        index.sync(texts, np.ones(2, dtype=bool))
        assert index.search(["rotating"], 5)[0][0].tolist() == found


def test_scores_match_bm25s():
    import bm25s

    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 20))) for _ in range(200)]
    index = KeywordIndex(stem=False)
    index.sync(texts, np.ones(len(texts), dtype=bool))
    reference = bm25s.BM25()
    reference.index(tokenize(texts, stem=False), show_progress=False)
    for query in ("w1 w2", "w7", "w3 w30 w39"):
        rows, scores = index.search([query], 10)[0]
        ref = reference.get_scores(tokenize([query], stem=False)[0])
        assert np.allclose(scores, ref[rows], rtol=1e-4)
        assert np.allclose(np.sort(scores)[::-1], np.sort(ref)[::-1][:10], rtol=1e-4)


def test_incremental_updates_equal_a_fresh_build():
    rng = np.random.default_rng(2)
    words = [f"t{i}" for i in range(30)]
    texts: list[str] = []
    live = np.zeros(0, dtype=bool)
    index = KeywordIndex(stem=False)
    for _ in range(12):  # writes: appends, replacements and deletes
        new = [" ".join(rng.choice(words, size=rng.integers(2, 12))) for _ in range(15)]
        texts += new
        live = np.concatenate([live, np.ones(len(new), dtype=bool)])
        live[rng.choice(len(live), size=4, replace=False)] = False
        index.sync(texts, live)
        fresh = KeywordIndex(stem=False)
        fresh.sync(texts, live)  # one sync from empty = a full build
        for query in ("t1 t2", "t5", "t9 t11 t29"):
            got, want = index.search([query], 20)[0], fresh.search([query], 20)[0]
            assert got[0].tolist() == want[0].tolist()
            assert np.allclose(got[1], want[1])
            assert live[got[0]].all()
    # Compaction: rows renumbered in order, results identical up to the renumbering.
    kept = np.flatnonzero(live)
    old_to_new = np.full(len(live), -1)
    old_to_new[kept] = np.arange(len(kept))
    before = index.search(["t1 t2"], 20)[0]
    index.remap(old_to_new, len(kept))
    after = index.search(["t1 t2"], 20)[0]
    assert after[0].tolist() == old_to_new[before[0]].tolist()
    assert np.allclose(after[1], before[1])
    index.sync([texts[r] for r in kept.tolist()] + ["t1 t2 t2"], np.ones(len(kept) + 1, dtype=bool))
    assert index.search(["t2"], 1)[0][0].tolist() == [len(kept)]
