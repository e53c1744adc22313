"""The same vector-search scenario on the FAISS and the Milvus (lite) search backends.

    python -m perf.milvus_bench                        # 100,000 x 384, HNSW, top-10
    python -m perf.milvus_bench --n 20000 --requests 400   # a reduced run

Both search hops run at once, each as its own process (``python -m server.main serve
search``), one over FAISS (collections on disk) and one over Milvus, the latter a
milvus-lite server in a third process on loopback; this process is the client. The
data (synthetic clustered unit vectors, seeded, with exact top-k ground truth) and the
queries are the same for both. Steps per backend: create an HNSW collection, stream
every vector in (ingest time), then rounds of ``--concurrency`` closed-loop callers
doing Search(top_k) by vector; the rounds alternate the backend that goes first, and
the latency ratio is taken within each round (the machine's drift moves both sides).

Read the Milvus figures as what they are: milvus-lite 3.x is a pure-Python engine
behind a Milvus-protocol gRPC server, meant for development and tests. Its speed says
nothing about Milvus Standalone or Distributed (Go + C++ segments, query nodes); what
this run does show is that the backbone's Milvus path returns the same neighbours
(recall) through the same API, and what one extra network hop and store costs here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from perf.milvus_lite_server import milvus_lite
from perf.report import markdown_table, median
from perf.search_bench import (
    create,
    ground_truth,
    load_test,
    recall,
    start_search_server,
    stop,
    synthetic,
    upload,
)

COLLECTION = "bench"


def _round(address: str, name: str, queries, k: int, concurrency: int, requests: int) -> dict:
    return asyncio.run(load_test(address, name, queries, k, concurrency, requests))


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; prints a markdown table, writes JSON with ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m perf.milvus_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the collection")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200, help="distinct query vectors")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000, help="searches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from backbone.v1 import vector_search_service_pb2 as pb

    began = time.perf_counter()
    base = synthetic(args.n, args.dim, seed=1)
    queries = synthetic(args.queries, args.dim, seed=2)
    truth = ground_truth(base, queries, args.k)
    results: dict[str, dict] = {"faiss": {"rounds": []}, "milvus": {"rounds": []}}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="milvus-bench-") as tmp:
        uri = stack.enter_context(milvus_lite(Path(tmp) / "milvus"))
        servers = {
            "faiss": start_search_server(Path(tmp) / "faiss"),
            "milvus": start_search_server(Path(tmp) / "unused", extra=[
                "--set", "search.backend=milvus", "--set", f"search.milvus_uri={uri}",
                "--set", "search.milvus_timeout_s=600",
            ]),
        }
        for server in servers.values():
            stack.callback(stop, server)
        for name, server in servers.items():
            create(server.target, COLLECTION, args.dim, pb.INDEX_KIND_HNSW)
            results[name]["ingest_s"] = upload(server.target, COLLECTION, base, per_message=1000)
            if name == "milvus":
                results[name]["indexed_s"] = _wait_indexed(uri, args.n)
            print(f"{name}: {args.n} vectors in {results[name]['ingest_s']:.1f} s", file=sys.stderr)
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                run = _round(servers[name].target, COLLECTION, queries, args.k,
                             args.concurrency, args.requests)
                found = run.pop("found")
                ids = [found.get(i, []) for i in range(len(queries))]
                run["recall"] = recall(ids, truth, args.k)
                results[name]["rounds"].append(run)
                print(f"round {r} {name}: p50 {run['p50_ms']:.2f} ms, "
                      f"{run['throughput_rps']:.0f}/s, recall {run['recall']:.3f}", file=sys.stderr)
    ratios = [m["p50_ms"] / f["p50_ms"] for f, m in
              zip(results["faiss"]["rounds"], results["milvus"]["rounds"], strict=True)]
    rows = []
    for name, res in results.items():
        rounds = res["rounds"]
        rows.append([
            name, f"{res['ingest_s']:.1f}", f"{res.get('indexed_s', 0.0):.1f}",
            f"{median(r['recall'] for r in rounds):.3f}",
            f"{median(r['p50_ms'] for r in rounds):.2f}",
            f"{median(r['p99_ms'] for r in rounds):.2f}",
            f"{median(r['throughput_rps'] for r in rounds):.0f}",
            sum(sum(r["errors"].values()) for r in rounds),
        ])
    print(markdown_table(
        ["backend", "ingest s", "then indexed s", f"recall@{args.k}", "p50 ms", "p99 ms", "searches/s", "errors"],
        rows,
    ))
    print(f"\nmilvus/faiss p50 within rounds: {', '.join(f'{x:.1f}x' for x in ratios)}; "
          f"{args.n} x {args.dim}, HNSW, top-{args.k}, {args.concurrency} callers, "
          f"{args.rounds} rounds of {args.requests}; {time.perf_counter() - began:.0f} s total")
    if args.out:
        args.out.write_text(json.dumps({
            "args": vars(args) | {"out": str(args.out)}, "results": results,
            "p50_ratio_milvus_over_faiss": ratios, "machine": platform.platform(),
        }, indent=2))
    return 0


def _wait_indexed(uri: str, n: int, timeout_s: float = 1800.0) -> float:
    """Seconds until Milvus reports every row indexed (the hop flushes after writes pause:
    milvus-lite indexes sealed segments only and searches the rest by brute force)."""
    from pymilvus import MilvusClient

    from retrieval.milvus_store import milvus_name

    client = MilvusClient(uri=uri)
    began = time.perf_counter()
    try:
        while time.perf_counter() - began < timeout_s:
            info = client.describe_index(milvus_name("backbone_", COLLECTION), "vector")
            if int(info.get("indexed_rows", 0)) >= n and not int(info.get("pending_index_rows", 0)):
                break
            time.sleep(0.5)
    finally:
        client.close()
    return time.perf_counter() - began


if __name__ == "__main__":
    raise SystemExit(main())
