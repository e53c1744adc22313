"""perf.embed_single: the interleaved single-caller comparison against a real server."""

from __future__ import annotations

import asyncio

from perf.embed_single import run_interleaved
from server.servicers.embedding import EmbeddingHop
from tests.conftest import make_config, running


async def test_interleaved_blocks_time_both_sides_on_the_same_texts(minilm, msmarco_dir, echo_target):
    async with running(make_config(), [EmbeddingHop(embedder=minilm)]) as server:
        result = await asyncio.to_thread(
            run_interleaved, server.address, 2, 3, msmarco_dir / "corpus.jsonl", 0, 10.0, "torch",
            echo_target,
        )
    # Two rounds of three calls a side; the server's own compute time comes back too.
    assert result["inprocess_ms"]["count"] == result["server_ms"]["count"] == 6
    assert result["server_reported_compute_ms"]["count"] == 6
    assert 0 < result["server_reported_compute_ms"]["p50"] <= result["server_ms"]["p50"]
    assert result["overhead_p50_ms"] == round(result["server_ms"]["p50"] - result["inprocess_ms"]["p50"], 3)
    assert result["engine"] == "torch"
    # The echo server held each floor call as long as an in-process encode, and answered
    # no sooner than that.
    floor = result["rpc_floor"]
    assert floor["rtt_ms"]["count"] == floor["held_ms"]["count"] == 6
    assert floor["held_ms"]["p50"] > 1.0  # a MiniLM encode, not zero
    assert floor["rtt_ms"]["p50"] >= floor["held_ms"]["p50"]
    assert floor["overhead_p50_ms"] == round(floor["rtt_ms"]["p50"] - floor["held_ms"]["p50"], 3)


async def test_interleaved_without_an_echo_target_has_no_floor(minilm, msmarco_dir):
    async with running(make_config(), [EmbeddingHop(embedder=minilm)]) as server:
        result = await asyncio.to_thread(
            run_interleaved, server.address, 1, 2, msmarco_dir / "corpus.jsonl", 0, 10.0, "torch"
        )
    assert result["rpc_floor"] is None and result["server_ms"]["count"] == 2

