"""Router benchmark, separate processes: a slow replica, and the router's overhead.

Scenario "slow": three fake-replica processes (tests/routing/fake_replica.py, Embed
answers after an injected asyncio delay: 2, 2 and 10 ms, i.e. one 5x slower) behind
(a) ``backbone serve router`` (p2c) and (b) gRPC's own ``round_robin`` over the same
three (``ipv4:`` target); plus (c) a router over three 2 ms replicas (all healthy).
Reports p50/p99 per target and the slow replica's share of the router's calls.
Scenario "overhead": one 2 ms replica called directly vs through the router.
Rounds alternate between targets; ratios within one run are what count.

    PYTHONPATH=.:clients/gen .venv/bin/python perf/router_bench.py --seconds 3 --callers 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "clients" / "gen")]

from backbone.v1 import embedding_service_pb2 as epb  # noqa: E402
from backbone.v1 import router_service_pb2 as rpb  # noqa: E402
from backbone.v1 import router_service_pb2_grpc  # noqa: E402

EMBED_PATH = "/backbone.v1.EmbeddingService/Embed"
REQUEST = epb.EmbedRequest(inputs=["hello world"]).SerializeToString()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def spawn(args: list[str], procs: list) -> str:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'clients' / 'gen'}")
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL, env=env, cwd=REPO)
    procs.append(proc)
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if not line:
            raise RuntimeError(f"{args} exited")
        if line.startswith(b"backbone serving on "):
            return line.split()[-1].decode()


async def fake(delay_ms: float, procs: list) -> str:
    return await spawn(["-m", "tests.routing.fake_replica", "--port", str(free_port()),
                        "--delay-ms", str(delay_ms)], procs)


async def router(upstreams: list[str], procs: list) -> str:
    return await spawn(["-m", "server.main", "serve", "router", "--port", str(free_port()),
                        "--set", "server.metrics_port=0", "--set", "server.log_level=WARNING",
                        "--upstream", "embedding=" + ",".join(upstreams)], procs)


async def load(channel: grpc.aio.Channel, seconds: float, callers: int) -> list[float]:
    call = channel.unary_unary(EMBED_PATH)
    out: list[float] = []
    until = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < until:
            began = time.perf_counter()
            await call(REQUEST, timeout=5)
            out.append(time.perf_counter() - began)

    await asyncio.gather(*(one() for _ in range(callers)))
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--callers", type=int, default=8)
    args = ap.parse_args()
    procs: list = []
    try:
        mixed = [await fake(2, procs), await fake(2, procs), await fake(10, procs)]
        healthy = [await fake(2, procs) for _ in range(3)]
        r_mixed, r_healthy = await router(mixed, procs), await router(healthy, procs)
        rr_config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
        targets = {
            "router_p2c_slow": grpc.aio.insecure_channel(r_mixed),
            "grpc_round_robin_slow": grpc.aio.insecure_channel(
                "ipv4:" + ",".join(mixed), options=[("grpc.service_config", rr_config)]),
            "router_all_healthy": grpc.aio.insecure_channel(r_healthy),
            "direct_one_replica": grpc.aio.insecure_channel(healthy[0]),
        }
        for ch in targets.values():
            await load(ch, 0.5, 2)  # warm-up: connections, EWMAs
        samples: dict[str, list[float]] = {k: [] for k in targets}
        for _ in range(args.rounds):
            for name, ch in targets.items():
                samples[name] += await load(ch, args.seconds, args.callers)
        listing = await router_service_pb2_grpc.RouterServiceStub(targets["router_p2c_slow"]).ListEndpoints(
            rpb.ListEndpointsRequest())
        calls = {e.address: e.calls for e in listing.endpoints}
        share = calls.get(mixed[2], 0) / max(1, sum(calls.values()))
        report = {name: {"calls": len(v), "p50_ms": round(pct(v, 0.5), 2), "p99_ms": round(pct(v, 0.99), 2)}
                  for name, v in samples.items()}
        report["slow_replica_share_router"] = round(share, 4)
        report["p99_ratio_router_vs_all_healthy"] = round(
            report["router_p2c_slow"]["p99_ms"] / report["router_all_healthy"]["p99_ms"], 2)
        report["p99_ratio_round_robin_vs_router"] = round(
            report["grpc_round_robin_slow"]["p99_ms"] / report["router_p2c_slow"]["p99_ms"], 2)
        report["p50_added_by_router_ms"] = round(
            report["router_all_healthy"]["p50_ms"] - report["direct_one_replica"]["p50_ms"], 2)
        report["setup"] = (f"{args.callers} callers, {args.rounds} alternating rounds of {args.seconds}s; "
                           "slow replica: injected 10 ms delay vs 2 ms (fake replica processes)")
        print(json.dumps(report, indent=2))
        for ch in targets.values():
            await ch.close()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


if __name__ == "__main__":
    asyncio.run(main())
