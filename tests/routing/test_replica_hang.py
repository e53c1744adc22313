"""Replica hang (SIGSTOP) with real processes: client -> router -> three fake-replica
processes. Callers' p99 stays near the hedge delay plus a normal call (not the hang's
length), the hung replica is ejected, and after SIGCONT it is readmitted."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time

import grpc
import pytest

from backbone.v1 import embedding_service_pb2 as epb, embedding_service_pb2_grpc
from tests.routing.conftest import router_for
from tests.routing.processes import fake, free_port, stop_all

EMBED = "backbone.v1.EmbeddingService"


def p(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.slow
async def test_sigstop_is_hedged_around_ejected_and_readmitted_after_sigcont():
    replicas = [fake(free_port(), delay_ms=2) for _ in range(3)]
    try:
        await asyncio.gather(*(r.start(timeout_s=60) for r in replicas))
        async with router_for({"embedding": [r.address for r in replicas]},
                              ejection_s=0.5, max_ejection_s=2.0) as (server, ch):
            rs = server.hops[0].pool.sets[EMBED]
            victim = rs.endpoints[replicas[0].address]
            stub = embedding_service_pb2_grpc.EmbeddingServiceStub(ch)
            latencies: list[tuple[float, float]] = []  # (start, seconds)
            failed: list = []
            stop = asyncio.Event()

            async def caller() -> None:
                n = 0
                while not stop.is_set() and n < 10000:
                    n += 1
                    began = time.monotonic()
                    try:
                        await stub.Embed(epb.EmbedRequest(inputs=["x"]), timeout=5)
                        latencies.append((began, time.monotonic() - began))
                    except grpc.aio.AioRpcError as exc:
                        failed.append(exc.code())

            load = [asyncio.ensure_future(caller()) for _ in range(3)]
            await asyncio.sleep(1.0)
            normal = [s for _, s in latencies]
            hedge_delay = rs.hedge.delay_s(rs.healthy(), time.monotonic() + 1)
            assert hedge_delay is not None, "enough samples to hedge"
            stopped_at = time.monotonic()
            replicas[0].signal(signal.SIGSTOP)
            await asyncio.sleep(2.0)
            assert victim.ejections >= 1, "the hung replica was ejected"
            during = [s for t, s in latencies if t >= stopped_at]
            replicas[0].signal(signal.SIGCONT)
            calls_at_cont = victim.calls
            began = time.monotonic()
            while victim.calls - calls_at_cont < 20:
                assert time.monotonic() - began < 6, "not readmitted after SIGCONT"
                await asyncio.sleep(0.05)
            readmitted_s = time.monotonic() - began
            stop.set()
            await asyncio.gather(*load)
        normal_p50, normal_p99 = statistics.median(normal), p(normal, 0.99)
        hung_p99 = p(during, 0.99)
        print(f"\nreplica hang: normal p50 {normal_p50 * 1e3:.1f} ms p99 {normal_p99 * 1e3:.1f} ms; "
              f"hedge delay {hedge_delay * 1e3:.1f} ms; p99 while SIGSTOPped {hung_p99 * 1e3:.1f} ms "
              f"over {len(during)} calls; ejections {victim.ejections}; readmitted "
              f"{readmitted_s:.2f} s after SIGCONT; failed {len(failed)}")
        assert failed == []
        # A hang lasts the whole 2 s; hedged calls end at about hedge delay + a normal call
        # (generous slack for a shared, loaded CI box).
        assert hung_p99 < hedge_delay + normal_p99 + 0.25
    finally:
        await stop_all(replicas)
