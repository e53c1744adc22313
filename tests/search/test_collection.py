"""Collections on real FAISS: every index kind and metric, training, filters, deletes,
reload from snapshot + log, and consistent reads during writes and snapshots."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from retrieval.collection import Collection
from retrieval.filters import Equals, In, Range
from retrieval.fusion import Fusion
from retrieval.manager import CollectionManager
from retrieval.types import (
    IndexKind,
    Metric,
    Payload,
    Point,
    SearchMode,
    SearchParams,
    SearchQuery,
    make_spec,
)
from retrieval.errors import AlreadyExists, NotFound


def points(vectors, start=0, meta=None):
    return [
        Point(f"p{start + i}", v, Payload(f"text {start + i}", (meta or (lambda j: {}))(start + i)))
        for i, v in enumerate(vectors)
    ]


def upsert_all(coll, pts, batch=500):
    for i in range(0, len(pts), batch):
        coll.upsert(pts[i : i + batch])


def ids(hits):
    return [h.id for h in hits]


def clustered(n, dim, seed=0, centers=50, centers_seed=None):
    """Vectors around random centres (closer to real embeddings than uniform noise)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(seed if centers_seed is None else centers_seed).standard_normal(
        (centers, dim)
    ).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32)


@pytest.fixture
def manager(tmp_path):
    m = CollectionManager(tmp_path)
    m.load()
    yield m
    m.close(snapshot=False)


KINDS = [
    (IndexKind.FLAT, {}),
    (IndexKind.HNSW, {}),
    (IndexKind.IVF_FLAT, {"nlist": 16}),
]


@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("kind,params", KINDS, ids=[k.value for k, _ in KINDS])
def test_each_point_is_its_own_nearest(manager, kind, params, metric):
    x = clustered(3000, 32)
    coll = manager.create(make_spec("c", 32, metric, kind, **params))
    upsert_all(coll, points(x))
    assert coll.stats().trained and coll.stats().points == 3000
    if kind is IndexKind.IVF_FLAT:
        assert coll.stats().nlist == 16
    sample = np.arange(0, 3000, 37)
    queries = [SearchQuery(k=5, vector=x[i], params=SearchParams(nprobe=16)) for i in sample]
    results = coll.search(queries)
    if metric is Metric.INNER_PRODUCT:
        # Inner product does not make a point its own nearest; compare to exact search.
        exact = x @ x[sample].T
        for col, hits in enumerate(results):
            assert hits[0].id == f"p{int(np.argmax(exact[:, col]))}"
    else:
        assert [hits[0].id for hits in results] == [f"p{i}" for i in sample]
        scores = [hits[0].score for hits in results]
        expected = 0.0 if metric is Metric.L2 else 1.0
        assert np.allclose(scores, expected, atol=1e-4)
    for hits in results:  # best first
        s = [h.score for h in hits]
        assert s == sorted(s, reverse=metric is not Metric.L2)


def test_ivf_pq_trains_and_recalls(manager):
    x = clustered(10_000, 32, seed=1)
    coll = manager.create(make_spec("pq", 32, Metric.L2, IndexKind.IVF_PQ, nlist=32))
    assert coll.spec.pq_m == 4
    upsert_all(coll, points(x[:9000]), batch=1000)
    assert not coll.stats().trained  # 9984 points needed for 8-bit PQ codebooks
    # Untrained: searched exactly.
    assert ids(coll.search([SearchQuery(k=1, vector=x[5])])[0]) == ["p5"]
    upsert_all(coll, points(x[9000:], start=9000), batch=1000)
    assert coll.stats().trained and coll.stats().nlist == 32
    sample = range(0, 10_000, 101)
    results = coll.search([SearchQuery(k=10, vector=x[i]) for i in sample])
    found = np.mean([f"p{i}" in ids(h) for i, h in zip(sample, results)])
    assert found >= 0.9


def test_ivf_searches_exactly_until_trained(manager):
    x = clustered(400, 16, seed=2)
    coll = manager.create(make_spec("ivf", 16, Metric.L2, IndexKind.IVF_FLAT, nlist=8))
    coll.upsert(points(x[:200]))
    assert not coll.stats().trained
    assert ids(coll.search([SearchQuery(k=1, vector=x[7])])[0]) == ["p7"]
    coll.upsert(points(x[200:], start=200))  # 400 >= 39 * 8: trains, adds every row
    assert coll.stats().trained
    hits = coll.search([SearchQuery(k=1, vector=x[7], params=SearchParams(nprobe=8))])[0]
    assert ids(hits) == ["p7"]


