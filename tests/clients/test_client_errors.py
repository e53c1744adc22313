"""Failed calls become the typed exception their status and ErrorReason name."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from backbone.v1 import common_pb2

from clients import errors
from clients.channel import ClientOptions
from clients.client import AsyncClient, Client
from clients.errors import BY_REASON
from server.config import ServerConfig


def test_every_error_reason_has_a_class():
    """Each ErrorReason value of the contract selects its own class with some status."""
    names = {
        name.removeprefix("ERROR_REASON_")
        for name in common_pb2.ErrorReason.keys()
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    assert names == {reason for _, reason in BY_REASON}


@pytest.mark.parametrize(("code", "reason"), list(BY_REASON), ids=lambda x: getattr(x, "name", x))
async def test_reason_selects_class_async(backend, code, reason):
    backend.script.fail("Embed", code, reason, times=5, metadata={"limit": "7"})
    async with AsyncClient(address=backend.address) as client:
        with pytest.raises(errors.BackboneRpcError) as caught:
            await client.embedding.embed(["x"])
    error = caught.value
    assert type(error) is BY_REASON[(code, reason)]
    assert (error.code, error.reason, error.metadata) == (code, reason, {"limit": "7"})
    assert error.message == f"scripted {code.name}"
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "DIMENSION_MISMATCH", errors.DimensionMismatchError),
        (grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND", errors.CollectionNotFoundError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", errors.OverloadedError),
        (grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN", errors.CircuitOpenError),
    ],
)
async def test_reason_selects_class_sync(backend, code, reason, expected):
    backend.script.fail("Embed", code, reason, times=5)

    def call():
        with Client(address=backend.address) as client:
            client.embedding.embed(["x"])

    with pytest.raises(expected) as caught:
        await asyncio.to_thread(call)
    assert (caught.value.code, caught.value.reason) == (code, reason)


@pytest.mark.parametrize(
    ("code", "reason", "domain", "expected"),
    [
        # No ErrorInfo: by status code.
        (grpc.StatusCode.UNAVAILABLE, "", "backbone.v1", errors.UnavailableError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "", "backbone.v1", errors.ResourceExhaustedError),
        (grpc.StatusCode.UNKNOWN, "", "backbone.v1", errors.InternalError),
        # A reason paired with another status than the contract's: by status code.
        (grpc.StatusCode.NOT_FOUND, "INVALID_INPUT", "backbone.v1", errors.NotFoundError),
        (grpc.StatusCode.CANCELLED, "INVALID_INPUT", "backbone.v1", errors.CancelledRpcError),
        # Another domain's ErrorInfo is not ours.
        (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LARGE", "other.v1", errors.InvalidInputError),
    ],
)
async def test_fallback_by_status_code(backend, code, reason, domain, expected):
    backend.script.fail("Embed", code, reason, times=5, domain=domain)
    async with AsyncClient(address=backend.address) as client:
        with pytest.raises(errors.BackboneRpcError) as caught:
            await client.embedding.embed(["x"])
    assert type(caught.value) is expected
    assert caught.value.code == code
    assert caught.value.reason == (reason if domain == "backbone.v1" else "")


async def test_bad_input_from_fake_server_is_typed(backend):
    """The fake's own validation: details (limit, index) arrive in ``metadata``."""
    async with AsyncClient(address=backend.address) as client:
        with pytest.raises(errors.InputTooLargeError) as caught:
            await client.embedding.embed(["ok", "y" * 5000])
        with pytest.raises(errors.EmptyInputError):
            await client.embedding.embed([])
    assert caught.value.metadata == {"limit": "1000", "index": "1"}
    assert isinstance(caught.value, errors.InvalidInputError)
    assert str(caught.value).startswith("INVALID_ARGUMENT INPUT_TOO_LARGE: text 1")


async def test_oversized_message_is_resource_exhausted_without_reason(backend):
    """gRPC core refuses a message over the server's limit: no ErrorInfo, by code."""
    async with AsyncClient(address=backend.address) as client:
        with pytest.raises(errors.ResourceExhaustedError) as caught:
            await client.embedding.embed(["z" * 300_000])
    assert type(caught.value) is errors.ResourceExhaustedError
    assert caught.value.reason == ""
    assert backend.script.calls["Embed"] == 0


async def test_client_receive_limit_applies(backend):
    """ClientOptions.max_message_bytes bounds what the client accepts."""
    async with AsyncClient(address=backend.address, max_message_bytes=1024) as client:
        with pytest.raises(errors.ResourceExhaustedError):
            await client.embedding.embed(["x"])  # 384 floats > 1 KiB


async def test_client_send_limit_refuses_before_uploading(backend):
    """A request over ClientOptions.max_message_bytes never reaches the server; the default
    is the server's own default cap."""
    assert ClientOptions().max_message_bytes == ServerConfig().max_message_bytes
    async with AsyncClient(address=backend.address, max_message_bytes=1024) as client:
        with pytest.raises(errors.ResourceExhaustedError):
            await client.embedding.embed(["y" * 4096])
    assert backend.script.calls["Embed"] == 0


async def test_unreachable_server_is_unavailable():
    async with AsyncClient(address="127.0.0.1:1", retry_max_attempts=1) as client:
        with pytest.raises(errors.UnavailableError) as caught:
            await client.embedding.embed(["x"])
    assert caught.value.reason == ""
