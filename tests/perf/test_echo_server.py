"""perf.echo_server's Hold method: the floor of a call whose work takes a given time."""

from __future__ import annotations

import time

import grpc
import pytest

from perf.echo_server import HOLD_METHOD, hold_request


async def test_hold_answers_with_the_request_after_holding_for_its_time(echo_target: str) -> None:
    async with grpc.aio.insecure_channel(echo_target) as channel:
        hold = channel.unary_unary(HOLD_METHOD)
        request = hold_request(0.05, b"payload")
        started = time.perf_counter()
        assert await hold(request, timeout=5) == request
        assert time.perf_counter() - started >= 0.05


@pytest.mark.parametrize("request_bytes", [b"short", hold_request(-1.0), hold_request(61.0)])
async def test_hold_refuses_a_request_without_a_valid_time(echo_target: str, request_bytes: bytes) -> None:
    async with grpc.aio.insecure_channel(echo_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(HOLD_METHOD)(request_bytes, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