def test_auto_nlist_for_ivf(manager):
    x = clustered(10_000, 8, seed=3)
    coll = manager.create(make_spec("auto", 8, Metric.L2, IndexKind.IVF_FLAT))
    upsert_all(coll, points(x), batch=2500)
    stats = coll.stats()
    assert stats.trained and stats.nlist == 256  # min(4*sqrt(n)=400, n/39=256)


def test_filtered_search_returns_top_k_when_that_many_match(manager):
    x = clustered(6000, 16, seed=4)
    coll = manager.create(make_spec("f", 16))  # HNSW
    meta = lambda i: {"rare": i % 300 == 0, "group": f"g{i % 3}", "n": float(i)}  # noqa: E731
    upsert_all(coll, points(x, meta=meta))
    q = x[1]
    for cond, matching in [
        (Equals("rare", True), [i for i in range(6000) if i % 300 == 0]),  # 20 rows
        (In("group", ("g1", "g2")), [i for i in range(6000) if i % 3]),
        (Range("n", gte=100, lt=3100), list(range(100, 3100))),
    ]:
        hits = coll.search([SearchQuery(k=15, vector=q, conditions=(cond,))])[0]
        assert len(hits) == 15
        assert {h.id for h in hits} <= {f"p{i}" for i in matching}
        sub = np.array(matching)
        d = ((x[sub] / np.linalg.norm(x[sub], axis=1, keepdims=True)) @ (q / np.linalg.norm(q)))
        exact = {f"p{i}" for i in sub[np.argsort(-d)[:15]]}
        assert len(exact & set(ids(hits))) >= 14
    # Fewer matches than k: every match, no more.
    hits = coll.search([SearchQuery(k=50, vector=q, conditions=(Equals("rare", True),))])[0]
    assert len(hits) == 20


def test_replace_delete_and_get(manager):
    x = clustered(3000, 16, seed=5)
    coll = manager.create(make_spec("r", 16, Metric.L2))
    upsert_all(coll, points(x))
    coll.upsert([Point("p1", x[2000] + 0.001, Payload("replaced", {"v": 2}))])
    assert coll.stats().points == 3000
    (got,) = coll.get(["p1"], with_vector=True)
    assert got.payload == Payload("replaced", {"v": 2.0}) or got.payload.text == "replaced"
    assert np.allclose(got.vector, x[2000] + 0.001)
    assert "p1" not in ids(coll.search([SearchQuery(k=3, vector=x[1])])[0])
    assert set(ids(coll.search([SearchQuery(k=2, vector=x[2000])])[0])) == {"p1", "p2000"}
    assert coll.delete(["p5", "p6", "nope", "p5"]) == 2
    assert coll.get(["p5", "p7", "nope"]) and ids(coll.get(["p5", "p7"])) == ["p7"]
    assert "p5" not in ids(coll.search([SearchQuery(k=5, vector=x[5])])[0])
    assert coll.stats().points == 2998


def test_keyword_and_hybrid(manager):
    x = clustered(50, 8, seed=6)
    coll = manager.create(make_spec("kw", 8))
    texts = [f"document about topic{i}" for i in range(50)]
    texts[10] = "the quick brown fox jumps over the lazy dog"
    texts[20] = "a fox in the henhouse"
    coll.upsert([Point(f"p{i}", x[i], Payload(t, {"i": float(i)})) for i, t in enumerate(texts)])
    hits = coll.search([SearchQuery(k=5, text="quick fox", mode=SearchMode.KEYWORD)])[0]
    assert ids(hits) == ["p10", "p20"]  # only texts sharing a term score
    hits = coll.search([SearchQuery(k=5, text="fox", mode=SearchMode.KEYWORD,
                                    conditions=(Range("i", gte=15),))])[0]
    assert ids(hits) == ["p20"]
    rrf = SearchParams(fusion=Fusion.RRF)
    hits = coll.search([SearchQuery(k=3, text="quick fox", vector=x[20], mode=SearchMode.HYBRID,
                                    params=rrf)])[0]
    # p20 is first in the dense ranking and second in BM25: first after RRF.
    assert ids(hits)[0] == "p20" and "p10" in ids(hits)
    assert hits[0].score == pytest.approx(1 / 61 + 1 / 62)
    coll.upsert([Point("p30", x[30], Payload("fox fox fox"))])  # index rebuilt on write
    hits = coll.search([SearchQuery(k=1, text="fox", mode=SearchMode.KEYWORD)])[0]
    assert ids(hits) == ["p30"]


