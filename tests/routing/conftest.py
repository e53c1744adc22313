"""Routing fixtures: fake replicas in this process and a router in front of them."""

from __future__ import annotations

from contextlib import asynccontextmanager

import grpc

from server.router.hop import RouterHop
from tests.conftest import make_config, running
from tests.routing.fake_replica import FakeReplica


@asynccontextmanager
async def fakes(n: int = 3, **kwargs):
    """``n`` started FakeReplicas (stopped afterwards)."""
    replicas = [FakeReplica(f"r{i}", **kwargs) for i in range(n)]
    for r in replicas:
        await r.start()
    try:
        yield replicas
    finally:
        for r in replicas:
            await r.stop()


@asynccontextmanager
async def router_for(upstreams: dict[str, list[str]], **router):
    """A router server (real grpc.aio, port 0) for ``upstreams``, and a channel to it."""
    config = make_config(router={"upstreams": upstreams, "start_wait_s": 5, **router})
    async with running(config, [RouterHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, channel
