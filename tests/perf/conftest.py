"""Fixtures for the perf harness tests: small in-process gRPC servers on port 0.

These test the HARNESS (arrival process, cap, counting, JSON shape, orchestration), never
the backbone's performance: timed claims live in perf/, not in tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from perf.echo_server import start_echo_server


@pytest.fixture(scope="module")
async def echo_target() -> AsyncIterator[str]:
    """host:port of an in-process echo server (perf.echo_server's handler)."""
    server, port = await start_echo_server("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0)


async def _serve(register: Callable[[grpc.aio.Server], None]) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def hanging_target() -> AsyncIterator[str]:
    """host:port of a server whose ``/perf.Hang/Hang`` never answers (until stopped)."""
    never = asyncio.Event()

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await never.wait()
        return request

    handler = grpc.method_handlers_generic_handler(
        "perf.Hang", {"Hang": grpc.unary_unary_rpc_method_handler(hang)}
    )
    server, target = await _serve(lambda s: s.add_generic_rpc_handlers((handler,)))
    try:
        yield target
    finally:
        await server.stop(grace=0)


@pytest.fixture
async def serve() -> AsyncIterator[Callable]:
    """``target = await serve(register)``: a server on port 0 set up by ``register(server)``."""
    started: list[grpc.aio.Server] = []

    async def start(register: Callable[[grpc.aio.Server], None]) -> str:
        server, target = await _serve(register)
        started.append(server)
        return target

    yield start
    for server in started:
        await server.stop(grace=0)
