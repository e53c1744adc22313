"""The router across hosts: >= 3 embedding replicas in their own namespaces, named by a
DNS server on the test network, the router outside them
(``python -m server.main serve router --upstream embedding=dns://DNS/embedding.test:50051``).

Shows: calls spread (no host under 20 % at steady state); a host whose link goes down
costs no idempotent call; a host that joins (DNS answers it, it turns SERVING) gets
traffic within 5 s. Skipped until the router (server.router, helper h15) is merged.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time

import grpc
import pytest

from backbone.v1 import embedding_service_pb2, embedding_service_pb2_grpc, router_service_pb2
from backbone.v1.router_service_pb2_grpc import RouterServiceStub
from perf.harness import REPO_ROOT as REPO
from perf.harness import ServerProcess, start_announced
from tests.cluster.conftest import HOP_PORT, start_fake_hop

pytestmark = pytest.mark.skipif(
    not (REPO / "server" / "router" / "__init__.py").exists(),
    reason="server.router is not in this tree yet (the router comes from h15; "
    "the coordinator enables this test after merging it)",
)
NAME = "embedding.test"


def start_router(dns_address: str, log_path=None) -> ServerProcess:
    """The router process on 127.0.0.1:0 with the DNS-named embedding upstream; its log
    goes to ``log_path``."""
    return start_announced(
        [sys.executable, "-m", "server.main", "serve", "router", "--port", "0",
         "--set", "server.metrics_port=0",
         # re-resolve every second (the default is 5 s, as long as the join window below)
         "--set", "router.dns_refresh_s=1",
         "--upstream", f"embedding=dns://{dns_address}:53/{NAME}:{HOP_PORT}"],
        "router", log_path=log_path, timeout_s=60,
    )


async def calls(stub, n: int, counts: collections.Counter, failures: list) -> None:
    """``n`` idempotent Embed calls one after another, counting the answering replica."""
    for _ in range(n):
        try:
            response = await stub.Embed(embedding_service_pb2.EmbedRequest(inputs=["x"]), timeout=5)
            counts[int(response.embeddings[0].values[0])] += 1
        except grpc.aio.AioRpcError as err:
            failures.append(err.code())


@pytest.mark.slow
async def test_router_spreads_survives_a_host_down_and_picks_up_a_new_host(network, dns, tmp_path):
    hosts = [network.add_host() for _ in range(4)]
    procs = [start_fake_hop(h, i) for i, h in enumerate(hosts)]
    dns.set(NAME, [h.address for h in hosts[:3]])
    log = tmp_path / "router.log"
    router = start_router(dns.address, log)
    try:
        async with grpc.aio.insecure_channel(router.target) as channel:
            stub = embedding_service_pb2_grpc.EmbeddingServiceStub(channel)
            warm: collections.Counter = collections.Counter()
            await calls(stub, 60, warm, [])
            counts: collections.Counter = collections.Counter()
            failures: list = []
            # steady state: ~900 calls (a second or two), long enough for noise to even out
            await asyncio.gather(*(calls(stub, 150, counts, failures) for _ in range(6)))
            assert not failures
            total = sum(counts.values())
            assert set(counts) == {0, 1, 2}
            assert all(counts[r] / total >= 0.20 for r in range(3)), counts

            # Host 1 drops off the network mid-traffic: no idempotent call may fail.
            counts, failures = collections.Counter(), []
            traffic = asyncio.gather(*(calls(stub, 60, counts, failures) for _ in range(6)))
            await asyncio.sleep(0.3)
            hosts[1].link(up=False)
            dns.set(NAME, [hosts[0].address, hosts[2].address])
            await traffic
            assert failures == [], failures

            # Host 3 joins: DNS names it and it already serves; traffic within 5 s.
            dns.set(NAME, [hosts[0].address, hosts[2].address, hosts[3].address])
            joined_at = time.monotonic()
            seen: collections.Counter = collections.Counter()
            while time.monotonic() - joined_at < 5.0 and not seen[3]:
                await calls(stub, 10, seen, failures)
            if not seen[3]:
                listed = await RouterServiceStub(channel).ListEndpoints(
                    router_service_pb2.ListEndpointsRequest(), timeout=5)
                pytest.fail(f"host 3 got no call within 5 s: {seen}\n{listed}")
            assert failures == []
    except BaseException:
        print("router log (tail):", log.read_text()[-4000:] if log.exists() else "(none)")
        raise
    finally:
        router.stop(grace_s=20)
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
