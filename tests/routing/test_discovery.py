"""Discovery: a DNS server on loopback (dnslib) answers a name with a changing set of
127.0.0.x addresses; the router follows the set without dropping calls."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from dnslib import RR, A, QTYPE
from dnslib.server import BaseResolver, DNSServer

from backbone.v1 import embedding_service_pb2 as epb, embedding_service_pb2_grpc
from router.discovery import parse_target, resolve
from tests.routing.conftest import router_for
from tests.routing.fake_replica import FakeReplica
from tests.routing.processes import free_port

EMBED = "backbone.v1.EmbeddingService"
NAME = "replicas.backbone.test."


class Answers(BaseResolver):
    """Answers NAME with the current set of addresses."""

    def __init__(self, ips: list[str]) -> None:
        self.ips = list(ips)
        self.lock = threading.Lock()

    def resolve(self, request, handler):  # noqa: ANN001 - dnslib API
        reply = request.reply()
        if str(request.q.qname) == NAME and request.q.qtype == QTYPE.A:
            with self.lock:
                for ip in self.ips:
                    reply.add_answer(RR(NAME, QTYPE.A, rdata=A(ip), ttl=0))
        return reply


@pytest.fixture
def dns():
    answers = Answers([])
    server = DNSServer(answers, port=0, address="127.0.0.1")
    server.start_thread()
    try:
        yield answers, server.server.server_address[1]
    finally:
        server.stop()


def test_parse_target():
    t = parse_target("dns://127.0.0.1:5353/replicas.svc:50051")
    assert (t.dns, t.authority, t.host, t.port) == (True, ("127.0.0.1", 5353), "replicas.svc", 50051)
    t = parse_target("dns:///localhost:1")
    assert t.dns and t.authority is None
    assert not parse_target("10.0.0.1:7").dns
    with pytest.raises(ValueError):
        parse_target("no-port")


async def test_resolve_through_the_authority_and_the_system(dns):
    answers, port = dns
    answers.ips = ["127.0.0.3", "127.0.0.2"]
    assert await resolve(parse_target(f"dns://127.0.0.1:{port}/{NAME}:9")) == ["127.0.0.2:9", "127.0.0.3:9"]
    assert await resolve(parse_target("dns:///localhost:9")) in (["127.0.0.1:9"], ["::1:9", "127.0.0.1:9"],
                                                                  ["127.0.0.1:9", "[::1]:9"])


async def test_router_follows_a_changing_dns_answer_without_dropping_calls(dns):
    answers, dns_port = dns
    port = free_port()
    replicas = {ip: FakeReplica(ip, host=ip, port=port) for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4")}
    for r in replicas.values():
        await r.start()
    answers.ips = ["127.0.0.2", "127.0.0.3"]
    try:
        # Bounded as a whole: a wait that never ends fails here with its traceback instead
        # of at pytest's 600 s limit. Latency-outlier ejection is off: on a loaded box the
        # replica that just joined can look slow, and this test is about membership.
        async with asyncio.timeout(90), router_for(
                {"embedding": [f"dns://127.0.0.1:{dns_port}/{NAME}:{port}"]},
                dns_refresh_s=0.1, outlier_ratio=1e9) as (server, ch):
            rs = server.hops[0].pool.sets[EMBED]
            assert sorted(rs.endpoints) == [f"127.0.0.2:{port}", f"127.0.0.3:{port}"]
            stub = embedding_service_pb2_grpc.EmbeddingServiceStub(ch)
            failed: list = []
            stop = asyncio.Event()

            async def load():
                n = 0
                while not stop.is_set() and n < 20000:
                    n += 1
                    try:
                        await stub.Embed(epb.EmbedRequest(inputs=["x"]), timeout=5)
                    except grpc.aio.AioRpcError as exc:
                        failed.append(exc.code())

            tasks = [asyncio.ensure_future(load()) for _ in range(2)]
            await asyncio.sleep(0.3)
            with answers.lock:  # scale: .2 leaves, .4 joins
                answers.ips = ["127.0.0.3", "127.0.0.4"]
            began = time.monotonic()
            while sorted(rs.endpoints) != [f"127.0.0.3:{port}", f"127.0.0.4:{port}"]:
                assert time.monotonic() - began < 3, "the router did not follow the DNS answer"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            await replicas["127.0.0.2"].stop()  # the pod that left terminates
            calls_on_4 = replicas["127.0.0.4"].calls
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
        assert failed == []
        assert calls_on_4 > 0 and replicas["127.0.0.4"].calls > calls_on_4
    finally:
        for r in replicas.values():
            await asyncio.wait_for(r.stop(), 10)
