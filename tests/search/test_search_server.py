"""VectorSearchService through a real grpc.aio server (embedding + search in one process,
real MiniLM, real FAISS): the RPCs, text queries, ingestion, and bad input."""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from backbone.v1 import common_pb2
from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from server.servicers.search import SearchHop
from tests.conftest import running
from tests.search.conftest import expect_error, search_config

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def vec(values) -> common_pb2.Vector:
    return common_pb2.Vector(values=list(map(float, values)))


def point(pid, values, text="", **meta) -> pb.Point:
    p = pb.Point(id=pid, vector=vec(values), payload=pb.Payload(text=text))
    if meta:
        p.payload.metadata.update(meta)
    return p


async def make(stub, name, dim, **kw):
    return (await stub.CreateCollection(pb.CreateCollectionRequest(name=name, dimension=dim, **kw))).collection


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


async def test_collection_lifecycle_and_defaults(text_stub):
    info = await make(text_stub, "life", 8)
    assert info.metric == pb.METRIC_COSINE and info.index_kind == pb.INDEX_KIND_HNSW
    assert info.index_params.hnsw_m == 32 and info.index_params.ef_construction == 80
    assert info.trained and info.points == 0 and info.disk_bytes > 0
    ivf = await make(text_stub, "life-ivf", 16, metric=pb.METRIC_L2, index_kind=pb.INDEX_KIND_IVF_PQ)
    assert not ivf.trained and ivf.index_params.pq_m == 2
    await expect_error(
        text_stub.CreateCollection(pb.CreateCollectionRequest(name="life", dimension=8)),
        grpc.StatusCode.ALREADY_EXISTS, "COLLECTION_EXISTS",
    )
    names = [c.name for c in (await text_stub.ListCollections(pb.ListCollectionsRequest())).collections]
    assert "life" in names and "life-ivf" in names and names == sorted(names)
    described = await text_stub.DescribeCollection(pb.DescribeCollectionRequest(name="life"))
    assert described.collection.dimension == 8
    await text_stub.DeleteCollection(pb.DeleteCollectionRequest(name="life"))
    await expect_error(
        text_stub.DescribeCollection(pb.DescribeCollectionRequest(name="life")),
        grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND",
    )
    await expect_error(
        text_stub.DeleteCollection(pb.DeleteCollectionRequest(name="life")),
        grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND",
    )


@pytest.mark.parametrize(
    "request_",
    [
        pb.CreateCollectionRequest(name="bad name!", dimension=8),
        pb.CreateCollectionRequest(name="", dimension=8),
        pb.CreateCollectionRequest(name="zero", dimension=0),
        pb.CreateCollectionRequest(name="huge", dimension=5000),
        pb.CreateCollectionRequest(name="pq", dimension=10, index_kind=pb.INDEX_KIND_IVF_PQ,
                                   index_params=pb.IndexParams(pq_m=3)),
        pb.CreateCollectionRequest(name="enum", dimension=8, metric=42),
    ],
)
async def test_bad_create_writes_nothing(text_stub, request_):
    await expect_error(text_stub.CreateCollection(request_), INVALID, "INVALID_INPUT")
    listed = await text_stub.ListCollections(pb.ListCollectionsRequest())
    assert request_.name not in [c.name for c in listed.collections]


