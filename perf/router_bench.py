"""Router benchmark, every server its own process (started through ``perf.harness``).

Scenario ``policy``: the routing policy's own cost per call (``ReplicaSet.run`` with an
attempt that answers at once, one and three replicas), this tree against another
commit's (``--baseline-code``, a ``git archive`` export), alternating fresh processes.

Scenario ``overhead``: one bench replica (this file's ``replica`` command: Embed, Search
and Generate answered from canned bytes after an injected delay, load report in the
trailers like a real hop) called three ways in the same run: directly, through a bare
grpc.aio byte-forwarding proxy (this file's ``proxy`` command: a generic handler that
forwards bytes, no policy; the floor of any Python forwarder) and through
``backbone serve router``. Embed (1 text), Search (top 10) and Generate's time to first
token, at 1 and 16 callers. Rounds alternate the targets (the order rotates every round);
the figures are medians over rounds of each round's p50/p99, and "added" is the median of
the per-round differences against the direct call.

Scenario ``slow``: three replicas, one ``--slow-factor`` times slower (injected asyncio
delay), behind (a) the router (p2c), (b) gRPC's own ``round_robin`` over the same three
(``ipv4:`` target), and (c) the router over three healthy replicas; the slow replica's
share of the router's calls comes from ``RouterService.ListEndpoints``.

    .venv/bin/python -m perf.router_bench --out perf/results/router.json
    git archive <commit> | tar -x -C /tmp/before   # optional: a before/after in the same run
    .venv/bin/python -m perf.router_bench --baseline-code /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from perf.harness import REPO_ROOT, ServerProcess, start_backbone_server

sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "clients" / "gen")]

from backbone.v1 import embedding_service_pb2 as epb  # noqa: E402
from backbone.v1 import generation_service_pb2 as gpb  # noqa: E402
from backbone.v1 import router_service_pb2 as rpb  # noqa: E402
from backbone.v1 import router_service_pb2_grpc  # noqa: E402
from backbone.v1 import vector_search_service_pb2 as spb  # noqa: E402

EMBED = "/backbone.v1.EmbeddingService/Embed"
SEARCH = "/backbone.v1.VectorSearchService/Search"
GENERATE = "/backbone.v1.GenerationService/Generate"
STREAMING = frozenset({GENERATE})
SERVICES = ("backbone.v1.EmbeddingService", "backbone.v1.VectorSearchService",
            "backbone.v1.GenerationService")

REQUESTS = {
    EMBED: epb.EmbedRequest(inputs=["hello world"]).SerializeToString(),
    SEARCH: spb.SearchRequest(collection="docs", text="what is a router", top_k=10).SerializeToString(),
    GENERATE: gpb.GenerateRequest(
        model="m", messages=[gpb.ChatMessage(role="user", content="Say hi.")],
        sampling=gpb.SamplingParams(temperature=0.0, max_tokens=4)).SerializeToString(),
}


# -- the bench replica and the bare proxy (run as their own processes) ------------------------
def _canned() -> dict[str, bytes]:
    embed = epb.EmbedResponse(model="bench", dimensions=384,
                              embeddings=[epb.Embedding(values=[0.01 * i for i in range(384)])])
    search = spb.SearchResponse(hits=[spb.Hit(id=f"doc-{i}", score=1.0 - i / 10) for i in range(10)])
    return {EMBED: embed.SerializeToString(), SEARCH: search.SerializeToString()}


async def _serve(port: int, handler: grpc.GenericRpcHandler) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    status = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    for name in ("", *SERVICES):
        await status.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


class _Replica(grpc.GenericRpcHandler):
    """Embed/Search after ``delay_s``; Generate's first token after ``delay_s``, then
    four more every ``token_s`` and a final message."""

    def __init__(self, delay_s: float, token_s: float) -> None:
        from server.load_report import load_metadata

        self.delay_s, self.token_s = delay_s, token_s
        self.answers = _canned()
        self.load = load_metadata
        self.in_flight = 0
        tokens = [gpb.GenerateResponse(request_id="b", delta=gpb.GenerateDelta(text="tok ", token_ids=[i]))
                  for i in range(4)]
        self.tokens = [t.SerializeToString() for t in tokens]
        self.final = gpb.GenerateResponse(request_id="b", final=gpb.GenerateFinal(model="m")).SerializeToString()

    def service(self, details):  # noqa: ANN001, ANN201
        if details.method == GENERATE:
            return grpc.unary_stream_rpc_method_handler(self._generate)
        answer = self.answers.get(details.method)
        if answer is None:
            return None

        async def unary(request: bytes, context) -> bytes:  # noqa: ANN001
            self.in_flight += 1
            try:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            finally:
                self.in_flight -= 1
            context.set_trailing_metadata(self.load(0.0, self.in_flight))
            return answer

        return grpc.unary_unary_rpc_method_handler(unary)

    async def _generate(self, request: bytes, context):  # noqa: ANN001, ANN202
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for i, token in enumerate(self.tokens):
            if i:
                await asyncio.sleep(self.token_s)
            yield token
        yield self.final


class _Proxy(grpc.GenericRpcHandler):
    """The floor: forwards any method's bytes to one upstream, no policy at all."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.channel: grpc.aio.Channel | None = None

    def service(self, details):  # noqa: ANN001, ANN201
        path = details.method
        if self.channel is None:  # made on the serving loop
            self.channel = grpc.aio.insecure_channel(self.upstream)
        if path in STREAMING:
            call = self.channel.unary_stream(path)

            async def stream(request: bytes, context):  # noqa: ANN001, ANN202
                async for item in call(request, timeout=context.time_remaining()):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream)
        call = self.channel.unary_unary(path)

        async def unary(request: bytes, context) -> bytes:  # noqa: ANN001
            return await call(request, timeout=context.time_remaining())

        return grpc.unary_unary_rpc_method_handler(unary)


