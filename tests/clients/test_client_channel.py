"""Channel policy seen from a real server: retries, retry budget, deadlines, token, TLS."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from backbone.v1 import vector_search_service_pb2 as vs_pb
from backbone.v1 import vector_search_service_pb2_grpc as vs_grpc

from clients import errors
from clients.channel import (
    BACKBONE_SERVICES,
    IDEMPOTENT_UNARY_METHODS,
    ClientOptions,
    call_kwargs,
    open_aio_channel,
)
from clients.client import AsyncClient, Client

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def test_retried_methods_exist_and_are_unary():
    """A typo in the retry list would silently disable retries for that method."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    for service, method in IDEMPOTENT_UNARY_METHODS:
        if not service.startswith("backbone."):
            continue
        m = pool.FindServiceByName(service).methods_by_name[method]
        assert not (m.client_streaming or m.server_streaming), (service, method)
    assert {s for s, _ in IDEMPOTENT_UNARY_METHODS} - {"grpc.health.v1.Health"} <= set(
        BACKBONE_SERVICES
    )


def test_options_validate_and_hide_token():
    with pytest.raises(ValueError):
        ClientOptions(tls_cert="c.pem")
    with pytest.raises(ValueError):
        ClientOptions(retry_max_attempts=6)
    assert "s3cret" not in repr(ClientOptions(token="s3cret"))


async def test_unary_idempotent_call_is_retried_on_unavailable(backend):
    backend.script.fail("Embed", UNAVAILABLE, "UNAVAILABLE", times=2)
    async with AsyncClient(address=backend.address) as client:
        result = await client.embedding.embed(["x"])
    assert result.vectors.shape == (1, 384)
    assert backend.script.calls["Embed"] == 3


async def test_retries_stop_at_max_attempts(backend):
    backend.script.fail("Embed", UNAVAILABLE, "UNAVAILABLE", times=10)
    async with AsyncClient(address=backend.address, retry_max_attempts=3) as client:
        with pytest.raises(errors.UnavailableError):
            await client.embedding.embed(["x"])
    assert backend.script.calls["Embed"] == 3


async def test_one_attempt_disables_retries(backend):
    backend.script.fail("Embed", UNAVAILABLE, "UNAVAILABLE")
    async with AsyncClient(address=backend.address, retry_max_attempts=1) as client:
        with pytest.raises(errors.UnavailableError):
            await client.embedding.embed(["x"])
    assert backend.script.calls["Embed"] == 1


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
        (grpc.StatusCode.INTERNAL, "INTERNAL"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_TOO_SHORT"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"),
        (grpc.StatusCode.UNKNOWN, ""),
    ],
)
async def test_other_codes_are_not_retried(backend, code, reason):
    backend.script.fail("Embed", code, reason)
    async with AsyncClient(address=backend.address) as client:
        with pytest.raises(errors.BackboneRpcError):
            await client.embedding.embed(["x"])
    assert backend.script.calls["Embed"] == 1


async def test_streaming_call_is_not_retried(backend):
    backend.script.fail("EmbedStream", UNAVAILABLE, "UNAVAILABLE")
    async with AsyncClient(address=backend.address) as client:
        with pytest.raises(errors.UnavailableError):
            async for _ in client.embedding.embed_stream([["a"], ["b"]]):
                pass
    assert backend.script.calls["EmbedStream"] == 1


async def test_only_idempotent_methods_are_retried_on_a_raw_stub(backend):
    """The policy lives in the channel: raw stubs get it; Delete (a write) is never retried."""
    backend.script.fail("Delete", UNAVAILABLE, "UNAVAILABLE")
    backend.script.fail("Search", UNAVAILABLE, "UNAVAILABLE")
    async with open_aio_channel(ClientOptions(address=backend.address)) as channel:
        stub = vs_grpc.VectorSearchServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Delete(vs_pb.DeleteRequest(collection="c", ids=["1"]), timeout=5)
        await stub.Search(vs_pb.SearchRequest(collection="c", text="q"), timeout=5)
    assert backend.script.calls["Delete"] == 1
    assert backend.script.calls["Search"] == 2