async def test_upsert_stream_get_delete_search(text_stub, rng):
    await make(text_stub, "pts", 8, metric=pb.METRIC_L2)
    x = rng.standard_normal((300, 8)).astype(np.float32)

    async def messages():
        for start in range(0, 300, 100):
            yield pb.UpsertRequest(
                collection="pts",
                points=[point(f"p{i}", x[i], f"text {i}", n=i, even=i % 2 == 0)
                        for i in range(start, start + 100)],
            )

    response = await text_stub.Upsert(messages())
    assert response.upserted == 300 and response.timings[0].hop == "search"
    got = await text_stub.Get(pb.GetRequest(collection="pts", ids=["p3", "nope", "p1"], with_vector=True))
    assert [p.id for p in got.points] == ["p3", "p1"]
    assert got.points[0].payload.text == "text 3"
    assert got.points[0].payload.metadata["n"] == 3 and got.points[0].payload.metadata["even"] is False
    assert np.allclose(got.points[0].vector.values, x[3])
    res = await text_stub.Search(pb.SearchRequest(
        collection="pts", vector=vec(x[10]), top_k=3, with_payload=True, with_vector=True))
    assert res.hits[0].id == "p10" and res.hits[0].score == pytest.approx(0, abs=1e-4)
    assert res.hits[0].payload.text == "text 10" and len(res.hits[0].vector.values) == 8
    assert [t.hop for t in res.timings] == ["search"] and res.timings[0].total_us > 0
    no_payload = await text_stub.Search(pb.SearchRequest(collection="pts", vector=vec(x[10]), top_k=1))
    assert not no_payload.hits[0].HasField("payload")
    flt = pb.Filter(must=[
        pb.Condition(field="even", equals=struct_pb2.Value(bool_value=True)),
        pb.Condition(field="n", range=pb.Range(gte=100, lt=200)),
    ])
    res = await text_stub.Search(pb.SearchRequest(
        collection="pts", vector=vec(x[11]), top_k=20, filter=flt, with_payload=True))
    assert len(res.hits) == 20
    assert all(h.payload.metadata["even"] and 100 <= h.payload.metadata["n"] < 200 for h in res.hits)
    deleted = await text_stub.Delete(pb.DeleteRequest(collection="pts", ids=["p10", "p10", "zz"]))
    assert deleted.deleted == 1
    res = await text_stub.Search(pb.SearchRequest(collection="pts", vector=vec(x[10]), top_k=1))
    assert res.hits[0].id != "p10"
    info = await text_stub.DescribeCollection(pb.DescribeCollectionRequest(name="pts"))
    assert info.collection.points == 299
    batch = await text_stub.UpsertBatch(pb.UpsertBatchRequest(
        collection="pts", points=[point("p10", x[10]), point("new", x[0] + 5)]))
    assert batch.upserted == 2
    info = await text_stub.DescribeCollection(pb.DescribeCollectionRequest(name="pts"))
    assert info.collection.points == 301


