"""Fuzz the embedded default as a hostile client would, from a separate process, and
check the error contract over every answer.

This process is the client. It starts ``python -m server.main serve`` (the embedded
default: every hop, the bundled models, a fresh data directory) through
``perf/harness.py`` and then runs four phases:

1. **fuzz**: ``--requests`` calls (default 20,000) drawn by the property test's
   strategies (``perf/fuzz_cases.py``: every RPC of every service; adversarial fields,
   invalid UTF-8, flipped/cut/random bytes, deep metadata), drawn in chunks in a worker
   process while the previous chunk is sent by ``--concurrency`` callers. Counts by
   (RPC, status code); every error must carry exactly one ErrorInfo, trailers < 2 KiB,
   never UNKNOWN or INTERNAL; health is checked after every chunk.
2. **undecodable**: ``--undecodable`` (10,000) raw undecodable requests (the issue's
   reproducers) across every unary and server-streaming RPC; the growth of the server's
   log over the phase must stay under 100 KiB (one rate-limited warning line).
3. **churn**: ``--churn-seconds`` (30) of create/delete of one collection against
   concurrent describe/list/search/get/upsert (``tests/fuzz/churn.py``): zero INTERNAL,
   every point acknowledged into the last incarnation readable.
4. **restart**: the server is stopped and started on the same data directory (the hops
   that own it: embedding and search); every
   collection must load (describe OK), the churn's acknowledged points and the known
   collection's points must be readable, and the start must log no ERROR.

Writes ``perf/results/fuzz.json`` and ``perf/results/fuzz.md``; the server's logs go to
``perf/results/fuzz_raw/``. Exit code 1 when a judged check fails.

``.venv/bin/python -m perf.fuzz_bench`` (real models; ~15 min on a loaded 2-core box);
quicker: ``--requests 2000 --undecodable 1000 --churn-seconds 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backbone.v1 import common_pb2
from backbone.v1 import embedding_service_pb2 as emb
from backbone.v1 import embedding_service_pb2_grpc as emb_grpc
from backbone.v1 import generation_service_pb2 as gen
from backbone.v1 import generation_service_pb2_grpc as gen_grpc
from backbone.v1 import vector_search_service_pb2 as vs
from backbone.v1 import vector_search_service_pb2_grpc as vs_grpc
from perf.fuzz_cases import (
    CHANNEL_OPTIONS,
    Case,
    Target,
    contract_methods,
    draw_cases,
)
from perf.fuzz_client import send, send_and_judge
from perf.harness import REPO_ROOT, ServerProcess, start_backbone_server
from perf.report import markdown_table, write_json

DEFAULT_SERVER_CMD = (
    "{python} -m server.main serve --port {port} --set server.metrics_port=0 "
    "--set search.data_dir={data}"
)
# The restart re-opens the data directory with the hops that own it (embedding for text,
# search for the collections): no generation engine to load, so a restart on a box
# whose memory other work has taken still tests what it is for.
RESTART_CMD = (
    "{python} -m server.main serve embedding search --port {port} --set server.metrics_port=0 "
    "--set search.data_dir={data}"
)
FAKE_SERVER_CMD = "{python} -m perf.fuzz_server --port {port} --data {data}"
DEFAULT_OUT_DIR = REPO_ROOT / "perf" / "results"
CHUNK = 500
MAX_LOG_GROWTH = 100 * 1024  # bytes over the undecodable phase
KNOWN = "fuzz"
UNDECODABLE = [bytes.fromhex(h) for h in ("ffffffff", "0a02fffe", "1a100a", "ff", "12ff01")]


# ----------------------------------------------------------------- drawing in a worker


def _draw_chunk(target: Target, n: int, seed: int) -> list[tuple[str, tuple[bytes, ...], str]]:
    """Cases as picklable (path, messages, kind)."""
    return [(c.method.path, c.messages, c.kind) for c in draw_cases(target, n, seed)]


# ----------------------------------------------------------------- phases


async def _health(channel: grpc.aio.Channel) -> str:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def setup(channel: grpc.aio.Channel) -> Target:
    """The known collection (the embedding model's dimension, a few points) and the models."""
    models = await gen_grpc.GenerationServiceStub(channel).ListModels(gen.ListModelsRequest(), timeout=60)
    probe = await emb_grpc.EmbeddingServiceStub(channel).Embed(emb.EmbedRequest(inputs=["probe"]), timeout=60)
    dim = len(probe.embeddings[0].values)
    stub = vs_grpc.VectorSearchServiceStub(channel)
    await stub.CreateCollection(vs.CreateCollectionRequest(name=KNOWN, dimension=dim), timeout=60)
    points = []
    for i in range(8):
        payload = vs.Payload(text=f"point {i}: the error contract under hostile input")
        payload.metadata.update({"lang": "en" if i % 2 else "de", "year": 2000 + i, "tags": ["a"]})
        points.append(vs.Point(id=f"k{i}", vector=common_pb2.Vector(values=[float((i + j) % 5) for j in range(dim)]),
                               payload=payload))
    await stub.UpsertBatch(vs.UpsertBatchRequest(collection=KNOWN, points=points), timeout=60)
    return Target(collection=KNOWN, dimension=dim, models=tuple(m.name for m in models.models))


async def fuzz_phase(channel, target: Target, n: int, concurrency: int, seed: int) -> dict[str, Any]:
    """Send ``n`` drawn cases; counts, violations, health after every chunk."""
    methods = {m.path: m for m in contract_methods()}
    codes: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    violations: list[dict[str, Any]] = []
    one_info = errors = client_deadlines = 0
    health: list[str] = []
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(1) as pool:
        chunks = [min(CHUNK, n - i) for i in range(0, n, CHUNK)]
        pending = loop.run_in_executor(pool, _draw_chunk, target, chunks[0], seed)
        sent = 0
        for k, size in enumerate(chunks):
            drawn = await pending
            if k + 1 < len(chunks):
                pending = loop.run_in_executor(pool, _draw_chunk, target, chunks[k + 1], seed + k + 1)
            queue = [Case(methods[p], m, kind) for p, m, kind in drawn]

            async def worker() -> None:
                nonlocal one_info, errors, client_deadlines
                while queue:
                    case = queue.pop()
                    outcome, problems = await send_and_judge(channel, case, target)
                    codes[(case.method.name, outcome.code)] += 1
                    kinds[case.kind.split("+")[0]] += 1
                    if outcome.code != "OK":
                        errors += 1
                        one_info += len(outcome.reasons) == 1
                    client_deadlines += outcome.client_deadline
                    if problems and len(violations) < 100:
                        violations.append({"case": repr(case), "code": outcome.code,
                                           "details": outcome.details, "problems": problems})
                    elif problems:
                        violations.append({"problems": problems})

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            sent += len(drawn)
            health.append(await _health(channel))
            print(f"[fuzz] {sent}/{n} sent, {len(violations)} violations, health {health[-1]} "
                  f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    by_code = collections.Counter()
    for (_, code), count in codes.items():
        by_code[code] += count
    return {
        "requests": sum(codes.values()), "seconds": round(time.monotonic() - started, 1),
        "by_code": dict(by_code.most_common()),
        "by_rpc_code": {f"{rpc} {code}": c for (rpc, code), c in sorted(codes.items())},
        "by_kind": dict(kinds.most_common()),
        "errors": errors, "errors_with_exactly_one_error_info": one_info,
        "client_deadline_then_answered": client_deadlines,
        "unknown": by_code.get("UNKNOWN", 0), "internal": by_code.get("INTERNAL", 0),
        "violations": len(violations), "violation_samples": violations[:20],
        "health_after_chunks": dict(collections.Counter(health)),
    }


async def undecodable_phase(channel, log_path: Path, n: int, concurrency: int) -> dict[str, Any]:
    """``n`` raw undecodable requests to the unary-in RPCs; the log's growth."""
    methods = [m for m in contract_methods() if not m.client_streaming]
    before = log_path.stat().st_size
    codes: collections.Counter = collections.Counter()
    bad = 0
    todo = [Case(methods[i % len(methods)], (UNDECODABLE[i % len(UNDECODABLE)],), "undecodable") for i in range(n)]

    async def worker() -> None:
        nonlocal bad
        while todo:
            case = todo.pop()
            outcome = await send(channel, case, 30)
            codes[outcome.code] += 1
            bad += outcome.code != "OK" and len(outcome.reasons) != 1
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await asyncio.sleep(0.5)  # let the server's log handler flush
    growth = log_path.stat().st_size - before
    return {"requests": n, "seconds": round(time.monotonic() - started, 1), "by_code": dict(codes),
            "without_one_error_info": bad, "log_growth_bytes": growth,
            "log_growth_ok": growth < MAX_LOG_GROWTH}


async def churn_phase(channel, seconds: float) -> dict[str, Any]:
    """tests/fuzz/churn.py against the real server; acknowledged points read back."""
    from tests.fuzz.churn import NAME, churn

    result = await churn(channel, seconds)
    found = await vs_grpc.VectorSearchServiceStub(channel).Get(
        vs.GetRequest(collection=NAME, ids=sorted(result.final_acked)), timeout=60)
    readable = {p.id for p in found.points}
    codes = collections.Counter()
    for (_, code), count in result.codes.items():
        codes[code] += count
    return {
        "seconds": seconds, "cycles": result.cycles, "by_code": dict(codes),
        "by_rpc_code": {f"{rpc} {code}": c for (rpc, code), c in sorted(result.codes.items())},
        "internal": codes.get("INTERNAL", 0), "violations": len(result.bad),
        "violation_samples": result.bad[:10],
        "acknowledged_last_incarnation": len(result.final_acked),
        "acknowledged_readable": len(result.final_acked & readable),
        "final_acked": sorted(result.final_acked),
    }


async def restart_check(channel, final_acked: list[str]) -> dict[str, Any]:
    """After the restart: every collection describes OK; the acknowledged points read back."""
    from tests.fuzz.churn import NAME

    stub = vs_grpc.VectorSearchServiceStub(channel)
    listed = await stub.ListCollections(vs.ListCollectionsRequest(), timeout=60)
    failed = []
    for info in listed.collections:
        try:
            await stub.DescribeCollection(vs.DescribeCollectionRequest(name=info.name), timeout=60)
        except grpc.aio.AioRpcError as err:
            failed.append(f"{info.name[:40]}: {err.code().name}")
    got = await stub.Get(vs.GetRequest(collection=NAME, ids=final_acked), timeout=60)
    known = await stub.Get(vs.GetRequest(collection=KNOWN, ids=[f"k{i}" for i in range(8)]), timeout=60)
    return {"collections": len(listed.collections), "describe_failed": failed,
            "churn_acknowledged_readable": len({p.id for p in got.points}), "churn_acknowledged": len(final_acked),
            "known_points_readable": len(known.points)}


def _log_errors(path: Path) -> list[str]:
    lines = path.read_text(errors="replace").splitlines()
    return [line[:200] for line in lines if " ERROR " in line or "Traceback" in line]


# ----------------------------------------------------------------- report


def judged(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's judged checks over one run."""
    f, u, c, r = result["fuzz"], result["undecodable"], result["churn"], result["restart"]
    return {
        "fuzz >= 20,000 requests": f["requests"] >= 20_000,
        "zero UNKNOWN, zero INTERNAL (fuzz)": f["unknown"] == 0 and f["internal"] == 0,
        "every error exactly one ErrorInfo (fuzz)": f["errors_with_exactly_one_error_info"] == f["errors"],
        "no contract violation (fuzz)": f["violations"] == 0,
        "SERVING after every chunk": set(f["health_after_chunks"]) == {"SERVING"},
        "log growth < 100 KiB over 10,000 undecodable": u["log_growth_ok"] and u["without_one_error_info"] == 0,
        "churn: zero INTERNAL, no violation": c["internal"] == 0 and c["violations"] == 0,
        "churn: acknowledged points readable": c["acknowledged_readable"] == c["acknowledged_last_incarnation"],
        "restart: every collection loads, points readable, no ERROR logged": (
            not r["describe_failed"] and r["churn_acknowledged_readable"] == r["churn_acknowledged"]
            and r["known_points_readable"] == 8 and not r["start_errors"]),
    }


def markdown(result: dict[str, Any]) -> str:
    f, u, c, r = result["fuzz"], result["undecodable"], result["churn"], result["restart"]
    out = [f"# Fuzz run ({result['when']}, load average at start {result['load_average']})\n",
           f"Server: `{result['server_cmd']}`, client in its own process, "
           f"{result['concurrency']} callers.\n"]
    out.append(markdown_table(["check", "result"], [[k, "met" if v else "**not met**"] for k, v in result["judged"].items()]))
    out.append(f"\n## Fuzz: {f['requests']:,} requests in {f['seconds']} s\n")
    out.append(markdown_table(["code", "count"], [[k, v] for k, v in f["by_code"].items()]))
    out.append("\n" + markdown_table(["RPC code", "count"], [[k, v] for k, v in f["by_rpc_code"].items()]))
    out.append(f"\nKinds: {f['by_kind']}. Errors {f['errors']:,}, with exactly one ErrorInfo "
               f"{f['errors_with_exactly_one_error_info']:,}; client deadline then answered: "
               f"{f['client_deadline_then_answered']}; violations {f['violations']}.\n")
    out.append(f"\n## Undecodable: {u['requests']:,} requests, log grew {u['log_growth_bytes']:,} bytes; "
               f"codes {u['by_code']}\n")
    out.append(f"\n## Churn {c['seconds']} s: {c['cycles']} create/delete cycles; codes {c['by_code']}; "
               f"acknowledged {c['acknowledged_last_incarnation']}, readable {c['acknowledged_readable']}\n")
    out.append(f"\n## Restart: {r['collections']} collections, describe failures {len(r['describe_failed'])}, "
               f"churn points readable {r['churn_acknowledged_readable']}/{r['churn_acknowledged']}, "
               f"known points {r['known_points_readable']}/8, ERROR lines at start {len(r['start_errors'])}; "
               f"server log total {result['server_log_bytes']:,} bytes\n")
    return "".join(out)


# ----------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raw = args.out_dir / "fuzz_raw"
    raw.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="fuzz-data-"))
    command = args.server_cmd.replace("{data}", str(data))
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "server_cmd": args.server_cmd,
        "concurrency": args.concurrency, "load_average": os.getloadavg()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    server: ServerProcess = start_backbone_server(command, raw, "", args.startup_timeout, name="fuzz server")
    partial = args.out_dir / "fuzz.partial.json"
    try:
        async with grpc.aio.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
            target = await setup(channel)
            result["target"] = {"dimension": target.dimension, "models": list(target.models)}
            result["fuzz"] = await fuzz_phase(channel, target, args.requests, args.concurrency, args.seed)
            write_json(partial, result)
            result["undecodable"] = await undecodable_phase(channel, server.log_path, args.undecodable, args.concurrency)
            write_json(partial, result)
            result["churn"] = await churn_phase(channel, args.churn_seconds)
            write_json(partial, result)
    finally:
        server.stop()
    first_log = server.log_path.read_bytes()
    restart = (args.restart_cmd or (FAKE_SERVER_CMD if args.fake_engines else RESTART_CMD)).replace("{data}", str(data))
    result["restart_cmd"] = args.restart_cmd or (FAKE_SERVER_CMD if args.fake_engines else RESTART_CMD)
    final_acked = result["churn"].pop("final_acked")
    try:
        second = start_backbone_server(restart, raw, "", args.startup_timeout, name="fuzz server restarted")
    except RuntimeError as exc:  # e.g. no memory left for the engines on a shared box
        result["restart"] = {"failed_to_start": str(exc)[-2000:], "describe_failed": ["not started"],
                             "churn_acknowledged_readable": 0, "churn_acknowledged": len(final_acked),
                             "known_points_readable": 0, "start_errors": [], "collections": 0}
    else:
        try:
            async with grpc.aio.insecure_channel(second.target, options=CHANNEL_OPTIONS) as channel:
                result["restart"] = await restart_check(channel, final_acked)
            result["restart"]["start_errors"] = _log_errors(second.log_path)
        finally:
            second.stop()
    result["server_log_bytes"] = len(first_log)
    result["server_log_error_lines"] = _log_errors(server.log_path)[:20]
    shutil.rmtree(data, ignore_errors=True)
    result["judged"] = judged(result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--undecodable", type=int, default=10_000)
    parser.add_argument("--churn-seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD,
                        help="{python}, {port} and {data} (a fresh data directory) are filled in")
    parser.add_argument("--restart-cmd", default="",
                        help=f"the restart on the same data (default: {RESTART_CMD})")
    parser.add_argument("--fake-engines", action="store_true",
                        help=f"serve the embedded default with fake engines ({FAKE_SERVER_CMD})")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.fake_engines:
        args.server_cmd = FAKE_SERVER_CMD
    result = asyncio.run(run(args))
    write_json(args.out_dir / "fuzz.json", result)
    text = markdown(result)
    (args.out_dir / "fuzz.md").write_text(text, encoding="utf-8")
    print(text)
    print(json.dumps(result["judged"], indent=2))
    return 0 if all(result["judged"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
