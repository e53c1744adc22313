"""perf.embed_single: the interleaved single-caller comparison against a real server."""

from __future__ import annotations

import asyncio

from perf.embed_single import run_interleaved
from server.servicers.embedding import EmbeddingHop
from tests.conftest import make_config, running


async def test_interleaved_blocks_time_both_sides_on_the_same_texts(minilm, msmarco_dir):
    async with running(make_config(), [EmbeddingHop(embedder=minilm)]) as server:
        result = await asyncio.to_thread(
            run_interleaved, server.address, 2, 3, msmarco_dir / "corpus.jsonl", 0, 10.0, "torch"
        )
    # Two rounds of three calls a side; the server's own compute time comes back too.
    assert result["inprocess_ms"]["count"] == result["server_ms"]["count"] == 6
    assert result["server_reported_compute_ms"]["count"] == 6
    assert 0 < result["server_reported_compute_ms"]["p50"] <= result["server_ms"]["p50"]
    assert result["overhead_p50_ms"] == round(result["server_ms"]["p50"] - result["inprocess_ms"]["p50"], 3)
    assert result["engine"] == "torch"