async def test_search_batch_across_collections(text_stub, rng):
    a = rng.standard_normal((50, 4)).astype(np.float32)
    b = rng.standard_normal((50, 6)).astype(np.float32)
    await make(text_stub, "ba", 4)
    await make(text_stub, "bb", 6, index_kind=pb.INDEX_KIND_FLAT)
    await text_stub.UpsertBatch(pb.UpsertBatchRequest(collection="ba", points=[point(f"a{i}", a[i]) for i in range(50)]))
    await text_stub.UpsertBatch(pb.UpsertBatchRequest(collection="bb", points=[point(f"b{i}", b[i]) for i in range(50)]))
    searches = []
    for i in range(0, 50, 5):
        searches.append(pb.SearchRequest(collection="ba", vector=vec(a[i]), top_k=1))
        searches.append(pb.SearchRequest(collection="bb", vector=vec(b[i]), top_k=2))
    res = await text_stub.SearchBatch(pb.SearchBatchRequest(searches=searches))
    assert len(res.results) == 20
    for j, result in enumerate(res.results):
        i = (j // 2) * 5
        assert result.hits[0].id == (f"a{i}" if j % 2 == 0 else f"b{i}")
        assert len(result.hits) == (1 if j % 2 == 0 else 2)
    assert any(t.hop == "search" and t.batch_size == 20 for t in res.timings)


async def test_bad_input_is_rejected_with_reason_and_writes_nothing(text_stub, rng):
    await make(text_stub, "bad", 4)
    good = [point(f"g{i}", rng.standard_normal(4), "x", tag="t") for i in range(3)]
    await text_stub.UpsertBatch(pb.UpsertBatchRequest(collection="bad", points=good))
    cases = [
        (pb.UpsertBatchRequest(collection="bad", points=[*good, point("w", [1, 2, 3])]), INVALID, "DIMENSION_MISMATCH"),
        (pb.UpsertBatchRequest(collection="bad", points=[point("n", [1, math.nan, 0, 0]), *good]), INVALID, "INVALID_VECTOR"),
        (pb.UpsertBatchRequest(collection="bad", points=[point("i", [1, math.inf, 0, 0])]), INVALID, "INVALID_VECTOR"),
        (pb.UpsertBatchRequest(collection="bad", points=[point("", [1, 0, 0, 0])]), INVALID, "INVALID_INPUT"),
        (pb.UpsertBatchRequest(collection="bad", points=[point("x" * 300, [1, 0, 0, 0])]), INVALID, "INVALID_INPUT"),
        (pb.UpsertBatchRequest(collection="bad", points=[point(f"m{i}", [1, 0, 0, 0]) for i in range(1025)]), INVALID, "TOO_MANY_INPUTS"),
        (pb.UpsertBatchRequest(collection="bad", points=[pb.Point(id="t", vector=vec([1, 0, 0, 0]), payload=pb.Payload(text="x" * 70000))]), INVALID, "INPUT_TOO_LARGE"),
        (pb.UpsertBatchRequest(collection="nope", points=good), grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND"),
    ]
    for request, code, reason in cases:
        await expect_error(text_stub.UpsertBatch(request), code, reason)
    info = await text_stub.DescribeCollection(pb.DescribeCollectionRequest(name="bad"))
    assert info.collection.points == 3  # nothing half-written
    got = await text_stub.Get(pb.GetRequest(collection="bad", ids=["w", "n", "i", "t", "m0"]))
    assert list(got.points) == []

    q = vec([1, 0, 0, 0])
    searches = [
        (pb.SearchRequest(collection="bad", vector=vec([1, 0, 0]), top_k=1), INVALID, "DIMENSION_MISMATCH"),
        (pb.SearchRequest(collection="bad", vector=vec([1, math.nan, 0, 0]), top_k=1), INVALID, "INVALID_VECTOR"),
        (pb.SearchRequest(collection="bad", vector=q, top_k=0), INVALID, "INVALID_TOP_K"),
        (pb.SearchRequest(collection="bad", vector=q, top_k=10**9), INVALID, "INVALID_TOP_K"),
        (pb.SearchRequest(collection="bad", vector=q, top_k=1001), INVALID, "INVALID_TOP_K"),
        (pb.SearchRequest(collection="nope", vector=q, top_k=1), grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND"),
        (pb.SearchRequest(collection="bad", vector=q, top_k=1,
                          filter=pb.Filter(must=[pb.Condition(field="unknown", equals=struct_pb2.Value(string_value="t"))])),
         INVALID, "INVALID_FILTER"),
        (pb.SearchRequest(collection="bad", vector=q, top_k=1, filter=pb.Filter(must=[pb.Condition(field="tag")])),
         INVALID, "INVALID_FILTER"),
        (pb.SearchRequest(collection="bad", vector=q, top_k=1,
                          filter=pb.Filter(must=[pb.Condition(field="tag", range=pb.Range())])),
         INVALID, "INVALID_FILTER"),
        (pb.SearchRequest(collection="bad", vector=q, top_k=1,
                          filter=pb.Filter(must=[pb.Condition(field="tag", equals=struct_pb2.Value(null_value=0))])),
         INVALID, "INVALID_FILTER"),
        (pb.SearchRequest(collection="bad", top_k=1), INVALID, "EMPTY_INPUT"),
        (pb.SearchRequest(collection="bad", text="  ", top_k=1), INVALID, "EMPTY_INPUT"),
        (pb.SearchRequest(collection="bad", vector=q, top_k=1, mode=pb.SEARCH_MODE_KEYWORD), INVALID, "INVALID_INPUT"),
        (pb.SearchRequest(collection="bad", vector=q, top_k=1, params=pb.SearchParams(ef_search=10**6)), INVALID, "INVALID_INPUT"),
        # A text query on a 4-d collection: the 384-d model does not fit it.
        (pb.SearchRequest(collection="bad", text="hello", top_k=1), INVALID, "DIMENSION_MISMATCH"),
    ]
    for request, code, reason in searches:
        await expect_error(text_stub.Search(request), code, reason)
    await expect_error(
        text_stub.SearchBatch(pb.SearchBatchRequest(searches=[pb.SearchRequest(collection="bad", vector=q, top_k=1)] * 257)),
        INVALID, "TOO_MANY_INPUTS",
    )
    await expect_error(text_stub.Delete(pb.DeleteRequest(collection="bad")), INVALID, "EMPTY_INPUT")
    ok = await text_stub.Search(pb.SearchRequest(collection="bad", vector=q, top_k=1000))
    assert len(ok.hits) == 3


async def test_upsert_stream_with_a_bad_message_keeps_the_good_ones(text_stub):
    await make(text_stub, "stream-bad", 2)

    async def messages():
        yield pb.UpsertRequest(collection="stream-bad", points=[point("a", [1, 0]), point("b", [0, 1])])
        yield pb.UpsertRequest(collection="stream-bad", points=[point("c", [1, 1]), point("d", [1, 2, 3])])

    await expect_error(text_stub.Upsert(messages()), INVALID, "DIMENSION_MISMATCH")
    got = await text_stub.Get(pb.GetRequest(collection="stream-bad", ids=["a", "b", "c", "d"]))
    # Each message is all-or-nothing; the first was durable before the second arrived.
    assert [p.id for p in got.points] == ["a", "b"]

    async def other_collection():
        yield pb.UpsertRequest(collection="stream-bad", points=[point("e", [1, 0])])
        yield pb.UpsertRequest(collection="pts", points=[point("f", [1, 0])])

    await expect_error(text_stub.Upsert(other_collection()), INVALID, "INVALID_INPUT")


DOCS = {
    "fox": "The quick brown fox jumps over the lazy dog near the river bank.",
    "python": "Python is a programming language that lets you work quickly and integrate systems.",
    "paris": "Paris is the capital and most populous city of France.",
    "bread": "To bake bread, mix flour, water, salt and yeast, knead the dough and let it rise.",
}


async def ingest(stub, collection, docs, **chunking):
    async def messages():
        items = list(docs.items())
        for start in range(0, len(items), 2):
            yield pb.IngestRequest(
                collection=collection,
                documents=[pb.Document(id=k, text=v) for k, v in items[start : start + 2]],
                chunking=pb.ChunkingParams(**chunking),
            )

    return await stub.Ingest(messages())


async def test_ingest_then_text_search_in_every_mode(text_stub, minilm):
    await make(text_stub, "docs", 384)
    long_doc = " ".join(f"Sentence number {i} is about gardening and tomatoes." for i in range(120))
    response = await ingest(text_stub, "docs", {**DOCS, "garden": long_doc})
    assert response.documents == 5
    assert response.chunk_tokens == 254 and response.overlap_tokens == 50
    assert response.chunks > 6  # the long document spans several windows
    assert {t.hop for t in response.timings} == {"embed", "search"}
    got = await text_stub.Get(pb.GetRequest(collection="docs", ids=["fox#0", "garden#1", "fox#1"]))
    assert [p.id for p in got.points] == ["fox#0", "garden#1"]
    assert got.points[0].payload.text == DOCS["fox"]

    res = await text_stub.Search(pb.SearchRequest(
        collection="docs", text="What is the capital of France?", top_k=3, with_payload=True))
    assert res.hits[0].id == "paris#0"
    assert [t.hop for t in res.timings] == ["embed", "search"]
    # The stored vector is MiniLM's (normalised, cosine collection) for the chunk text.
    expected = minilm.embed([DOCS["paris"]])[0]
    got = await text_stub.Get(pb.GetRequest(collection="docs", ids=["paris#0"], with_vector=True))
    stored = np.array(got.points[0].vector.values)
    assert np.allclose(stored, expected / np.linalg.norm(expected), atol=1e-4)

    kw = await text_stub.Search(pb.SearchRequest(
        collection="docs", text="flour yeast dough", top_k=3, mode=pb.SEARCH_MODE_KEYWORD))
    assert [h.id for h in kw.hits] == ["bread#0"]
    hy = await text_stub.Search(pb.SearchRequest(
        collection="docs", text="programming language", top_k=2, mode=pb.SEARCH_MODE_HYBRID,
        params=pb.SearchParams(fusion=pb.FUSION_METHOD_RRF)))
    assert hy.hits[0].id == "python#0" and hy.hits[0].score == pytest.approx(2 / 61)

    batch = await text_stub.SearchBatch(pb.SearchBatchRequest(searches=[
        pb.SearchRequest(collection="docs", text="a dog and a fox", top_k=1),
        pb.SearchRequest(collection="docs", text="baking", top_k=1, mode=pb.SEARCH_MODE_HYBRID),
        pb.SearchRequest(collection="docs", vector=vec(expected), top_k=1),
    ]))
    assert [r.hits[0].id for r in batch.results] == ["fox#0", "bread#0", "paris#0"]


async def test_ingest_bad_input(text_stub):
    await make(text_stub, "small", 8)
    await expect_error(ingest(text_stub, "small", {"a": "text"}), INVALID, "DIMENSION_MISMATCH")
    await expect_error(ingest(text_stub, "missing", {"a": "text"}), grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND")
    await make(text_stub, "ing", 384)
    await expect_error(ingest(text_stub, "ing", {"a": "text"}, chunk_tokens=100, overlap_tokens=100), INVALID, "INVALID_INPUT")
    await expect_error(ingest(text_stub, "ing", {"a": "   "}), INVALID, "EMPTY_INPUT")
    info = await text_stub.DescribeCollection(pb.DescribeCollectionRequest(name="ing"))
    assert info.collection.points == 0
    res = await ingest(text_stub, "ing", {"": "a document without an id"}, chunk_tokens=3, overlap_tokens=1)
    assert res.chunk_tokens == 3 and res.chunks == 2  # 5 tokens: windows [0,3) and [2,5)


async def test_points_survive_a_restart(tmp_path, rng):
    config = search_config(tmp_path)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    async with running(config, [SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.VectorSearchServiceStub(channel)
            await make(stub, "keep", 8, index_kind=pb.INDEX_KIND_IVF_FLAT, index_params=pb.IndexParams(nlist=2))
            await stub.UpsertBatch(pb.UpsertBatchRequest(collection="keep", points=[point(f"k{i}", x[i]) for i in range(100)]))
            await expect_error(stub.Search(pb.SearchRequest(collection="keep", text="hi", top_k=1)),
                               grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")  # no embedding hop here
    async with running(config, [SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.VectorSearchServiceStub(channel)
            info = (await stub.DescribeCollection(pb.DescribeCollectionRequest(name="keep"))).collection
            assert info.points == 100 and info.trained and info.index_params.nlist == 2
            res = await stub.Search(pb.SearchRequest(collection="keep", vector=vec(x[42]), top_k=1))
            assert res.hits[0].id == "k42"


async def test_a_failing_snapshot_turns_the_hop_unhealthy(tmp_path, monkeypatch):
    from retrieval.collection import Collection

    def broken(self):
        raise OSError("disk full")

    config = search_config(tmp_path, snapshot_min_log_bytes=1, snapshot_log_ratio=0)
    hop = SearchHop()
    async with running(config, [hop]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.VectorSearchServiceStub(channel)
            await make(stub, "snap", 2)
            assert hop.healthy()
            monkeypatch.setattr(Collection, "snapshot", broken)
            await stub.UpsertBatch(pb.UpsertBatchRequest(collection="snap", points=[point("a", [1, 0])]))
            for _ in range(100):  # the snapshot loop checks every second
                if not hop.healthy():
                    break
                await asyncio.sleep(0.05)
            assert not hop.healthy()
            monkeypatch.undo()
