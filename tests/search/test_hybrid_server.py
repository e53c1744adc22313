"""Hybrid search through a real server: fusion choice per request and by config, the
stemming option, a keyword index fresh right after writes, re-ingestion with fewer chunks."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from retrieval.types import CollectionSpec
from server.config import ConfigError
from server.servicers.embedding import EmbeddingHop
from server.servicers.search import SearchHop
from tests.conftest import make_config, running
from tests.search.conftest import expect_error, search_config
from tests.search.test_search_server import DOCS, ingest, make, point

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def hybrid(text, fusion=pb.FUSION_METHOD_UNSPECIFIED, weight=None, top_k=3):
    params = pb.SearchParams(fusion=fusion)
    if weight is not None:
        params.dense_weight = weight
    return pb.SearchRequest(collection="hy", text=text, top_k=top_k, mode=pb.SEARCH_MODE_HYBRID, params=params)


async def test_fusion_methods_per_request(text_stub):
    await make(text_stub, "hy", 384)
    await ingest(text_stub, "hy", DOCS)
    # "programming language" is python#0 first in both rankings.
    rrf = await text_stub.Search(hybrid("programming language", pb.FUSION_METHOD_RRF))
    assert rrf.hits[0].id == "python#0" and rrf.hits[0].score == pytest.approx(2 / 61)
    for method in (pb.FUSION_METHOD_UNSPECIFIED, pb.FUSION_METHOD_CONVEX_MINMAX):
        res = await text_stub.Search(hybrid("programming language", method))
        assert res.hits[0].id == "python#0" and res.hits[0].score == pytest.approx(1.0)
        assert all(0.0 <= h.score <= 1.0 for h in res.hits)
    z = await text_stub.Search(hybrid("programming language", pb.FUSION_METHOD_CONVEX_ZSCORE))
    assert z.hits[0].id == "python#0" and z.hits[0].score > 0
    # The weight matters: keyword only ranks only what BM25 matched first.
    kw_only = await text_stub.Search(hybrid("flour yeast", pb.FUSION_METHOD_CONVEX_MINMAX, 0.0, 1))
    assert [h.id for h in kw_only.hits] == ["bread#0"]
    dense_only = await text_stub.Search(hybrid("capital of France", pb.FUSION_METHOD_RRF, 1.0, 1))
    assert [h.id for h in dense_only.hits] == ["paris#0"]
    for bad in (-0.5, 1.5, float("nan")):
        await expect_error(text_stub.Search(hybrid("x", weight=bad)), INVALID, "INVALID_INPUT")
    await expect_error(text_stub.Search(hybrid("x", fusion=99)), INVALID, "INVALID_INPUT")


async def test_config_default_fusion(minilm, tmp_path):
    config = search_config(tmp_path, fusion="rrf")
    async with running(config, [EmbeddingHop(embedder=minilm), SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.VectorSearchServiceStub(channel)
            await make(stub, "hy", 384)
            await ingest(stub, "hy", DOCS)
            res = await stub.Search(hybrid("programming language"))
            assert res.hits[0].id == "python#0" and res.hits[0].score == pytest.approx(2 / 61)
    for bad in ({"fusion": "sum"}, {"dense_weight": 2.0}, {"rrf_k": 0}):
        with pytest.raises(ConfigError):
            make_config(search=bad)


async def keyword(stub, collection, text, k=5):
    res = await stub.Search(pb.SearchRequest(
        collection=collection, text=text, top_k=k, mode=pb.SEARCH_MODE_KEYWORD))
    return [h.id for h in res.hits]


async def test_stemming_option(text_stub):
    stemmed = await make(text_stub, "stem", 4)
    plain = await make(text_stub, "nostem", 4, stemming=pb.STEMMING_NONE)
    assert stemmed.stemming == pb.STEMMING_ENGLISH and plain.stemming == pb.STEMMING_NONE
    for name in ("stem", "nostem"):
        await text_stub.UpsertBatch(pb.UpsertBatchRequest(collection=name, points=[
            point("a", [1, 0, 0, 0], "How to rotate an image"),
            point("b", [0, 1, 0, 0], "Cats sleep all day"),
        ]))
    assert await keyword(text_stub, "stem", "rotating images") == ["a"]
    assert await keyword(text_stub, "nostem", "rotating images") == []
    assert await keyword(text_stub, "nostem", "rotate") == ["a"]
    described = await text_stub.DescribeCollection(pb.DescribeCollectionRequest(name="nostem"))
    assert described.collection.stemming == pb.STEMMING_NONE
    await expect_error(
        text_stub.CreateCollection(pb.CreateCollectionRequest(name="bad", dimension=4, stemming=7)),
        INVALID, "INVALID_INPUT",
    )


def test_specs_without_the_option_load_unstemmed():
    spec = CollectionSpec("old", 4).to_dict()
    del spec["stemming"]
    assert CollectionSpec.from_dict(spec).stemming is False
    assert CollectionSpec.from_dict(CollectionSpec("new", 4).to_dict()).stemming is True


async def test_keyword_index_is_fresh_right_after_writes(text_stub):
    rng = np.random.default_rng(3)
    await make(text_stub, "fresh", 4)
    await text_stub.UpsertBatch(pb.UpsertBatchRequest(collection="fresh", points=[
        point(f"p{i}", rng.standard_normal(4), f"passage {i} about apples") for i in range(200)
    ]))
    assert len(await keyword(text_stub, "fresh", "apples")) == 5  # builds the index
    await text_stub.UpsertBatch(pb.UpsertBatchRequest(collection="fresh", points=[
        point("new", rng.standard_normal(4), "a zebra crossing"),
    ]))
    assert await keyword(text_stub, "fresh", "zebra") == ["new"]
    # Replacing a point's text: the old words no longer find it, the new ones do.
    await text_stub.UpsertBatch(pb.UpsertBatchRequest(collection="fresh", points=[
        point("new", rng.standard_normal(4), "a giraffe"),
    ]))
    assert await keyword(text_stub, "fresh", "zebra") == []
    assert await keyword(text_stub, "fresh", "giraffe") == ["new"]
    await text_stub.Delete(pb.DeleteRequest(collection="fresh", ids=["new"]))
    assert await keyword(text_stub, "fresh", "giraffe") == []


async def test_reingest_with_fewer_chunks_removes_the_old_ones(text_stub):
    await make(text_stub, "re", 384)
    long_text = " ".join(f"word{i}" for i in range(40))
    first = await ingest(text_stub, "re", {"doc": long_text, "other": "untouched text here"},
                         chunk_tokens=8, overlap_tokens=0)
    n_old = first.chunks - 1
    assert n_old >= 4
    await ingest(text_stub, "re", {"doc": "now short"}, chunk_tokens=8, overlap_tokens=0)
    ids = [f"doc#{i}" for i in range(n_old + 2)]
    got = await text_stub.Get(pb.GetRequest(collection="re", ids=ids + ["other#0"]))
    assert [p.id for p in got.points] == ["doc#0", "other#0"]
    assert got.points[0].payload.text == "now short"
    info = await text_stub.DescribeCollection(pb.DescribeCollectionRequest(name="re"))
    assert info.collection.points == 2
    assert await keyword(text_stub, "re", "word7") == []
