"""Admission by deadline on the embedded default, with the real bundled MiniLM.

The embedding hop as ``backbone serve`` runs it (default config: ONNX engine, one lane)
on a real grpc.aio server on port 0. Concurrent callers of one MS MARCO passage each,
10 s deadlines, closed loop, no backoff: a burst this size is a second or two of work,
well inside every caller's deadline, so nobody may be refused and nothing may fail.
(Throughput and latency figures come from perf/peer_embed_bench.py, not from here.)
"""

from __future__ import annotations

import asyncio
import collections
import json

import grpc
import pytest

from backbone.v1 import embedding_service_pb2 as pb, embedding_service_pb2_grpc
from server.servicers.embedding import EmbeddingHop
from tests.conftest import error_reason, make_config, running

# Requests each caller sends back to back (bounded load: ~250-500 texts per round).
CALLS_PER_CALLER = {16: 16, 64: 6}


@pytest.fixture(scope="module")
def passages(msmarco_dir) -> list[str]:
    with open(msmarco_dir / "corpus.jsonl") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(512), fh)]


@pytest.fixture(scope="module")
async def default_server():
    """The embedding hop on the default configuration (it loads its own engine)."""
    async with running(make_config(), [EmbeddingHop()]) as server:
        yield server


async def closed_loop(stub, texts: list[str], callers: int, calls: int) -> collections.Counter:
    """``callers`` tasks, each sending ``calls`` one-text requests back to back with a
    10 s deadline and no backoff; the outcome of every call, by status name."""
    outcomes: collections.Counter = collections.Counter()

    async def caller(index: int) -> None:
        for n in range(calls):
            text = texts[(index * calls + n) % len(texts)]
            try:
                response = await stub.Embed(pb.EmbedRequest(inputs=[text]), timeout=10.0)
                assert len(response.embeddings) == 1 and len(response.embeddings[0].values) == 384
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                outcomes[f"{err.code().name}/{error_reason(err)}"] += 1

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("callers", [16, 64])
async def test_concurrent_callers_with_10s_deadlines_are_all_served(default_server, passages, callers):
    async with grpc.aio.insecure_channel(default_server.address) as channel:
        stub = embedding_service_pb2_grpc.EmbeddingServiceStub(channel)
        calls = CALLS_PER_CALLER[callers]
        outcomes = await closed_loop(stub, passages, callers, calls)
    assert outcomes == {"OK": callers * calls}, f"refusals or errors: {dict(outcomes)}"


async def test_unknown_priority_is_invalid_argument_naming_the_key(default_server):
    async with grpc.aio.insecure_channel(default_server.address) as channel:
        stub = embedding_service_pb2_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Embed(pb.EmbedRequest(inputs=["hi"]), timeout=10,
                             metadata=(("x-backbone-priority", "urgent"),))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-backbone-priority" in info.value.details()
        for value in ("low", "normal", "high"):
            response = await stub.Embed(pb.EmbedRequest(inputs=["hi"]), timeout=10,
                                        metadata=(("x-backbone-priority", value),))
            assert len(response.embeddings) == 1
