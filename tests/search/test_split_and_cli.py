"""Split deployment (search embeds text over gRPC) and the ingest/search commands."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from clients import cli
from server.servicers.embedding import EmbeddingHop
from server.servicers.search import SearchHop
from tests.conftest import make_config, running
from tests.search.conftest import search_config


async def test_text_search_over_a_remote_embedding_hop(minilm, tmp_path):
    async with running(make_config(), [EmbeddingHop(embedder=minilm)]) as embed_server:
        config = search_config(tmp_path, embedding_address=embed_server.address)
        async with running(config, [SearchHop()]) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.VectorSearchServiceStub(channel)
                await stub.CreateCollection(pb.CreateCollectionRequest(name="remote", dimension=384))

                async def messages():
                    yield pb.IngestRequest(collection="remote", documents=[
                        pb.Document(id="tea", text="Green tea is brewed from unoxidised leaves."),
                        pb.Document(id="moon", text="The Moon orbits the Earth every 27 days."),
                    ])

                response = await stub.Ingest(messages())
                assert response.chunks == 2 and response.chunk_tokens == 254
                res = await stub.Search(pb.SearchRequest(
                    collection="remote", text="how long does the moon take to go around earth",
                    top_k=2, with_vector=True))
                assert res.hits[0].id == "moon#0"
                embed_timing = [t for t in res.timings if t.hop == "embed"]
                assert embed_timing and embed_timing[0].compute_us > 0
                expected = minilm.embed(["The Moon orbits the Earth every 27 days."])[0]
                assert np.allclose(res.hits[0].vector.values, expected / np.linalg.norm(expected), atol=1e-4)


async def test_ingest_and_search_commands(text_server, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "volcano.md").write_text("# Volcanoes\n\nA volcano is a rupture in the crust of a planet.")
    (docs / "notes.txt").write_text("Coffee beans are roasted seeds of the Coffea plant.")
    (docs / "more.jsonl").write_text(
        json.dumps({"_id": "d1", "title": "Penguins", "text": "Penguins are flightless birds.",
                    "metadata": {"lang": "en"}}) + "\n\n"
        + json.dumps({"_id": "d2", "text": "Glaciers are slow rivers of ice.", "metadata": {"lang": "de"}})
        + "\n"
    )
    address = ["--address", text_server.address]
    code = await asyncio.to_thread(
        cli.main, ["ingest", str(docs), "--collection", "cli", "--create", "--quiet", *address]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "ingested 4 documents" in out and "4 chunks" in out and "vectors/s" in out
    code = await asyncio.to_thread(
        cli.main, ["search", "birds that cannot fly", "--collection", "cli", "--top-k", "2", *address]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and "d1#0" in lines[0] and "Penguins" in lines[0]
    code = await asyncio.to_thread(
        cli.main, ["search", "ice", "--collection", "cli", "--eq", "lang=de", "--json",
                   "--mode", "hybrid", *address]
    )
    hits = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 0 and [h["id"] for h in hits] == ["d2#0"]
    code = await asyncio.to_thread(
        cli.main, ["search", "ice", "--collection", "cli", "--eq", "nope=1", *address]
    )
    err = capsys.readouterr().err
    assert code == 1 and "INVALID_FILTER" in err
    code = await asyncio.to_thread(
        cli.main, ["search", "ice", "--collection", "missing", *address]
    )
    assert code == 1 and "COLLECTION_NOT_FOUND" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["ingest", "/nonexistent/path", "--collection", "x"]])
def test_ingest_usage_errors(argv, capsys):
    assert cli.main(argv) == 2
    assert "no such file" in capsys.readouterr().err
