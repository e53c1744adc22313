"""One VectorSearchService contract, two vector stores: every test runs through the real
gRPC server (search hop on port 0) once on FAISS and once on Milvus, the latter a
milvus-lite server process this module starts on loopback (pymilvus speaks the same gRPC
protocol to Milvus Standalone / Distributed).

Expected results are computed here with numpy and plain Python, not read from either
backend, so both are held to the same reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from backbone.v1 import common_pb2
from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from perf.milvus_lite_server import milvus_lite
from server.servicers.search import SearchHop
from tests.conftest import make_config, running
from tests.search.conftest import expect_error, search_config

BACKENDS = ["faiss", "milvus"]
METRICS = {"cosine": pb.METRIC_COSINE, "ip": pb.METRIC_INNER_PRODUCT, "l2": pb.METRIC_L2}
TRICKY = ['plain', 'quo"te', "back\\slash", "new\nline", "ends with \\", "' or id != '", "ünï"]


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    """One milvus-lite server process for the module (each test uses its own prefix)."""
    with milvus_lite(tmp_path_factory.mktemp("milvus")) as uri:
        yield uri


def store_config(backend: str, tmp_path, request, **search):
    """The search config of ``backend``: a fresh data_dir, or a fresh Milvus prefix."""
    if backend == "milvus":
        uri = request.getfixturevalue("milvus_uri")
        search = {"backend": "milvus", "milvus_uri": uri,
                  "milvus_collection_prefix": f"t{uuid.uuid4().hex[:10]}_", **search}
    return search_config(tmp_path, **search)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend under test."""
    return request.param


@pytest.fixture
def config(backend, tmp_path, request):
    """A search config for this test's backend."""
    return store_config(backend, tmp_path, request)


