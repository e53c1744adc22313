"""The embedding hop through a real grpc.aio server with the real bundled MiniLM."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import grpc
import numpy as np
import pytest

from backbone.v1 import common_pb2, embedding_service_pb2 as pb, embedding_service_pb2_grpc
from clients.errors import retry_after_s
from server.engines.embedder import EmbedderBase
from server.servicers.embedding import EmbeddingHop
from tests.conftest import error_reason, make_config, running



@pytest.fixture(scope="module")
def passages(msmarco_dir) -> list[str]:
    """Real passages of mixed lengths."""
    with open(msmarco_dir / "corpus.jsonl") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(400), fh)]
    return texts


@pytest.fixture(scope="module", params=["torch", "onnx"])
async def embed_server(request, minilm, onnx_minilm):
    """A server on each engine: torch (batched, one lane) and ONNX (a text per call, lanes)."""
    # No estimated-wait bound here: these tests check answers, the overload test below
    # starts its own server with the bound.
    config = make_config(embedding={"max_batch_size": 16, "max_wait_ms": 2, "max_queue_delay_ms": 0})
    embedder = minilm if request.param == "torch" else onnx_minilm
    async with running(config, [EmbeddingHop(embedder=embedder)]) as server:
        server.engine = request.param
        yield server


@pytest.fixture
async def stub(embed_server):
    async with grpc.aio.insecure_channel(embed_server.address) as channel:
        yield embedding_service_pb2_grpc.EmbeddingServiceStub(channel)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


async def test_hello_is_a_384_dim_unit_vector(stub):
    response = await stub.Embed(pb.EmbedRequest(inputs=["hello"], normalize=True))
    values = np.array(response.embeddings[0].values)
    assert response.dimensions == 384 and values.shape == (384,)
    assert abs(np.linalg.norm(values) - 1) < 1e-5
    assert response.timings[0].hop == "embed" and response.timings[0].batch_size >= 1


async def test_server_equals_in_process_encode_under_concurrency(
    embed_server, stub, minilm, passages
):
    """Mixed lengths from many concurrent callers, batched however the server likes,
    equal SentenceTransformer.encode of each text on its own."""
    rng = random.Random(7)
    long_text = " ".join(passages[:8])  # > 256 tokens: truncated identically by both
    requests = []
    for _ in range(48):
        k = rng.choice([1, 1, 2, 3, 5])
        texts = [rng.choice(passages)[: rng.choice([20, 80, 400, 2000])] for _ in range(k)]
        if rng.random() < 0.15:
            texts.append(long_text)
        requests.append(texts)
    # A generous deadline: this test is about equality, not admission (48 concurrent
    # requests are several seconds of work on the torch engine of a 2-core CPU).
    responses = await asyncio.gather(
        *(stub.Embed(pb.EmbedRequest(inputs=t), timeout=120) for t in requests)
    )
    batch_sizes = {r.timings[0].batch_size for r in responses}
    if embed_server.engine == "torch":
        assert max(batch_sizes) > 1, "concurrent callers must have been batched together"
    else:  # ONNX Runtime is fastest a text per call here; its lanes run them in parallel
        assert batch_sizes == {1}
    model = minilm._model
    for texts, response in zip(requests, responses):
        got = np.array([e.values for e in response.embeddings], dtype=np.float32)
        want = np.stack([model.encode(t, convert_to_numpy=True) for t in texts])
        assert got.shape == want.shape
        assert cosine(got, want).min() >= 0.9999
        for text, emb in zip(texts, response.embeddings):
            assert emb.truncated == (text == long_text)


async def test_dimensions_keep_leading_components_and_renormalise(stub):
    full = await stub.Embed(pb.EmbedRequest(inputs=["matryoshka"]))
    cut = await stub.Embed(pb.EmbedRequest(inputs=["matryoshka"], dimensions=128, normalize=True))
    head = np.array(full.embeddings[0].values[:128])
    got = np.array(cut.embeddings[0].values)
    assert cut.dimensions == 128 and got.shape == (128,)
    np.testing.assert_allclose(got, head / np.linalg.norm(head), atol=1e-6)


async def test_reject_policy_refuses_over_long_text(stub, passages):
    long_text = " ".join(passages[:8])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(pb.EmbedRequest(
            inputs=["short", long_text], truncation=common_pb2.TRUNCATION_POLICY_REJECT))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "INPUT_TOO_LARGE"
    ok = await stub.Embed(pb.EmbedRequest(inputs=[long_text]))
    assert ok.embeddings[0].truncated and ok.embeddings[0].tokens == 256


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (pb.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_INPUT"),
        (pb.EmbedRequest(inputs=["x"] * 10_000), grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_INPUTS"),
        (pb.EmbedRequest(inputs=["x" * 1_000_000]), grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LARGE"),
        (pb.EmbedRequest(inputs=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_INPUT"),
        (pb.EmbedRequest(inputs=["ok"], dimensions=4096), grpc.StatusCode.INVALID_ARGUMENT, "DIMENSION_MISMATCH"),
        (pb.EmbedRequest(inputs=["ok"], model="nope"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        # Over the 4 MiB message cap: refused by gRPC itself, no handler runs.
        (pb.EmbedRequest(inputs=["y" * 30_000] * 150), grpc.StatusCode.RESOURCE_EXHAUSTED, None),
    ],
    ids=["empty", "10k-texts", "1MB-text", "empty-text", "dims", "model", "oversize-message"],
)
async def test_bad_input_gets_status_and_reason_while_others_are_served(stub, request_, code, reason):
    healthy = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=["still serving"])))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(request_, timeout=5)
    assert info.value.code() == code
    assert error_reason(info.value) == reason
    assert len((await healthy).embeddings) == 1


async def test_embed_stream_answers_in_order_with_ids(stub):
    async def requests():
        for i in range(5):
            yield pb.EmbedStreamRequest(id=f"r{i}", request=pb.EmbedRequest(inputs=[f"text {i}"] * (i + 1)))

    got = [(r.id, len(r.response.embeddings)) async for r in stub.EmbedStream(requests())]
    assert got == [(f"r{i}", i + 1) for i in range(5)]


class GatedEmbedder(EmbedderBase):
    """Wraps the real engine; batches wait at a gate so the queue fills deterministically."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        for attr in ("name", "dimension", "max_seq_length", "model_path"):
            setattr(self, attr, getattr(inner, attr))

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)

    def embed(self, texts):
        self.gate.wait(30)
        return self.inner.embed(texts)


