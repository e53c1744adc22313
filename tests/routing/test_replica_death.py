"""Replica death under steady load, with real processes: client -> router -> three
real embedding hops. SIGKILL one: no idempotent call fails at the caller, the replica
leaves rotation within 1 s; restarted, it is back within 2 s of turning SERVING."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from backbone.v1 import embedding_service_pb2 as epb, embedding_service_pb2_grpc
from tests.routing.conftest import router_for
from tests.routing.processes import embedding_hop, free_port, stop_all

EMBED = "backbone.v1.EmbeddingService"
CALLERS = 3


async def _until(predicate, timeout_s: float, step_s: float = 0.005) -> float:
    """Seconds until ``predicate()`` held (fails the test after ``timeout_s``)."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout_s, "condition not reached in time"
        await asyncio.sleep(step_s)
    return time.monotonic() - began


@pytest.mark.slow
async def test_sigkill_one_of_three_real_replicas_under_load():
    replicas = [embedding_hop(free_port()) for _ in range(3)]
    try:
        began = time.monotonic()
        await asyncio.gather(*(r.start() for r in replicas))
        print(f"\nthree replicas up in {time.monotonic() - began:.1f}s")
        async with router_for({"embedding": [r.address for r in replicas]}) as (server, ch):
            rs = server.hops[0].pool.sets[EMBED]
            victim = rs.endpoints[replicas[0].address]
            stub = embedding_service_pb2_grpc.EmbeddingServiceStub(ch)
            stop = asyncio.Event()
            ok, failed = [0], []
            served_by_victim_after_restart = [0]

            async def caller(i: int) -> None:
                n = 0
                while not stop.is_set() and n < 5000:
                    n += 1
                    try:
                        await stub.Embed(epb.EmbedRequest(inputs=[f"text {i} {n}"]), timeout=5)
                        ok[0] += 1
                    except grpc.aio.AioRpcError as exc:
                        failed.append(exc.code())

            load = [asyncio.ensure_future(caller(i)) for i in range(CALLERS)]
            await asyncio.sleep(1.0)
            assert victim.calls > 0, "the victim took its share before"
            replicas[0].signal(signal.SIGKILL)
            out_s = await _until(lambda: not victim.in_rotation(time.monotonic()), 5)
            await asyncio.sleep(1.0)
            await replicas[0].proc.wait()
            await replicas[0].start()  # returns once it reports SERVING
            back_s = await _until(lambda: victim.in_rotation(time.monotonic()), 5)
            calls_before = victim.calls
            await asyncio.sleep(1.0)
            served_by_victim_after_restart[0] = victim.calls - calls_before
            stop.set()
            await asyncio.gather(*load)
        print(f"\nreplica death: {ok[0]} calls ok, {len(failed)} failed, out of rotation "
              f"{out_s * 1e3:.0f} ms after SIGKILL, back {back_s * 1e3:.0f} ms after SERVING; "
              f"failures {sorted(set(str(c) for c in failed))}")
        assert failed == []
        assert ok[0] > 100
        assert out_s < 1.0
        assert back_s < 2.0
        assert served_by_victim_after_restart[0] > 0
    finally:
        await stop_all(replicas)
