"""A new user's split deployment: two replicas, one router; ``backbone embed --address
<router>`` works through it and ``backbone endpoints`` shows both replicas. Also the
[router] config section, the --upstream flag and the embedded default's ListEndpoints."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import pytest

from backbone.v1 import router_service_pb2 as rpb, router_service_pb2_grpc
from clients.cli import main as cli
from server.config import ConfigError, load_config, router_upstreams
from server.main import add_serve_arguments, config_from_args
from tests.conftest import make_config, running
from tests.routing.conftest import fakes, router_for
from tests.server.server_fakes import FakeEmbeddingHop


async def test_embed_and_endpoints_through_the_router(capsys):
    async with fakes(2) as replicas, router_for({"embedding": [r.address for r in replicas]}) as (server, _):
        code = await asyncio.to_thread(cli, ["embed", "--address", server.address, "hello"])
        assert code == 0
        assert sum(r.calls for r in replicas) == 1
        capsys.readouterr()
        code = await asyncio.to_thread(cli, ["endpoints", "--address", server.address])
        out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split()[:4] == ["SERVICE", "ADDRESS", "HEALTH", "BREAKER"]
    listed = {line.split()[1]: line.split() for line in out[1:]}
    assert set(listed) == {r.address for r in replicas}
    assert all(row[0] == "embedding" and row[2] == "SERVING" and row[3] == "CLOSED"
               for row in listed.values())


async def test_embedded_default_lists_its_hops_in_process():
    async with running(make_config(), [FakeEmbeddingHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as ch:
            listing = await router_service_pb2_grpc.RouterServiceStub(ch).ListEndpoints(
                rpb.ListEndpointsRequest(), timeout=5)
    assert [(e.service, e.address, e.health) for e in listing.endpoints] == [
        ("backbone.v1.EmbeddingService", "in-process", rpb.ENDPOINT_HEALTH_SERVING)]


def test_router_config_from_toml_env_and_flags(tmp_path):
    path = tmp_path / "router.toml"
    path.write_text('[router]\nbalancer = "least_request"\n[router.upstreams]\n'
                    'embedding = ["h1:1", "h2:2"]\nsearch = "dns:///search.svc:50051"\n')
    cfg = load_config(path)
    assert cfg.router.balancer == "least_request"
    assert router_upstreams(cfg.router) == {"embedding": ("h1:1", "h2:2"),
                                            "search": ("dns:///search.svc:50051",)}
    env = {"BACKBONE_ROUTER__UPSTREAMS": '{"rerank": ["r:1"]}'}
    assert router_upstreams(load_config(None, env).router) == {"rerank": ("r:1",)}
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["router", "--config", str(path), "--upstream", "embedding=a:1,b:2",
                              "--upstream", "generation=g:3"])
    got = router_upstreams(config_from_args(args, {}).router)
    assert got == {"embedding": ("a:1", "b:2"), "search": ("dns:///search.svc:50051",),
                   "generation": ("g:3",)}
    with pytest.raises(ConfigError):
        config_from_args(parser.parse_args(["router", "--upstream", "nosuch=a:1"]), {})
    with pytest.raises(ConfigError):
        load_config(overrides={"router": {"balancer": "random"}})
