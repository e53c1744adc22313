"""Refusals under a burst, as a gRPC caller sees them (real grpc.aio server, real MiniLM).

The engine is held at a gate so the queue fills deterministically; the cost model is the
one the hop learnt from the real model at start. Behind a few seconds of queued work:

* a caller whose 50 ms deadline cannot be met is refused at once (RESOURCE_EXHAUSTED /
  OVERLOADED with a RetryInfo that says when the work ahead drains), not after 50 ms;
* under the same pressure and the same 10 s deadline a low-priority caller is refused
  while a normal one is queued;
* a caller whose deadline passes while its request is still queued gets its refusal
  (RESOURCE_EXHAUSTED) before that deadline, not DEADLINE_EXCEEDED at it.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import grpc
import pytest

from backbone.v1 import embedding_service_pb2 as pb, embedding_service_pb2_grpc
from clients.errors import retry_after_s
from server.engines.embedder import EmbedderBase
from server.servicers.embedding import EmbeddingHop
from tests.conftest import error_reason, make_config, running

TEXT = "a short passage about the burst the queue is holding"


class HeldEmbedder(EmbedderBase):
    """The real engine behind a gate: batches wait there while the test fills the queue."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        for attr in ("name", "dimension", "max_seq_length", "model_path"):
            setattr(self, attr, getattr(inner, attr))

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)

    def embed(self, texts):
        self.entered.set()
        if not self.gate.is_set():
            # A held batch's caller has left by the time the gate opens: fail it, so its
            # seconds at the gate never reach the hop's cost model.
            self.gate.wait(30)
            raise RuntimeError("held batch dropped")
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
async def held(minilm):
    """A server on the held engine (4 texts a batch, a 5 s ceiling) and its hop."""
    engine = HeldEmbedder(minilm)
    hop = EmbeddingHop(embedder=engine)
    config = make_config(embedding={"max_batch_size": 4, "max_wait_ms": 0, "max_queue_delay_ms": 5000})
    async with running(config, [hop]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = embedding_service_pb2_grpc.EmbeddingServiceStub(channel)
            # Served once with the gate open: the cost model has real batches behind it.
            for _ in range(3):
                await stub.Embed(pb.EmbedRequest(inputs=[TEXT] * 4), timeout=30)
            yield stub, hop._batcher, engine


async def fill_queue(stub, batcher, engine: HeldEmbedder, seconds: float) -> list:
    """Hold the engine on one call, then queue one-text calls (30 s deadlines) until the
    hop estimates ``seconds`` of work ahead of a new request; the calls, still open."""
    engine.gate.clear()
    engine.entered.clear()
    calls = [stub.Embed(pb.EmbedRequest(inputs=[TEXT]), timeout=30)]
    assert await asyncio.to_thread(engine.entered.wait, 10), "the engine never got the first call"
    while batcher.estimated_delay_s() < seconds:
        assert len(calls) < 900, f"{len(calls)} calls queued, estimate {batcher.estimated_delay_s():.2f}s"
        before = batcher.queued
        calls.append(stub.Embed(pb.EmbedRequest(inputs=[TEXT]), timeout=30))
        while batcher.queued == before and not calls[-1].done():
            await asyncio.sleep(0.001)  # until the server has queued it
        assert not calls[-1].done(), f"a 30 s caller was refused: {calls[-1]}"
    return calls


async def drain(calls: list, engine: HeldEmbedder) -> None:
    """Cancel the held calls (their items are dropped before compute) and open the gate."""
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    engine.gate.set()


async def refusal(call) -> tuple[grpc.aio.AioRpcError, float]:
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value, time.perf_counter() - started


async def test_a_50ms_deadline_behind_2s_of_work_is_refused_at_once_with_retry_info(held):
    stub, batcher, engine = held
    calls = await fill_queue(stub, batcher, engine, 2.0)
    try:
        ahead = batcher.estimated_delay_s()
        took, pushbacks = [], []
        for _ in range(5):
            err, elapsed = await refusal(stub.Embed(pb.EmbedRequest(inputs=[TEXT]), timeout=0.05))
            assert (err.code(), error_reason(err)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
            took.append(elapsed)
            pushbacks.append(retry_after_s(err))
        assert statistics.median(took) < 0.005, f"refusals took {[round(t * 1e3, 1) for t in took]} ms"
        assert max(took) < 0.05, "a refusal waited for the deadline"
        # RetryInfo: about when the >= 2 s of work ahead will have drained.
        assert all(p is not None and p >= 0.5 * ahead for p in pushbacks), (pushbacks, ahead)
    finally:
        await drain(calls, engine)


async def test_low_priority_is_refused_before_normal_under_the_same_pressure(held):
    stub, batcher, engine = held
    # Low is admitted only while the wait ahead is under half its budget (5 s ceiling).
    calls = await fill_queue(stub, batcher, engine, 3.0)
    try:
        assert batcher.estimated_delay_s() < 4.5
        low = stub.Embed(pb.EmbedRequest(inputs=[TEXT]), timeout=10,
                         metadata=(("x-backbone-priority", "low"),))
        err, elapsed = await refusal(low)
        assert (err.code(), error_reason(err)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
        assert elapsed < 0.05 and retry_after_s(err)
        before = batcher.queued
        normal = stub.Embed(pb.EmbedRequest(inputs=[TEXT]), timeout=10,
                            metadata=(("x-backbone-priority", "normal"),))
        calls.append(normal)
        while batcher.queued == before and not normal.done():
            await asyncio.sleep(0.001)
        assert not normal.done(), f"normal refused under the same pressure: {normal}"
    finally:
        await drain(calls, engine)


async def test_a_deadline_passing_in_the_queue_gets_its_refusal_before_it(held):
    stub, batcher, engine = held
    calls = await fill_queue(stub, batcher, engine, 0.05)
    try:
        # Admitted on a 2 s deadline behind a held engine: it cannot start in time.
        err, elapsed = await refusal(stub.Embed(pb.EmbedRequest(inputs=[TEXT]), timeout=2.0))
        assert (err.code(), error_reason(err)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
        assert 1.0 < elapsed < 2.0, f"answered after {elapsed:.3f}s"
        assert retry_after_s(err)
    finally:
        await drain(calls, engine)