async def test_retry_budget_stops_retries_when_most_calls_fail(backend):
    """retryThrottling: after a run of failures, calls get one attempt each."""
    backend.script.fail("Embed", UNAVAILABLE, "UNAVAILABLE", times=1000)
    attempts = []
    async with AsyncClient(address=backend.address) as client:
        for _ in range(6):
            before = backend.script.calls["Embed"]
            with pytest.raises(errors.UnavailableError):
                await client.embedding.embed(["x"])
            attempts.append(backend.script.calls["Embed"] - before)
    assert attempts[0] == client.options.retry_max_attempts
    assert attempts[-1] == 1


async def test_default_deadlines_and_overrides(backend):
    async with AsyncClient(address=backend.address, timeout=4.0, stream_timeout=40.0) as c:
        await c.embedding.embed(["x"])
        await c.embedding.embed(["x"], timeout=1.5)
        async for _ in c.embedding.embed_stream([["x"]]):
            pass
        await c.embedding.embed(["x"], timeout=math.inf)
    default, override, stream, unbounded = backend.script.time_remaining
    slack = 0.1  # the wire format rounds the timeout up
    assert 3.0 < default <= 4.0 + slack
    assert 0.5 < override <= 1.5 + slack
    assert 39.0 < stream <= 40.0 + slack
    assert unbounded is None  # math.inf: no deadline at all


async def test_deadline_expiry_is_deadline_exceeded(backend):
    async with AsyncClient(address=backend.address, timeout=0.3) as client:
        with pytest.raises(errors.DeadlineExceededError) as caught:
            await client.embedding.embed(["hang"])
    assert caught.value.reason == ""


def test_call_kwargs_defaults():
    options = ClientOptions(timeout=3, stream_timeout=30, token="t")
    assert call_kwargs(options) == {"timeout": 3, "metadata": (("authorization", "Bearer t"),)}
    assert call_kwargs(options, stream=True)["timeout"] == 30
    assert call_kwargs(options, math.inf)["timeout"] is None
    assert call_kwargs(ClientOptions())["metadata"] == ()


async def test_token_sent_on_every_call_sync_and_async(backend):
    backend.script.required_token = "s3cret"
    async with AsyncClient(address=backend.address, token="s3cret") as client:
        await client.embedding.embed(["x"])
        async for _ in client.embedding.embed_stream([["x"]]):
            pass

    def sync_calls():
        with Client(address=backend.address, token="s3cret") as client:
            client.embedding.embed(["x"])
            list(client.embedding.embed_stream([["x"]]))

    await asyncio.to_thread(sync_calls)
    assert [md.get("authorization") for md in backend.script.metadata] == ["Bearer s3cret"] * 4


async def test_wrong_token_is_unauthenticated(backend):
    backend.script.required_token = "s3cret"
    async with AsyncClient(address=backend.address, token="wrong") as client:
        with pytest.raises(errors.UnauthenticatedError):
            await client.embedding.embed(["x"])


async def test_mtls_with_server_name_override(tls_backend, pki):
    tls_backend.script.required_token = "t"
    port = tls_backend.address.rsplit(":", 1)[1]
    options = ClientOptions(
        address=f"localhost:{port}",  # the cert names backbone.test, not localhost
        token="t",
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
        tls_server_name="backbone.test",
    )
    async with AsyncClient(options) as client:
        result = await client.embedding.embed(["x"])
    assert result.vectors.shape == (1, 384)


async def test_mtls_refuses_client_without_certificate(tls_backend, pki):
    async with AsyncClient(
        address=tls_backend.address, tls_ca=str(pki.ca), retry_max_attempts=1
    ) as client:
        with pytest.raises(errors.UnavailableError):
            await client.embedding.embed(["x"])
    assert tls_backend.script.calls["Embed"] == 0


async def test_tls_refuses_server_not_signed_by_trusted_ca(tls_backend, pki):
    """Client trusts its own cert as the only CA: the server's chain fails to verify."""
    async with AsyncClient(
        address=tls_backend.address,
        tls_ca=str(pki.client_cert),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
        retry_max_attempts=1,
    ) as client:
        with pytest.raises(errors.UnavailableError):
            await client.embedding.embed(["x"])
    assert tls_backend.script.calls["Embed"] == 0