@pytest.mark.parametrize("kind,params", KINDS, ids=[k.value for k, _ in KINDS])
def test_reopen_from_snapshot_and_log_tail(tmp_path, kind, params):
    x = clustered(3000, 16, seed=7)
    m = CollectionManager(tmp_path)
    m.load()
    coll = m.create(make_spec("d", 16, Metric.COSINE, kind, **params))
    upsert_all(coll, points(x[:2000], meta=lambda i: {"n": float(i)}))
    assert coll.snapshot()
    upsert_all(coll, points(x[2000:], start=2000))
    coll.delete([f"p{i}" for i in range(0, 100)])
    before = [ids(h) for h in coll.search([SearchQuery(k=5, vector=x[i]) for i in range(0, 3000, 50)])]
    m.close(snapshot=False)  # as after a kill: the tail lives only in the log
    m2 = CollectionManager(tmp_path)
    m2.load()
    coll2 = m2.get("d")
    assert coll2.stats().points == 2900
    after = [ids(h) for h in coll2.search([SearchQuery(k=5, vector=x[i]) for i in range(0, 3000, 50)])]
    assert after == before
    # Compaction: deleting most rows then snapshotting rewrites the table.
    coll2.delete([f"p{i}" for i in range(100, 2500)])
    assert coll2.snapshot()
    assert coll2._table.n_rows == 500
    hits = coll2.search([SearchQuery(k=1, vector=x[2700], conditions=(Range("n", gte=0),))])[0]
    assert hits == [] or hits[0].id != "p2700"  # p2700 has no "n"; only p2500..p1999 do
    assert ids(coll2.search([SearchQuery(k=1, vector=x[2700])])[0]) == ["p2700"]
    m2.close()
    m3 = CollectionManager(tmp_path)
    m3.load()
    assert m3.get("d").stats().points == 500
    assert ids(m3.get("d").search([SearchQuery(k=1, vector=x[2600])])[0]) == ["p2600"]
    m3.close()


def test_manager_create_exists_delete(tmp_path):
    m = CollectionManager(tmp_path)
    m.load()
    m.create(make_spec("a", 4))
    with pytest.raises(AlreadyExists):
        m.create(make_spec("a", 8))
    with pytest.raises(NotFound) as err:
        m.get("b")
    assert err.value.reason == "COLLECTION_NOT_FOUND"
    m.delete("a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(NotFound):
        m.delete("a")
    (tmp_path / ".b.creating-123").mkdir()  # an interrupted create
    m.close()
    m2 = CollectionManager(tmp_path)
    m2.load()
    assert m2.list() == [] and list(tmp_path.iterdir()) == []


def test_searches_see_whole_writes_during_upserts_and_snapshots(tmp_path):
    """Each write adds 40 points tagged with its batch; a search filtered on one batch
    sees 0 or 40 of them, never part, while snapshots run in between."""
    m = CollectionManager(tmp_path)
    m.load()
    coll: Collection = m.create(make_spec("cc", 8))
    rng = np.random.default_rng(8)
    batches = 60
    coll.upsert([Point(f"b0-{j}", rng.standard_normal(8), Payload("", {"batch": 0.0}))
                 for j in range(40)])
    done = threading.Event()
    errors: list[str] = []

    def writer():
        for b in range(1, batches):
            coll.upsert([Point(f"b{b}-{j}", rng.standard_normal(8), Payload("", {"batch": float(b)}))
                         for j in range(40)])
            if b % 10 == 0:
                coll.snapshot()
        done.set()

    def reader(seed):
        r = np.random.default_rng(seed)
        while not done.is_set():
            b = float(r.integers(0, batches))
            hits = coll.search([SearchQuery(k=100, vector=r.standard_normal(8).astype(np.float32),
                                            conditions=(Equals("batch", b),))])[0]
            if len(hits) not in (0, 40):
                errors.append(f"batch {b}: {len(hits)} hits")

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(s,)) for s in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    assert coll.stats().points == 40 * batches
    m.close()


def test_default_hnsw_recall_at_10(manager):
    """The default index (HNSW, M=32, efConstruction=80, efSearch=64) against exact search."""
    x = clustered(20_000, 64, seed=9, centers=200)
    q = clustered(200, 64, seed=10, centers=200, centers_seed=9)  # same distribution
    coll = manager.create(make_spec("recall", 64, Metric.L2))
    upsert_all(coll, points(x), batch=2000)
    hits = coll.search([SearchQuery(k=10, vector=v) for v in q])
    d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    exact = np.argsort(d, axis=1)[:, :10]
    recall = np.mean([len({f"p{i}" for i in e} & set(ids(h))) / 10 for e, h in zip(exact, hits)])
    assert recall >= 0.95, recall
