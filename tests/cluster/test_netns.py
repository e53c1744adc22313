"""The multi-host helpers themselves: hosts in namespaces reachable from the box, a
link taken down makes its host unreachable, the DNS server answers what it is told."""

from __future__ import annotations

import grpc
from dnslib import DNSRecord

from backbone.v1 import embedding_service_pb2, embedding_service_pb2_grpc
from tests.cluster.conftest import HOP_PORT, start_fake_hop


async def embed_replica(address: str, timeout: float = 2.0) -> int:
    """Which fake replica answers at ``address`` (its vector's first value)."""
    async with grpc.aio.insecure_channel(f"{address}:{HOP_PORT}") as channel:
        stub = embedding_service_pb2_grpc.EmbeddingServiceStub(channel)
        response = await stub.Embed(embedding_service_pb2.EmbedRequest(inputs=["x"]), timeout=timeout)
        return int(response.embeddings[0].values[0])


async def test_hosts_in_namespaces_serve_on_their_own_addresses(network):
    hosts = [network.add_host() for _ in range(3)]
    procs = [start_fake_hop(h, i) for i, h in enumerate(hosts)]
    try:
        assert len({h.address for h in hosts}) == 3
        assert [await embed_replica(h.address) for h in hosts] == [0, 1, 2]
        hosts[1].link(up=False)
        try:
            await embed_replica(hosts[1].address, timeout=1.0)
            raise AssertionError("a host whose link is down still answered")
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert await embed_replica(hosts[2].address) == 2
        hosts[1].link(up=True)
        assert await embed_replica(hosts[1].address, timeout=5.0) == 1
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def test_dns_server_answers_the_current_records(network, dns):
    dns.set("embedding.test", ["10.201.0.10", "10.201.0.11"])

    def ask() -> list[str]:
        reply = DNSRecord.parse(DNSRecord.question("embedding.test").send(dns.address, dns.port, timeout=2))
        return sorted(str(rr.rdata) for rr in reply.rr)

    assert ask() == ["10.201.0.10", "10.201.0.11"]
    dns.set("embedding.test", ["10.201.0.12"])
    assert ask() == ["10.201.0.12"]
