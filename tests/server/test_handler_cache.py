"""The server builds each method's interceptor chain once, not per call."""

from __future__ import annotations

import grpc
import pytest

from server.interceptors import CachedHandlers


class CountingInterceptor(grpc.aio.ServerInterceptor):
    """Counts how often the chain below is asked for a method's handler."""

    def __init__(self) -> None:
        self.built: list[str] = []

    async def intercept_service(self, continuation, details):
        self.built.append(details.method)
        return await continuation(details)


def echo_handler() -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"echo:" + request

    method = grpc.unary_unary_rpc_method_handler(echo)
    return grpc.method_handlers_generic_handler("t.Echo", {"Say": method})


@pytest.fixture
async def served():
    inner = CountingInterceptor()
    server = grpc.aio.server(interceptors=[CachedHandlers(), inner])
    server.add_generic_rpc_handlers((echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield inner, channel
    await channel.close()
    await server.stop(None)


async def test_a_method_is_built_once_and_every_call_still_gets_its_own_answer(served):
    inner, channel = served
    say = channel.unary_unary("/t.Echo/Say")
    answers = [await say(f"{i}".encode(), timeout=5) for i in range(5)]
    assert answers == [f"echo:{i}".encode() for i in range(5)]
    assert inner.built == ["/t.Echo/Say"]


async def test_a_method_nobody_serves_is_not_kept(served):
    inner, channel = served
    missing = channel.unary_unary("/t.Echo/Nope")
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await missing(b"x", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert inner.built == ["/t.Echo/Nope", "/t.Echo/Nope"]


async def test_the_cache_is_bounded(monkeypatch, served):
    inner, channel = served
    monkeypatch.setattr(CachedHandlers, "LIMIT", 0)
    say = channel.unary_unary("/t.Echo/Say")
    for _ in range(2):
        await say(b"x", timeout=5)
    assert inner.built == ["/t.Echo/Say", "/t.Echo/Say"]
