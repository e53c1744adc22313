"""Client-side helpers of the fuzz suite: raw (undecodable) calls to any method, every
method of the contract from the descriptor pool, and checks of the error contract."""

from __future__ import annotations

import asyncio
import importlib

import grpc
from google.protobuf import descriptor_pool

from server.app import CONTRACT_MODULES
from tests.server.server_fakes import only_error_info

# No contract error may ever be UNKNOWN; INTERNAL only for bugs (none expected here).
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def contract_methods() -> list[tuple[str, bool, bool]]:
    """(path, client_streaming, server_streaming) of every method of every service of the
    contract, from the descriptor pool (new services are covered without a change here)."""
    out = []
    pool = descriptor_pool.Default()
    for module in CONTRACT_MODULES:
        file = importlib.import_module(module).DESCRIPTOR
        for service in file.services_by_name.values():
            for method in pool.FindServiceByName(service.full_name).methods:
                out.append((
                    f"/{service.full_name}/{method.name}",
                    method.client_streaming, method.server_streaming,
                ))
    return out


async def raw_call(
    channel: grpc.aio.Channel, method: str, client_streaming: bool, server_streaming: bool,
    messages: list[bytes], timeout: float = 10.0,
) -> tuple[grpc.StatusCode, grpc.aio.AioRpcError | None]:
    """Send ``messages`` (raw bytes, not serialized by the client) to ``method`` and read
    every response; returns the final code and the error (None when OK)."""
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(client_streaming, server_streaming)]
    multicallable = kind(method, request_serializer=None, response_deserializer=None)
    try:
        if client_streaming:
            call = multicallable(iter(messages), timeout=timeout)
        else:
            call = multicallable(messages[0] if messages else b"", timeout=timeout)
        if server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err
    except asyncio.CancelledError:
        raise
    return grpc.StatusCode.OK, None


def check_error(err: grpc.aio.AioRpcError) -> str:
    """The reason of a contract error: exactly one ErrorInfo, never UNKNOWN / INTERNAL."""
    assert err.code() not in NEVER, f"{err.code().name}: {err.details()}"
    return only_error_info(err).reason


def trailers_bytes(err: grpc.aio.AioRpcError) -> int:
    """Bytes of the error as sent: message + trailing metadata."""
    size = len((err.details() or "").encode())
    for key, value in err.trailing_metadata() or ():
        size += len(key) + len(value if isinstance(value, bytes) else value.encode())
    return size