@pytest.fixture
async def stub(config):
    """A VectorSearchService stub on a search hop over the test's backend."""
    async with running(config, [SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield pb_grpc.VectorSearchServiceStub(channel)


def vec(values) -> common_pb2.Vector:
    """A wire vector."""
    return common_pb2.Vector(values=[float(v) for v in values])


def point(pid: str, values, text: str = "", **meta) -> pb.Point:
    """A wire point with payload."""
    out = pb.Point(id=pid, vector=vec(values), payload=pb.Payload(text=text))
    if meta:
        out.payload.metadata.update(meta)
    return out


async def upsert(stub, name: str, points: list[pb.Point]) -> int:
    """Client-streaming upsert in messages of 100 points."""
    async def messages():
        for start in range(0, len(points), 100):
            yield pb.UpsertRequest(collection=name, points=points[start : start + 100])

    return (await stub.Upsert(messages())).upserted


def cond(field: str, **test) -> pb.Condition:
    """A filter condition: equals=<python scalar>, isin=[...], or range=dict."""
    if "equals" in test:
        return pb.Condition(field=field, equals=_value(test["equals"]))
    if "isin" in test:
        return pb.Condition(field=field, **{"in": pb.ValueList(values=[_value(v) for v in test["isin"]])})
    return pb.Condition(field=field, range=pb.Range(**test["range"]))


def _value(v) -> struct_pb2.Value:
    if isinstance(v, bool):
        return struct_pb2.Value(bool_value=v)
    if isinstance(v, (int, float)):
        return struct_pb2.Value(number_value=v)
    return struct_pb2.Value(string_value=v)


# ------------------------------------------------------------------ collections


async def test_collection_lifecycle(stub):
    info = (await stub.CreateCollection(pb.CreateCollectionRequest(
        name="life-cycle_1", dimension=8, metric=pb.METRIC_L2))).collection
    assert (info.name, info.dimension, info.metric, info.points) == ("life-cycle_1", 8, pb.METRIC_L2, 0)
    assert info.index_kind == pb.INDEX_KIND_HNSW  # the default kind on both
    await stub.CreateCollection(pb.CreateCollectionRequest(name="life_cycle-1", dimension=4))
    names = [c.name for c in (await stub.ListCollections(pb.ListCollectionsRequest())).collections]
    assert names == ["life-cycle_1", "life_cycle-1"]  # "-" and "_" stay distinct on Milvus
    await expect_error(
        stub.CreateCollection(pb.CreateCollectionRequest(name="life-cycle_1", dimension=8)),
        grpc.StatusCode.ALREADY_EXISTS, "COLLECTION_EXISTS",
    )
    described = (await stub.DescribeCollection(pb.DescribeCollectionRequest(name="life_cycle-1"))).collection
    assert (described.dimension, described.metric) == (4, pb.METRIC_COSINE)
    await stub.DeleteCollection(pb.DeleteCollectionRequest(name="life-cycle_1"))
    for call in (
        stub.DescribeCollection(pb.DescribeCollectionRequest(name="life-cycle_1")),
        stub.DeleteCollection(pb.DeleteCollectionRequest(name="life-cycle_1")),
        stub.Search(pb.SearchRequest(collection="life-cycle_1", vector=vec([0] * 8), top_k=1)),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND")
    names = [c.name for c in (await stub.ListCollections(pb.ListCollectionsRequest())).collections]
    assert names == ["life_cycle-1"]


async def test_collections_and_points_survive_a_restart(config):
    async with running(config, [SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.VectorSearchServiceStub(channel)
            await stub.CreateCollection(pb.CreateCollectionRequest(name="kept", dimension=3))
            await upsert(stub, "kept", [point("a", [1, 0, 0], "alpha", tag="x")])
    async with running(config, [SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.VectorSearchServiceStub(channel)
            info = (await stub.DescribeCollection(pb.DescribeCollectionRequest(name="kept"))).collection
            assert info.points == 1 and info.dimension == 3
            got = (await stub.Get(pb.GetRequest(collection="kept", ids=["a"]))).points
            assert got[0].payload.text == "alpha"


# ------------------------------------------------------------------ points


async def test_upsert_get_delete(stub):
    await stub.CreateCollection(pb.CreateCollectionRequest(name="pts", dimension=4))
    points = [point(f"p{i}", [i + 1, 1, 0, 0], f"text {i}", n=i, nested={"a": [1, "b"]})
              for i in range(30)]
    points.append(point("p0", [0, 0, 3, 4], "replaced", n=-1))  # last of an id wins
    assert await upsert(stub, "pts", points) == 30  # one message: duplicates count once
    info = (await stub.DescribeCollection(pb.DescribeCollectionRequest(name="pts"))).collection
    assert info.points == 30
    got = (await stub.Get(pb.GetRequest(collection="pts", ids=["p2", "nope", "p0"], with_vector=True))).points
    assert [p.id for p in got] == ["p2", "p0"]
    assert got[0].payload.text == "text 2"
    assert got[0].payload.metadata["nested"]["a"][1] == "b"
    assert got[1].payload.text == "replaced" and got[1].payload.metadata["n"] == -1
    # Cosine collections store unit vectors on both backends.
    assert np.allclose(got[1].vector.values, [0, 0, 0.6, 0.8], atol=1e-6)
    deleted = await stub.Delete(pb.DeleteRequest(collection="pts", ids=["p1", "p1", "nope", "p3"]))
    assert deleted.deleted == 2
    assert (await stub.Get(pb.GetRequest(collection="pts", ids=["p1", "p3"]))).points == []
    info = (await stub.DescribeCollection(pb.DescribeCollectionRequest(name="pts"))).collection
    assert info.points == 28
    await expect_error(
        upsert(stub, "pts", [point("bad", [1, 2, 3])]),
        grpc.StatusCode.INVALID_ARGUMENT, "DIMENSION_MISMATCH",
    )


# ------------------------------------------------------------------ dense search


def exact(metric: str, data: np.ndarray, query: np.ndarray, k: int):
    """Reference top-k: (positions, scores) under the backbone's score conventions."""
    if metric == "cosine":
        data = data / np.linalg.norm(data, axis=1, keepdims=True)
        query = query / np.linalg.norm(query)
    if metric == "l2":
        scores = ((data - query) ** 2).sum(axis=1)  # squared distance, ascending
        order = np.argsort(scores, kind="stable")
    else:
        scores = data @ query
        order = np.argsort(-scores, kind="stable")
    return order[:k], scores[order[:k]]


@pytest.mark.parametrize("metric", sorted(METRICS))
async def test_dense_search_matches_exact_search(stub, metric):
    rng = np.random.default_rng(7)
    data = rng.standard_normal((300, 16)).astype(np.float32)
    await stub.CreateCollection(pb.CreateCollectionRequest(
        name="dense", dimension=16, metric=METRICS[metric], index_kind=pb.INDEX_KIND_FLAT))
    await upsert(stub, "dense", [point(f"d{i}", row) for i, row in enumerate(data)])
    for query in rng.standard_normal((5, 16)).astype(np.float32):
        res = await stub.Search(pb.SearchRequest(collection="dense", vector=vec(query), top_k=10))
        positions, scores = exact(metric, data, query, 10)
        assert [h.id for h in res.hits] == [f"d{i}" for i in positions]
        assert np.allclose([h.score for h in res.hits], scores, rtol=1e-4, atol=1e-4)


async def test_hnsw_search_finds_near_neighbours(stub):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((500, 8)).astype(np.float32)
    await stub.CreateCollection(pb.CreateCollectionRequest(name="hnsw", dimension=8))
    await upsert(stub, "hnsw", [point(f"h{i}", row) for i, row in enumerate(data)])
    recalls = []
    for query in data[:20]:
        res = await stub.Search(pb.SearchRequest(
            collection="hnsw", vector=vec(query), top_k=10, params=pb.SearchParams(ef_search=64)))
        truth = {f"h{i}" for i in exact("cosine", data, query, 10)[0]}
        recalls.append(len(truth & {h.id for h in res.hits}) / 10)
    assert np.mean(recalls) >= 0.9


# ------------------------------------------------------------------ filters and batches


def tagged_points():
    """60 points whose metadata exercises every filter kind, and their Python form."""
    rows = []
    for i in range(60):
        meta = {
            "lang": ["en", "fr", "de"][i % 3],
            "n": float(i),
            "flag": i % 4 == 0,
            "one": 1.0 if i % 5 == 0 else True,  # numbers and booleans stay apart
            "tricky": TRICKY[i % len(TRICKY)],
            'we"ird\\key': "k" if i % 2 else "j",
        }
        rows.append((f"f{i}", [1.0, i / 60, (i % 7) / 7, 0.5], meta))
    return rows


FILTERS = [
    ([cond("lang", equals="fr")], lambda m: m["lang"] == "fr"),
    ([cond("n", equals=12)], lambda m: m["n"] == 12),
    ([cond("flag", equals=True)], lambda m: m["flag"] is True),
    ([cond("one", equals=1)], lambda m: m["one"] == 1 and not isinstance(m["one"], bool)),
    ([cond("one", equals=True)], lambda m: m["one"] is True),
    ([cond("lang", isin=["de", "en", "xx"])], lambda m: m["lang"] in ("de", "en")),
    ([cond("n", range={"gte": 10, "lt": 20})], lambda m: 10 <= m["n"] < 20),
    ([cond("n", range={"gt": 50})], lambda m: m["n"] > 50),
    ([cond("n", range={"lte": float("inf")})], lambda m: True),
    ([cond("lang", equals="en"), cond("flag", equals=True), cond("n", range={"lte": 40})],
     lambda m: m["lang"] == "en" and m["flag"] and m["n"] <= 40),
    ([cond('we"ird\\key', equals="k")], lambda m: m['we"ird\\key'] == "k"),
    ([cond("tricky", isin=["' or id != '", "new\nline"])],
     lambda m: m["tricky"] in ("' or id != '", "new\nline")),
] + [([cond("tricky", equals=t)], lambda m, t=t: m["tricky"] == t) for t in TRICKY]


async def test_filtered_search_returns_exactly_the_matching_points(stub):
    rows = tagged_points()
    await stub.CreateCollection(pb.CreateCollectionRequest(
        name="filt", dimension=4, index_kind=pb.INDEX_KIND_FLAT))
    await upsert(stub, "filt", [point(pid, v, "", **m) for pid, v, m in rows])
    query = vec([1, 0.5, 0.5, 0.5])
    requests = [pb.SearchRequest(collection="filt", vector=query, top_k=60,
                                 filter=pb.Filter(must=must), with_payload=True)
                for must, _ in FILTERS]
    for request, (_, predicate) in zip(requests, FILTERS, strict=True):
        res = await stub.Search(request)
        expected = {pid for pid, _, m in rows if predicate(m)}
        assert {h.id for h in res.hits} == expected, request.filter
        assert all(predicate(dict(h.payload.metadata)) for h in res.hits)
    # The same searches as one batch give the same answers, in order (equals True and
    # equals 1 are different filters even though True == 1 in Python).
    batch = await stub.SearchBatch(pb.SearchBatchRequest(searches=requests))
    singles = [await stub.Search(r) for r in requests]
    assert [[h.id for h in r.hits] for r in batch.results] == [[h.id for h in r.hits] for r in singles]


async def test_unknown_filter_field_is_invalid(stub):
    await stub.CreateCollection(pb.CreateCollectionRequest(name="unk", dimension=2))
    await upsert(stub, "unk", [point("a", [1, 0], tag="x")])
    await expect_error(
        stub.Search(pb.SearchRequest(collection="unk", vector=vec([1, 0]), top_k=1,
                                     filter=pb.Filter(must=[cond("nope", equals="x")]))),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER",
    )


async def test_payloads_and_vectors_in_hits(stub):
    await stub.CreateCollection(pb.CreateCollectionRequest(
        name="pay", dimension=3, metric=pb.METRIC_INNER_PRODUCT))
    await upsert(stub, "pay", [point("a", [1, 2, 3], "alpha", tag="x", deep={"k": [1, 2]}),
                               point("b", [0, 0, 1], "beta")])
    bare = await stub.Search(pb.SearchRequest(collection="pay", vector=vec([1, 1, 1]), top_k=2))
    assert [h.id for h in bare.hits] == ["a", "b"]
    assert not bare.hits[0].HasField("payload") and not bare.hits[0].HasField("vector")
    full = await stub.Search(pb.SearchRequest(collection="pay", vector=vec([1, 1, 1]), top_k=1,
                                              with_payload=True, with_vector=True))
    hit = full.hits[0]
    assert hit.payload.text == "alpha" and hit.payload.metadata["deep"]["k"][1] == 2
    assert list(hit.vector.values) == [1.0, 2.0, 3.0] and hit.score == pytest.approx(6.0)


# ------------------------------------------------------------------ what differs


async def test_keyword_search_by_backend(stub, backend):
    await stub.CreateCollection(pb.CreateCollectionRequest(name="kw", dimension=2))
    await upsert(stub, "kw", [point("a", [1, 0], "penguins are flightless birds"),
                              point("b", [0, 1], "glaciers are rivers of ice")])
    request = pb.SearchRequest(collection="kw", text="penguins", top_k=1, mode=pb.SEARCH_MODE_KEYWORD)
    if backend == "faiss":
        assert [h.id for h in (await stub.Search(request)).hits] == ["a"]
    else:
        err = await expect_error(stub.Search(request), grpc.StatusCode.FAILED_PRECONDITION,
                                 "FAILED_PRECONDITION")
        assert "keyword search is not offered by the milvus search backend" in err.details()


@pytest.mark.parametrize("kind", [pb.INDEX_KIND_IVF_FLAT, pb.INDEX_KIND_IVF_PQ])
async def test_ivf_kinds_by_backend(stub, backend, kind):
    request = pb.CreateCollectionRequest(name="ivf", dimension=16, index_kind=kind)
    if backend == "faiss":
        assert (await stub.CreateCollection(request)).collection.index_kind == kind
    else:
        err = await expect_error(stub.CreateCollection(request),
                                 grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION")
        assert "index kind ivf" in err.details()
        listed = await stub.ListCollections(pb.ListCollectionsRequest())
        assert list(listed.collections) == []


async def test_concurrent_searches_and_writes(stub):
    await stub.CreateCollection(pb.CreateCollectionRequest(name="conc", dimension=4))
    rng = np.random.default_rng(1)
    data = rng.standard_normal((200, 4)).astype(np.float32)
    await upsert(stub, "conc", [point(f"c{i}", row) for i, row in enumerate(data[:100])])
    writes = upsert(stub, "conc", [point(f"c{i}", row) for i, row in enumerate(data[100:], 100)])
    searches = [stub.Search(pb.SearchRequest(collection="conc", vector=vec(q), top_k=5))
                for q in data[:32]]
    results = await asyncio.gather(writes, *searches)
    assert results[0] == 100 and all(len(r.hits) == 5 for r in results[1:])


# ------------------------------------------------------------------ the commands on Milvus


@pytest.mark.slow
async def test_ingest_and_search_commands_on_milvus(minilm, tmp_path, request, capsys):
    async with contextlib.AsyncExitStack() as stack:
        await _ingest_and_search(stack, minilm, tmp_path, request, capsys)


async def _ingest_and_search(stack, minilm, tmp_path, request, capsys):
    from clients import cli
    from server.servicers.embedding import EmbeddingHop

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "volcano.md").write_text("# Volcanoes\n\nA volcano is a rupture in the crust of a planet.")
    (docs / "more.jsonl").write_text(
        '{"_id": "d1", "text": "Penguins are flightless birds.", "metadata": {"lang": "en"}}\n'
        '{"_id": "d2", "text": "Glaciers are slow rivers of ice.", "metadata": {"lang": "de"}}\n'
    )
    # Split as on a cluster: the embedding hop in its own server, search over Milvus.
    embed_server = await stack.enter_async_context(running(make_config(), [EmbeddingHop(embedder=minilm)]))
    config = store_config("milvus", tmp_path, request, embedding_address=embed_server.address)
    async with running(config, [SearchHop()]) as server:
        address = ["--address", server.address]
        code = await asyncio.to_thread(
            cli.main, ["ingest", str(docs), "--collection", "cli", "--create", "--quiet", *address]
        )
        out = capsys.readouterr().out
        assert code == 0 and "ingested 3 documents" in out and "3 chunks" in out
        code = await asyncio.to_thread(
            cli.main, ["search", "birds that cannot fly", "--collection", "cli", "--top-k", "2", *address]
        )
        lines = capsys.readouterr().out.strip().splitlines()
        assert code == 0 and len(lines) == 2 and "d1#0" in lines[0] and "Penguins" in lines[0]
        code = await asyncio.to_thread(
            cli.main, ["search", "ice", "--collection", "cli", "--eq", "lang=de", "--json", *address]
        )
        out = capsys.readouterr().out.strip().splitlines()
        assert code == 0 and [json.loads(line)["id"] for line in out] == ["d2#0"]
        code = await asyncio.to_thread(
            cli.main, ["search", "ice", "--collection", "cli", "--mode", "hybrid", *address]
        )
        assert code == 1 and "FAILED_PRECONDITION" in capsys.readouterr().err
    # The points live in Milvus: a second hop (fresh data_dir, same Milvus) still finds them.
    config = store_config("milvus", tmp_path / "other", request,
                          milvus_collection_prefix=config.search.milvus_collection_prefix,
                          embedding_address=embed_server.address)
    async with running(config, [SearchHop()]) as server:
        code = await asyncio.to_thread(
            cli.main, ["search", "volcano", "--collection", "cli", "--top-k", "1",
                       "--address", server.address]
        )
        assert code == 0 and "volcano" in capsys.readouterr().out.lower()


def test_milvus_store_flushes_once_writes_pause(milvus_uri):
    import time

    from retrieval.milvus_store import FLUSH_IDLE_S, MilvusStore
    from retrieval.types import Payload, Point, make_spec

    store = MilvusStore(milvus_uri, prefix=f"f{uuid.uuid4().hex[:10]}_")
    store.load()
    try:
        collection = store.create(make_spec("flush", 2))
        assert not collection.snapshot()  # nothing written yet
        collection.upsert([Point("a", np.array([1.0, 0.0], np.float32), Payload("t"))])
        now = time.monotonic()
        assert store.snapshot_due(0) == []  # still writing: no flush yet
        assert collection.flush_due(now + FLUSH_IDLE_S)
        assert collection.snapshot() and not collection.flush_due(now + FLUSH_IDLE_S)
        assert [p.id for p in collection.get(["a"])] == ["a"]
    finally:
        store.close()
