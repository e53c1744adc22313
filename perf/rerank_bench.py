"""The rerank hop's benchmark: 1 query x 32 passages of about 100 words, in one run.

Everything runs as separate processes: the rerank server (``python -m server.main serve
rerank``), each client phase (``python -m perf.rerank_bench client``, grpc.aio closed loop)
and the in-process reference (``python -m perf.rerank_bench inprocess``, the engine called
directly with the whole request as one batch, no gRPC). Two server set-ups, one after the
other, never at the same time:

* **cold** (``rerank.doc_cache_mb=0``): every request carries 32 passages the model has
  to read; the model path at 1 and at 8 concurrent callers, beside in-process scoring;
* **warm** (the default config, document cache on): the same 32 passages every request
  (only the query is new), as when the same candidates are reranked again; 1 and 8 callers
  beside in-process scoring with a warm cache.

Passages are MS MARCO passages of 80 to 130 words (``../shared/datasets/msmarco``); queries
are its 50 queries. Writes ``perf/results/rerank.json`` and ``rerank.md`` (p50/p95/p99 per
phase; the target is p99 <= 100 ms at 1 caller).

``python -m perf.rerank_bench`` (defaults) or, as a quick smoke,
``python -m perf.rerank_bench --cold-requests 4 --warm-requests 20 --out-dir /tmp/rr``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from perf.harness import REPO_ROOT, ServerProcess, start_backbone_server
from perf.report import latency_summary, markdown_table, read_json, write_json

MSMARCO_DIR = REPO_ROOT.parent / "shared" / "datasets" / "msmarco"
DEFAULT_OUT_DIR = REPO_ROOT / "perf" / "results"
DEFAULT_SERVER_CMD = "{python} -m server.main serve rerank --port {port} --set server.metrics_port=0"
RERANK_SERVICE = "backbone.v1.RerankService"
PASSAGES_PER_REQUEST = 32
MIN_WORDS, MAX_WORDS = 80, 130
TARGET_P99_MS = 100.0


# --- the workload (shared by client and in-process) ---------------------------------------


def load_workload(seed: int) -> tuple[list[str], list[str]]:
    """(queries, passages of MIN_WORDS..MAX_WORDS words in a seeded order)."""
    queries = [json.loads(line)["text"] for line in open(MSMARCO_DIR / "queries.jsonl", encoding="utf-8")]
    passages = []
    for line in open(MSMARCO_DIR / "corpus.jsonl", encoding="utf-8"):
        text = json.loads(line)["text"]
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            passages.append(text)
    random.Random(seed).shuffle(passages)
    return queries, passages


def request_texts(i: int, queries: list[str], passages: list[str], fresh: bool) -> tuple[str, list[str]]:
    """The i-th request: a query and 32 passages (new ones each time when ``fresh``)."""
    n = PASSAGES_PER_REQUEST
    start = (i * n) % max(1, len(passages) - n) if fresh else 0
    return queries[i % len(queries)], passages[start : start + n]


# --- client process -----------------------------------------------------------------------


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from backbone.v1 import rerank_service_pb2 as pb
    from backbone.v1 import rerank_service_pb2_grpc as pb_grpc

    queries, passages = load_workload(args.seed)
    fresh = args.passages == "fresh"
    counter = iter(range(10**9))
    latencies: list[float] = []
    server_ms: dict[str, list[float]] = {"queue": [], "compute": [], "total": []}
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    total = args.warmup + args.requests
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb_grpc.RerankServiceStub(channel)

        async def caller() -> None:
            while (i := next(counter)) < total:
                query, docs = request_texts(i, queries, passages, fresh)
                started = time.perf_counter()
                try:
                    reply = await stub.Rerank(
                        pb.RerankRequest(query=query, documents=docs), timeout=args.timeout
                    )
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] = errors.get(error.code().name, 0) + 1
                    continue
                elapsed_ms = (time.perf_counter() - started) * 1000
                if len(reply.results) != len(docs):
                    errors["BAD_RESPONSE"] = errors.get("BAD_RESPONSE", 0) + 1
                    continue
                if i >= args.warmup:
                    latencies.append(elapsed_ms)
                    t = reply.timings[0]
                    server_ms["queue"].append(t.queue_us / 1000)
                    server_ms["compute"].append(t.compute_us / 1000)
                    server_ms["total"].append(t.total_us / 1000)
                    batch_sizes.append(t.batch_size)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
    return {
        "concurrency": args.concurrency,
        "passages": args.passages,
        "requests": len(latencies),
        "errors": errors,
        "latency_ms": latency_summary(latencies),
        "server_ms": {k: latency_summary(v) for k, v in server_ms.items()},
        "max_batch_size": max(batch_sizes, default=0),
        "requests_per_s": round(len(latencies) / wall, 2) if wall > 0 else None,
    }


def client_main(args: argparse.Namespace) -> int:
    """``client``: closed-loop callers against a running server; JSON to --json-out."""
    import uvloop

    result = uvloop.run(_client(args))
    write_json(Path(args.json_out), result)
    return 0


# --- in-process reference -----------------------------------------------------------------


def inprocess_main(args: argparse.Namespace) -> int:
    """``inprocess``: the engine called directly, the whole request as one batch."""
    from server.config import RerankConfig
    from server.engines import registry
    from server.engines.reranker import score_in_process

    fresh = args.passages == "fresh"
    config = RerankConfig(
        engine=args.engine, model_path=args.model_path, doc_cache_mb=0 if fresh else 256
    )
    engine = registry.load(registry.RERANK, config.engine, config)
    queries, passages = load_workload(args.seed)
    latencies = []
    for i in range(args.warmup + args.requests):
        query, docs = request_texts(i, queries, passages, fresh)
        started = time.perf_counter()
        scores = score_in_process(engine, query, docs, batch_size=len(docs) + 1)
        elapsed_ms = (time.perf_counter() - started) * 1000
        assert len(scores) == len(docs)
        if i >= args.warmup:
            latencies.append(elapsed_ms)
    write_json(Path(args.json_out), {
        "passages": args.passages, "requests": len(latencies), "latency_ms": latency_summary(latencies),
    })
    return 0


# --- orchestration ------------------------------------------------------------------------


def start_server(args: argparse.Namespace, log_dir: Path, name: str, extra_sets: list[str]) -> ServerProcess:
    """Start the rerank server as its own process and wait for SERVING (perf/harness.py)."""
    return start_backbone_server(
        args.server_cmd, log_dir, RERANK_SERVICE, args.startup_timeout,
        name=f"rerank server {name}", extra_sets=[*engine_sets(args), *extra_sets],
    )


def engine_sets(args: argparse.Namespace) -> list[str]:
    """``--set`` values selecting the engine."""
    sets = [f"rerank.engine={args.engine}"]
    if args.model_path:
        sets.append(f"rerank.model_path={args.model_path}")
    return sets


def run_child(args: argparse.Namespace, argv: list[str], out: Path) -> dict[str, Any]:
    """Run one phase as ``python -m perf.rerank_bench ...``; its JSON."""
    cmd = [sys.executable, "-m", "perf.rerank_bench", *argv, "--seed", str(args.seed),
           "--json-out", str(out)]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return read_json(out)


def run_setup(args: argparse.Namespace, raw: Path, name: str, passages: str, requests: int,
              extra_sets: list[str]) -> dict[str, Any]:
    """One server set-up: in-process reference, then 1 and 8 callers through the server."""
    phases: dict[str, Any] = {}
    engine_args = ["--engine", args.engine, "--model-path", args.model_path]
    phases["inprocess"] = run_child(
        args, ["inprocess", "--passages", passages, "--requests", str(requests),
               "--warmup", str(args.warmup), *engine_args], raw / f"{name}_inprocess.json")
    server = start_server(args, raw, name, extra_sets)
    try:
        for callers in args.concurrency:
            phases[f"callers_{callers}"] = run_child(
                args, ["client", "--target", server.target, "--passages", passages,
                       "--concurrency", str(callers), "--requests", str(max(requests, callers * 3)),
                       "--warmup", str(max(args.warmup, callers)), "--timeout", str(args.timeout)],
                raw / f"{name}_callers_{callers}.json")
    finally:
        server.stop()
    return phases


def markdown(results: dict[str, Any]) -> str:
    """The report table."""
    rows = []
    for name, setup in results["setups"].items():
        for phase, data in setup.items():
            lat = data["latency_ms"]
            who = "in-process (one batch)" if phase == "inprocess" else f"server, {data['concurrency']} caller(s)"
            rows.append([name, who, data["requests"], lat["p50"], lat["p95"], lat["p99"],
                         data.get("max_batch_size", "–"), json.dumps(data.get("errors", {}))])
    table = markdown_table(
        ["set-up", "caller", "requests", "p50 ms", "p95 ms", "p99 ms", "max batch", "errors"], rows
    )
    lines = [
        "# Rerank benchmark: 1 query x 32 passages (80-130 words)", "",
        f"engine `{results['meta']['engine']}`, {results['meta']['cpus']} CPUs, "
        f"{results['meta']['date']}", "", table, "",
        f"Target: p99 <= {TARGET_P99_MS:.0f} ms at 1 caller.",
    ]
    for name, setup in results["setups"].items():
        one = setup.get("callers_1")
        if one:
            p99 = one["latency_ms"]["p99"]
            verdict = "met" if p99 is not None and p99 <= TARGET_P99_MS else "NOT met"
            lines.append(f"- {name}: p99 at 1 caller {p99} ms -> target {verdict}")
    return "\n".join(lines) + "\n"


def orchestrate(args: argparse.Namespace) -> int:
    """Run every set-up and write the JSON and markdown reports."""
    out_dir = Path(args.out_dir)
    raw = out_dir / "rerank_raw"
    raw.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {
            "engine": args.engine, "model_path": args.model_path,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "passages_per_request": PASSAGES_PER_REQUEST, "words": [MIN_WORDS, MAX_WORDS],
        },
        "setups": {},
    }
    results["setups"]["cold (no document cache, new passages)"] = run_setup(
        args, raw, "cold", "fresh", args.cold_requests, ["rerank.doc_cache_mb=0"])
    if args.engine == "maxsim":
        results["setups"]["warm (document cache, same passages)"] = run_setup(
            args, raw, "warm", "repeat", args.warm_requests, [])
    write_json(out_dir / "rerank.json", results)
    report = markdown(results)
    (out_dir / "rerank.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: orchestrate (default), or one ``client`` / ``inprocess`` phase."""
    parser = argparse.ArgumentParser(prog="python -m perf.rerank_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    sub = parser.add_subparsers(dest="mode")
    client = sub.add_parser("client", help="closed-loop callers against a server")
    client.add_argument("--target", required=True)
    client.add_argument("--concurrency", type=int, default=1)
    client.add_argument("--requests", type=int, default=20)
    client.add_argument("--warmup", type=int, default=2)
    client.add_argument("--timeout", type=float, default=120.0)
    client.add_argument("--passages", choices=("fresh", "repeat"), default="fresh")
    inproc = sub.add_parser("inprocess", help="the engine called directly")
    inproc.add_argument("--requests", type=int, default=20)
    inproc.add_argument("--warmup", type=int, default=2)
    inproc.add_argument("--passages", choices=("fresh", "repeat"), default="fresh")
    inproc.add_argument("--engine", default="maxsim")
    inproc.add_argument("--model-path", default="")
    for p in (client, inproc):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json-out", required=True)
    parser.add_argument("--engine", default="maxsim", choices=("maxsim", "cross_encoder"))
    parser.add_argument("--model-path", default="", help="cross-encoder model directory")
    parser.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cold-requests", type=int, default=30)
    parser.add_argument("--warm-requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.mode == "client":
        return client_main(args)
    if args.mode == "inprocess":
        return inprocess_main(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