# -- load ---------------------------------------------------------------------------------
def _caller(channel: grpc.aio.Channel, path: str) -> Callable[[], Awaitable[float]]:
    """One call of ``path``: its latency (Generate: time to first token), in seconds."""
    request = REQUESTS[path]
    if path in STREAMING:
        stream = channel.unary_stream(path)

        async def ttft() -> float:
            began, first = time.perf_counter(), None
            async for _ in stream(request, timeout=10):
                first = first if first is not None else time.perf_counter() - began
            return first

        return ttft
    unary = channel.unary_unary(path)

    async def once() -> float:
        began = time.perf_counter()
        await unary(request, timeout=10)
        return time.perf_counter() - began

    return once


async def load(call: Callable[[], Awaitable[float]], seconds: float, callers: int) -> list[float]:
    """Closed loop: ``callers`` concurrent callers for ``seconds``; every latency."""
    out: list[float] = []
    until = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < until:
            out.append(await call())

    await asyncio.gather(*(one() for _ in range(callers)))
    return out


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile in ms (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def _start(cmd: str, log_dir: Path, name: str, service: str = "") -> ServerProcess:
    return start_backbone_server(cmd, log_dir, service, 120.0, name=name)  # SERVING, or its log


def _replica_cmd(delay_ms: float) -> str:
    return f"{{python}} -m perf.router_bench replica --port {{port}} --delay-ms {delay_ms}"


def _router_cmd(upstreams: dict[str, list[str]], balancer: str = "p2c", code: Path | None = None) -> str:
    """``backbone serve router`` over ``upstreams``; from the source tree ``code`` (an
    export of another commit, for a before/after in the same run) when given."""
    ups = " ".join(f"--upstream {s}={','.join(a)}" for s, a in upstreams.items())
    if code is None:
        entry = "{python} -m server.main"
    else:  # run server.main from that tree: its directory first on sys.path
        entry = ("{python} -c 'import os,runpy,sys; d=sys.argv.pop(1); os.chdir(d); sys.path.insert(0, d); "
                 f"runpy.run_module(\"server.main\", run_name=\"__main__\", alter_sys=True)' {code}")
    return (f"{entry} serve router --port {{port}} --set server.metrics_port=0 "
            f"--set server.log_level=WARNING --set router.balancer={balancer} {ups}")


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used: a cost per call that waiting on a
    busy machine does not inflate the way latency is inflated."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


async def overhead(args, log_dir: Path, procs: list[ServerProcess]) -> dict:  # noqa: ANN001
    replica = _start(_replica_cmd(args.delay_ms), log_dir, "bench replica")
    procs.append(replica)
    proxy = _start(f"{{python}} -m perf.router_bench proxy --port {{port}} --upstream {replica.target}",
                   log_dir, "bare proxy")
    procs.append(proxy)
    ups = {s: [replica.target] for s in ("embedding", "search", "generation")}
    router = _start(_router_cmd(ups), log_dir, "router", "backbone.v1.EmbeddingService")
    procs.append(router)
    servers = {"direct": replica, "proxy": proxy, "router": router}
    if args.baseline_code is not None:
        servers["router_baseline"] = _start(_router_cmd(ups, code=args.baseline_code), log_dir,
                                            "router baseline", "backbone.v1.EmbeddingService")
        procs.append(servers["router_baseline"])
    channels = {name: grpc.aio.insecure_channel(p.target) for name, p in servers.items()}
    ops = {"embed": EMBED, "search": SEARCH, "generate_ttft": GENERATE}
    rounds: dict[tuple[str, int, str], list[tuple[float, float, int, float]]] = {}
    for path in ops.values():
        for ch in channels.values():
            await load(_caller(ch, path), 0.5, 4)  # warm-up: connections, EWMAs
    names = list(channels)
    for r in range(args.rounds):
        for op, path in ops.items():
            for callers in args.callers:
                order = names[r % len(names):] + names[:r % len(names)]
                for target in order:
                    pid = servers[target].pid
                    cpu = _cpu_s(pid)
                    lat = await load(_caller(channels[target], path), args.seconds, callers)
                    cpu_us = (_cpu_s(pid) - cpu) / max(1, len(lat)) * 1e6
                    rounds.setdefault((op, callers, target), []).append(
                        (pct(lat, 0.5), pct(lat, 0.99), len(lat), cpu_us))
        print(f"[bench] overhead round {r + 1}/{args.rounds} done", file=sys.stderr)
    result: dict = {}
    for op in ops:
        for callers in args.callers:
            cell: dict = {}
            base = rounds[(op, callers, "direct")]
            for target in names:
                got = rounds[(op, callers, target)]
                cell[target] = {"p50_ms": _med([g[0] for g in got]), "p99_ms": _med([g[1] for g in got]),
                                "calls": sum(g[2] for g in got),
                                "server_cpu_us_per_call": round(statistics.median(g[3] for g in got))}
                if target != "direct":
                    cell[target]["added_p50_ms"] = _med([g[0] - b[0] for g, b in zip(got, base)])
                    cell[target]["added_p99_ms"] = _med([g[1] - b[1] for g, b in zip(got, base)])
            router_r, proxy_r = rounds[(op, callers, "router")], rounds[(op, callers, "proxy")]
            cell["router_minus_proxy_p50_ms"] = _med([a[0] - b[0] for a, b in zip(router_r, proxy_r)])
            result[f"{op}@{callers}"] = cell
    for ch in channels.values():
        await ch.close()
    return result


async def slow(args, log_dir: Path, procs: list[ServerProcess]) -> dict:  # noqa: ANN001
    base = args.slow_base_ms
    mixed = [_start(_replica_cmd(ms), log_dir, f"mixed replica {i}")
             for i, ms in enumerate((base, base, base * args.slow_factor))]
    healthy = [_start(_replica_cmd(base), log_dir, f"healthy replica {i}") for i in range(3)]
    procs.extend(mixed + healthy)
    addrs, haddrs = [p.target for p in mixed], [p.target for p in healthy]
    r_mixed = _start(_router_cmd({"embedding": addrs}), log_dir, "router mixed", "backbone.v1.EmbeddingService")
    r_healthy = _start(_router_cmd({"embedding": haddrs}), log_dir, "router healthy",
                       "backbone.v1.EmbeddingService")
    procs.extend([r_mixed, r_healthy])
    rr = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
    channels = {
        "router_p2c_slow": grpc.aio.insecure_channel(r_mixed.target),
        "grpc_round_robin_slow": grpc.aio.insecure_channel(
            "ipv4:" + ",".join(addrs), options=[("grpc.service_config", rr)]),
        "router_all_healthy": grpc.aio.insecure_channel(r_healthy.target),
    }
    if args.baseline_code is not None:  # another commit's router over the same three
        r_base = _start(_router_cmd({"embedding": addrs}, code=args.baseline_code), log_dir,
                        "router baseline mixed", "backbone.v1.EmbeddingService")
        procs.append(r_base)
        channels["router_baseline_slow"] = grpc.aio.insecure_channel(r_base.target)
    for ch in channels.values():
        await load(_caller(ch, EMBED), 1.0, 2)
    names = list(channels)
    result: dict = {}
    routers = [n for n in ("router_p2c_slow", "router_baseline_slow") if n in channels]
    for callers in args.slow_callers:
        before = {n: await _calls(channels[n]) for n in routers}
        per: dict[str, list[tuple[float, float, int]]] = {n: [] for n in names}
        for r in range(args.rounds):
            for target in names[r % len(names):] + names[:r % len(names)]:
                lat = await load(_caller(channels[target], EMBED), args.seconds * 2, callers)
                per[target].append((pct(lat, 0.5), pct(lat, 0.99), len(lat)))
        cell = {n: {"p50_ms": _med([g[0] for g in v]), "p99_ms": _med([g[1] for g in v]),
                    "calls": sum(g[2] for g in v)} for n, v in per.items()}
        for n in routers:
            after = await _calls(channels[n])
            calls = {a: after.get(a, 0) - before[n].get(a, 0) for a in after}
            cell[n]["slow_replica_share"] = round(calls.get(addrs[2], 0) / max(1, sum(calls.values())), 4)
        cell["slow_replica_share"] = cell["router_p2c_slow"]["slow_replica_share"]
        cell["p99_router_slow_over_all_healthy"] = round(
            _med([a[1] / b[1] for a, b in zip(per["router_p2c_slow"], per["router_all_healthy"])]), 2)
        cell["p99_round_robin_over_router"] = round(
            _med([a[1] / b[1] for a, b in zip(per["grpc_round_robin_slow"], per["router_p2c_slow"])]), 2)
        result[f"callers={callers}"] = cell
        print(f"[bench] slow, {callers} callers done", file=sys.stderr)
    for ch in channels.values():
        await ch.close()
    return result


#: The policy's own cost per call: ReplicaSet.run with an attempt that answers at once,
#: through the production builder and metrics hooks; printed as JSON (us per call).
POLICY_MICRO = """
import asyncio, json, sys, time
from server.config import RouterConfig
from server.router.upstream_pool import build_replica_set
from server.router import metrics
async def main(calls):
    out = {}
    for n in (1, 3):
        rs = build_replica_set("backbone.v1.EmbeddingService", RouterConfig(outlier_ratio=1e9))
        metrics.watch_set(rs)
        for i in range(n):
            rs.add(f"r{i}:1").healthy = True
        async def attempt(ep, timeout):
            return b"", ()
        for _ in range(calls // 5):
            await rs.run(attempt, deadline=time.monotonic() + 5, replay=True, hedge=True)
        began = time.perf_counter()
        for _ in range(calls):
            await rs.run(attempt, deadline=time.monotonic() + 5, replay=True, hedge=True)
        out[f"{n}_replicas"] = (time.perf_counter() - began) / calls * 1e6
    print(json.dumps(out))
import uvloop
uvloop.run(main(int(sys.argv[1])))
"""


def policy(args) -> dict:  # noqa: ANN001
    """The policy's cost per call (us), this tree vs ``--baseline-code``, alternating
    rounds, each in its own fresh process."""
    import subprocess

    trees = {"current": REPO_ROOT}
    if args.baseline_code is not None:
        trees["baseline"] = args.baseline_code.resolve()
    got: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree))
            done = subprocess.run([sys.executable, "-c", POLICY_MICRO, "20000"], cwd=tree, env=env,
                                  capture_output=True, text=True, check=True)
            got[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {name: {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
              for name, runs in got.items()}
    if "baseline" in result:
        result["baseline_over_current"] = {
            k: round(statistics.median(b[k] / c[k] for b, c in zip(got["baseline"], got["current"])), 2)
            for k in got["current"][0]}
    return result


async def _calls(channel: grpc.aio.Channel) -> dict[str, int]:
    listing = await router_service_pb2_grpc.RouterServiceStub(channel).ListEndpoints(rpb.ListEndpointsRequest())
    return {e.address: e.calls for e in listing.endpoints}


def _load_avg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


async def bench(args) -> dict:  # noqa: ANN001
    procs: list[ServerProcess] = []
    report: dict = {"setup": {
        "rounds": args.rounds, "seconds_per_round": args.seconds, "replica_delay_ms": args.delay_ms,
        "slow": f"injected asyncio delay: {args.slow_base_ms} ms x2 and "
                f"{args.slow_base_ms * args.slow_factor} ms", "load_average_start": _load_avg()}}
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        try:
            if "policy" in args.scenarios:
                report["policy_us_per_call"] = policy(args)
            if "overhead" in args.scenarios:
                report["overhead"] = await overhead(args, Path(tmp), procs)
            if "slow" in args.scenarios:
                report["slow"] = await slow(args, Path(tmp), procs)
        finally:
            for p in procs:
                p.stop(grace_s=5)
    report["setup"]["load_average_end"] = _load_avg()
    return report


def markdown(report: dict) -> str:
    """The report as markdown tables."""
    lines = []
    if "overhead" in report:
        lines += ["| call @ callers | direct p50/p99 | bare proxy p50/p99 (added p50) | router p50/p99 "
                  "(added p50 / p99) | router - proxy p50 | CPU us/call proxy / router | "
                  "baseline router p50 (added) / CPU |", "|---|---|---|---|---|---|---|"]
        for key, c in report["overhead"].items():
            d, p, r = c["direct"], c["proxy"], c["router"]
            b = c.get("router_baseline")
            base = f"{b['p50_ms']} (+{b['added_p50_ms']}) / {b['server_cpu_us_per_call']}" if b else "-"
            lines.append(f"| {key} | {d['p50_ms']} / {d['p99_ms']} | {p['p50_ms']} / {p['p99_ms']} "
                         f"(+{p['added_p50_ms']}) | {r['p50_ms']} / {r['p99_ms']} (+{r['added_p50_ms']} / "
                         f"+{r['added_p99_ms']}) | {c['router_minus_proxy_p50_ms']} | "
                         f"{p['server_cpu_us_per_call']} / {r['server_cpu_us_per_call']} | {base} |")
    if "slow" in report:
        lines += ["", "| callers | router (slow) p50/p99 | round_robin p50/p99 | router all healthy p50/p99 "
                  "| slow share | p99 slow/healthy | p99 rr/router |", "|---|---|---|---|---|---|---|"]
        for key, c in report["slow"].items():
            a, b, h = c["router_p2c_slow"], c["grpc_round_robin_slow"], c["router_all_healthy"]
            lines.append(f"| {key} | {a['p50_ms']} / {a['p99_ms']} | {b['p50_ms']} / {b['p99_ms']} | "
                         f"{h['p50_ms']} / {h['p99_ms']} | {c['slow_replica_share'] * 100:.2f} % | "
                         f"{c['p99_router_slow_over_all_healthy']} | {c['p99_round_robin_over_router']} |")
            z = c.get("router_baseline_slow")
            if z:
                lines.append(f"| {key}, baseline router | {z['p50_ms']} / {z['p99_ms']} | | | "
                             f"{z['slow_replica_share'] * 100:.2f} % | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    rep = sub.add_parser("replica", help="serve the bench replica")
    rep.add_argument("--port", type=int, required=True)
    rep.add_argument("--delay-ms", type=float, default=0.0)
    rep.add_argument("--token-ms", type=float, default=1.0)
    prx = sub.add_parser("proxy", help="serve the bare byte-forwarding proxy")
    prx.add_argument("--port", type=int, required=True)
    prx.add_argument("--upstream", required=True)
    ap.add_argument("--scenarios", nargs="+", default=["policy", "overhead", "slow"], choices=["policy", "overhead", "slow"])
    ap.add_argument("--seconds", type=float, default=2.0, help="per target and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--callers", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--delay-ms", type=float, default=0.0, help="overhead replica's injected delay")
    ap.add_argument("--slow-base-ms", type=float, default=10.0)
    ap.add_argument("--slow-factor", type=float, default=5.0)
    ap.add_argument("--slow-callers", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--baseline-code", type=Path, default=None,
                    help="a source tree of another commit (git archive): its router is a 4th "
                         "overhead target, for a before/after in the same run")
    args = ap.parse_args(argv)
    import uvloop  # a core dependency

    run = uvloop.run
    if args.command == "replica":
        run(_serve(args.port, _Replica(args.delay_ms / 1e3, args.token_ms / 1e3)))
        return
    if args.command == "proxy":
        run(_serve(args.port, _Proxy(args.upstream)))
        return
    report = run(bench(args))
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    print(markdown(report))


if __name__ == "__main__":
    main()
