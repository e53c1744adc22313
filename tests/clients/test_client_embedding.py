"""Typed embedding and health calls, sync and async, against the fake server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from backbone.v1 import common_pb2
from grpc_health.v1 import health_pb2

from clients import errors
from clients.client import AsyncClient, Client
from clients.embedding import EmbedOptions, build_embed_request
from clients.health import SERVICE_UNKNOWN, is_healthy


def test_request_builder():
    request = build_embed_request("one", EmbedOptions(True, 8, "reject", "m"))
    assert list(request.inputs) == ["one"]  # a lone string is one text, not characters
    assert (request.normalize, request.dimensions, request.model) == (True, 8, "m")
    assert request.truncation == common_pb2.TRUNCATION_POLICY_REJECT
    with pytest.raises(ValueError):
        build_embed_request("x", EmbedOptions(truncation="cut"))


async def test_async_embed_returns_vectors_in_input_order(backend, fake):
    async with AsyncClient(address=backend.address) as client:
        result = await client.embedding.embed(["alpha", "beta gamma"])
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (2, 384) and result.dimensions == 384
    np.testing.assert_allclose(result.vectors, np.stack([fake("alpha"), fake("beta gamma")]))
    assert result.tokens == (1, 2) and result.usage.prompt_tokens == 3
    assert result.model == "fake-minilm"
    assert result.timings[0].hop == "embed" and result.timings[0].batch_size == 2


async def test_sync_embed_normalize_and_dimensions(backend, fake):
    def call():
        with Client(address=backend.address) as client:
            return client.embedding.embed("alpha", normalize=True, dimensions=16)

    result = await asyncio.to_thread(call)
    assert result.vectors.shape == (1, 16)
    assert np.linalg.norm(result.vectors[0]) == pytest.approx(1.0, abs=1e-5)
    expected = fake("alpha")[:16]
    np.testing.assert_allclose(result.vectors[0], expected / np.linalg.norm(expected), rtol=1e-5)


async def test_async_embed_stream_from_async_iterable(backend, fake):
    async def batches():
        for batch in (["a"], ["b", "c"], ["d"]):
            yield batch

    async with AsyncClient(address=backend.address) as client:
        results = [r async for r in client.embedding.embed_stream(batches(), dimensions=4)]
    assert [r.vectors.shape for r in results] == [(1, 4), (2, 4), (1, 4)]
    np.testing.assert_allclose(results[1].vectors[1], fake("c")[:4])


async def test_sync_embed_stream_error_ends_stream_typed(backend):
    def call():
        seen = []
        with Client(address=backend.address) as client:
            with pytest.raises(errors.EmptyInputError):
                for result in client.embedding.embed_stream([["a"], [""], ["b"]]):
                    seen.append(result)
        return seen

    seen = await asyncio.to_thread(call)
    assert len(seen) == 1


async def test_health_check_async(backend):
    name = "backbone.v1.RerankService"
    await backend.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    async with AsyncClient(address=backend.address) as client:
        statuses = await client.health.check_all()
        unknown = await client.health.check("no.such.Service")
        watch = client.health.watch(name)
        first = await anext(watch)
        await backend.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        second = await anext(watch)
        await watch.aclose()
    assert statuses[""] == "SERVING" and statuses[name] == "NOT_SERVING"
    assert unknown == SERVICE_UNKNOWN
    assert (first, second) == ("NOT_SERVING", "SERVING")
    assert not is_healthy(statuses)


async def test_health_check_sync(backend):
    def call():
        with Client(address=backend.address) as client:
            return client.health.check_all()

    statuses = await asyncio.to_thread(call)
    assert is_healthy(statuses)
    assert is_healthy({"": "SERVING", "backbone.v1.EmbeddingService": SERVICE_UNKNOWN})
    assert not is_healthy({"": SERVICE_UNKNOWN})
