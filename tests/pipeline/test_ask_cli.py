"""``backbone ask`` as a new user would run it: ``backbone ingest docs/ --collection notes
--create``, then ``backbone ask "..." --collection notes`` streams a cited answer and the
numbered sources; ``--stats`` names the hops' timings, the cache and the model.

Embedding (MiniLM), search (FAISS) and rerank (the default MaxSim over MiniLM) are the
real hops in the server's process; generation is a scripted hop over gRPC: a vLLM engine
takes tens of seconds to start on these machines, more than this test's budget, and the
answer's wording is not what is tested (the pipeline's generation is covered by the
generation tests and perf/pipeline_bench.py).
"""

from __future__ import annotations

import asyncio

from backbone.v1 import generation_service_pb2_grpc as gen_grpc
from clients import cli
from server.config import load_config
from server.servicers.embedding import EmbeddingHop
from server.servicers.pipeline import PipelineHop
from server.servicers.rerank import RerankHop
from server.servicers.search import SearchHop
from tests.conftest import running
from tests.pipeline.fakes import FakeGeneration, HopScript, start_fake

DOCS = {
    "green.md": "# Green tea\n\nGreen tea is made from unoxidised leaves of Camellia sinensis.",
    "coffee.txt": "Coffee beans are the roasted seeds of the Coffea plant.",
    "glacier.md": "# Glaciers\n\nGlaciers are slow rivers of ice that carve valleys.",
}


async def test_ingest_then_ask_streams_a_cited_answer(minilm, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    script = HopScript(answer=("Green tea is made ", "from unoxidised leaves ", "[1]."))
    fake = await start_fake([(gen_grpc.add_GenerationServiceServicer_to_server, FakeGeneration(script))])
    config = load_config(overrides={
        "server": {"port": 0, "metrics_port": 0, "grace_seconds": 2},
        "search": {"data_dir": str(tmp_path / "data"), "faiss_threads": 1, "faiss_build_threads": 1},
        "upstream": {"generation_address": fake.address},
    })
    hops = [EmbeddingHop(embedder=minilm), SearchHop(), RerankHop(), PipelineHop()]
    try:
        async with running(config, hops) as server:
            address = ["--address", server.address]
            code = await asyncio.to_thread(
                cli.main, ["ingest", str(docs), "--collection", "notes", "--create", "--quiet", *address]
            )
            assert code == 0, capsys.readouterr().err
            capsys.readouterr()
            ask = ["ask", "what is green tea made from?", "--collection", "notes", "--top-n", "2",
                   "--temperature", "0", "--stats", *address]
            code = await asyncio.to_thread(cli.main, ask)
            first = capsys.readouterr()
            code_again = await asyncio.to_thread(cli.main, ask)
            again = capsys.readouterr()
            missing = await asyncio.to_thread(
                cli.main, ["ask", "anything", "--collection", "nope", *address]
            )
            missing_err = capsys.readouterr().err
    finally:
        await fake.stop()
    assert code == 0, first.err
    answer, _, sources = first.out.partition("\nSources:\n")
    assert answer.strip() == "Green tea is made from unoxidised leaves [1]."
    lines = sources.strip().splitlines()
    # Two numbered sources, the relevant document first, with both scores.
    assert len(lines) == 2 and lines[0].startswith("[1] ") and lines[1].startswith("[2] ")
    assert "green.md" in lines[0] and "unoxidised" in lines[0] and "rerank" in lines[0]
    # The prompt numbered the same passages the command printed.
    [request] = script.generations
    prompt = "\n".join(m.content for m in request.messages)
    assert "[1]" in prompt and "[2]" in prompt and "unoxidised" in prompt
    stats = first.err
    assert "model=fake-default" in stats and "cache_hit=false" in stats
    for hop in ("embed=", "search=", "rerank=", "generate=", "pipeline="):
        assert hop in stats
    assert "degradations: none" in stats
    # The same question again: the semantic cache answers (deterministic sampling).
    assert code_again == 0 and "cache_hit=true" in again.err
    assert again.out == first.out and len(script.generations) == 1
    assert missing == 1 and "COLLECTION_NOT_FOUND" in missing_err