async def test_full_queue_answers_resource_exhausted_fast_and_serves_the_rest(minilm):
    gated = GatedEmbedder(minilm)
    config = make_config(embedding={"max_batch_size": 4, "max_queue": 8, "max_wait_ms": 0})
    async with running(config, [EmbeddingHop(embedder=gated)]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = embedding_service_pb2_grpc.EmbeddingServiceStub(channel)
            gated.gate.clear()
            calls = [asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=[f"t{i}"]), timeout=30))
                     for i in range(40)]
            done, _ = await asyncio.wait(calls, timeout=5, return_when=asyncio.FIRST_EXCEPTION)
            refused = [t for t in done if t.exception() is not None]
            assert refused, "a full queue must refuse at once, not wait"
            gated.gate.set()
            ok, overloaded = 0, 0
            for task in calls:
                try:
                    await task
                    ok += 1
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert error_reason(err) == "OVERLOADED"
                    # ...with pushback for well-behaved clients (google.rpc.RetryInfo).
                    pushback = retry_after_s(err)
                    assert pushback is not None and 0 < pushback <= 1.0
                    overloaded += 1
            assert ok + overloaded == 40
            assert 1 <= ok <= 4 + 8 + 4 and overloaded >= 40 - 16
            started = time.perf_counter()
            await stub.Embed(pb.EmbedRequest(inputs=["after the storm"]))
            assert time.perf_counter() - started < 5
