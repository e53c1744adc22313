"""``client.search``: every VectorSearchService RPC, sync and async, against a real server
(the search hop with real FAISS in a temporary data dir, embedding in-process through the
real embedding hop over a word-hash engine: the model is not what these tests check)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from clients import errors
from clients.client import AsyncClient, Client
from clients.search_messages import Document, Eq, In, IndexParams, Point, Query, Range
from server.servicers.embedding import EmbeddingHop
from server.servicers.search import SearchHop
from tests.clients.hop_fakes import DIM, HashEmbedder, word_vector
from tests.conftest import make_config, running

TEXTS = {
    "a": "red apples grow on trees",
    "b": "the blue sea is deep",
    "c": "green grass in the park",
}


@pytest.fixture(scope="module")
async def server(tmp_path_factory):
    """Embedding + search hops in one process (the embedded default)."""
    data = tmp_path_factory.mktemp("collections")
    config = make_config(search={"data_dir": str(data), "faiss_threads": 1,
                                 "faiss_build_threads": 1})
    async with running(config, [EmbeddingHop(embedder=HashEmbedder()), SearchHop()]) as s:
        yield s


def points(ids=TEXTS) -> list[Point]:
    return [
        Point(i, word_vector(TEXTS[i]), text=TEXTS[i], metadata={"n": n, "tag": f"t{i}"})
        for n, i in enumerate(ids)
    ]


async def test_collection_lifecycle_async(server):
    async with AsyncClient(address=server.address) as client:
        made = await client.search.create_collection(
            "life", DIM, metric="inner_product", index_kind="hnsw",
            index_params=IndexParams(hnsw_m=8),
        )
        assert (made.name, made.dimension, made.metric, made.index_kind) == (
            "life", DIM, "inner_product", "hnsw")
        assert made.index_params.hnsw_m == 8 and made.points == 0
        with pytest.raises(errors.CollectionExistsError):
            await client.search.create_collection("life", DIM)
        assert "life" in {c.name for c in await client.search.list_collections()}
        await client.search.upsert_batch("life", points())
        described = await client.search.describe_collection("life")
        assert described.points == 3 and described.disk_bytes > 0
        await client.search.delete_collection("life")
        with pytest.raises(errors.CollectionNotFoundError):
            await client.search.describe_collection("life")
        assert "life" not in {c.name for c in await client.search.list_collections()}


async def test_upserts_get_delete_and_search_async(server):
    async with AsyncClient(address=server.address) as client:
        await client.search.create_collection("docs", DIM, metric="cosine", index_kind="flat")
        written = await client.search.upsert_batch("docs", points(["a"]))
        assert written.upserted == 1 and written.timings

        async def batches():
            yield points(["b"])
            yield points(["c"])

        streamed = await client.search.upsert("docs", batches())
        assert streamed.upserted == 2
        got = await client.search.get("docs", ["b", "zz"], with_vector=True)
        assert [p.id for p in got] == ["b"]
        assert got[0].text == TEXTS["b"] and got[0].metadata["tag"] == "tb"
        stored = word_vector(TEXTS["b"]) / np.linalg.norm(word_vector(TEXTS["b"]))  # cosine
        np.testing.assert_allclose(got[0].vector, stored, rtol=1e-4, atol=1e-6)

        by_vector = await client.search.search(
            "docs", word_vector(TEXTS["c"]), top_k=2, with_payload=True, with_vector=True
        )
        assert by_vector.hits[0].id == "c" and by_vector.hits[0].score == pytest.approx(1, 1e-5)
        assert by_vector.hits[0].text == TEXTS["c"] and by_vector.hits[0].vector.shape == (DIM,)
        by_text = await client.search.search("docs", text="blue sea", top_k=1)
        assert by_text.hits[0].id == "b" and by_text.hits[0].text == ""  # no payload asked
        assert [t.hop for t in by_text.timings][:1] == ["embed"]
        filtered = await client.search.search(
            "docs", text="red apples", top_k=3, filter=[In("tag", ["tb", "tc"]), Range("n", lte=0)],
        )
        assert {h.id for h in filtered.hits} == {"b", "c"}  # each upserted alone: n=0
        only_c = await client.search.search("docs", text="grass", filter=[Eq("tag", "tc")])
        assert [h.id for h in only_c.hits] == ["c"]
        keyword = await client.search.search("docs", text="deep", mode="keyword")
        assert [h.id for h in keyword.hits] == ["b"]

        batch = await client.search.search_batch([
            Query("docs", text="red apples", top_k=1),
            Query("docs", vector=word_vector(TEXTS["b"]), top_k=1),
        ])
        assert [r.hits[0].id for r in batch.results] == ["a", "b"]
        assert await client.search.delete("docs", ["a", "nope"]) == 1
        assert await client.search.get("docs", ["a"]) == ()
        with pytest.raises(errors.DimensionMismatchError):
            await client.search.search("docs", [1.0, 2.0])
        with pytest.raises(errors.InvalidFilterError):
            await client.search.search("docs", text="x", filter=[Range("n")])


async def test_ingest_async_then_find_the_chunks(server):
    async with AsyncClient(address=server.address) as client:
        await client.search.create_collection("kb", DIM, index_kind="flat")
        docs = [Document(f"d{i}", f"document {i} talks about topic{i} " * 3,
                         {"i": i}) for i in range(40)]  # more than one message (32 per)
        result = await client.search.ingest("kb", docs, chunk_tokens=64, overlap_tokens=8)
        assert result.documents == 40 and result.chunks >= 40
        assert (result.chunk_tokens, result.overlap_tokens) == (64, 8)
        hits = await client.search.search("kb", text="topic7 topic7", top_k=1, with_payload=True)
        assert "topic7" in hits.hits[0].text


async def test_every_rpc_sync(server):
    def calls():
        with Client(address=server.address) as client:
            s = client.search
            made = s.create_collection("sync", DIM, index_kind="flat")
            assert made.metric == "cosine"  # the server's default
            assert s.upsert_batch("sync", points(["a"])).upserted == 1
            assert s.upsert("sync", iter([points(["b"]), points(["c"])])).upserted == 2
            assert s.describe_collection("sync").points == 3
            assert "sync" in {c.name for c in s.list_collections()}
            assert [p.id for p in s.get("sync", ["a", "c"])] == ["a", "c"]
            assert s.search("sync", text="blue sea", top_k=1).hits[0].id == "b"
            hit = s.search("sync", word_vector(TEXTS["a"]), top_k=1).hits[0]
            assert hit.id == "a"
            batch = s.search_batch([Query("sync", text="grass park", top_k=1)])
            assert batch.results[0].hits[0].id == "c"
            ingested = s.ingest("sync", [Document("doc", "apples and oranges")])
            assert ingested.documents == 1 and ingested.chunks == 1
            assert s.delete("sync", ["a"]) == 1
            s.delete_collection("sync")
            with pytest.raises(errors.CollectionNotFoundError):
                s.get("sync", ["a"])

    await asyncio.to_thread(calls)


def test_query_needs_exactly_one_of_vector_and_text():
    from clients.search_messages import build_search_request

    with pytest.raises(ValueError):
        build_search_request(Query("c"))
    with pytest.raises(ValueError):
        build_search_request(Query("c", vector=[1.0], text="x"))
    with pytest.raises(ValueError):
        build_search_request(Query("c", text="x", mode="fuzzy"))
