"""Search-hop benchmark: N x D float32 vectors in the default index, over gRPC and in-process.

    python -m perf.search_bench                       # the full run: 1,000,000 x 384
    python -m perf.search_bench --n 50000 --queries 500 --requests 2000   # smoke check

What it does, in one run on one machine:

1. Generates synthetic clustered, L2-normalised vectors (seeded; a mixture of Gaussians is
   closer to sentence embeddings than uniform noise) and queries from the same
   distribution, with exact top-k ground truth (brute force, FAISS ``knn``).
2. Starts the search hop as its own process (``python -m server.main serve search``),
   creates a collection of the default kind and streams every vector in (Upsert,
   durable): build time = first point sent to last point acknowledged.
3. Stops the server (SIGTERM: it snapshots), restarts it (load time), records its
   resident memory, then runs 16 concurrent callers (this process, grpc.aio) doing
   Search(top_k) by vector: p50/p95/p99, throughput, recall@k.
4. Loads the same index file in-process and runs the same queries through FAISS directly
   (one query per call, and one batched call): the in-process limit.
5. Ingestion throughput (vectors/s) with durability on and off, on a subset, each on a
   fresh server process.

Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.harness import REPO_ROOT as REPO
from perf.harness import ServerProcess, start_announced


# ------------------------------------------------------------------ data


def synthetic(n: int, dim: int, seed: int, centers: int = 1000) -> np.ndarray:
    """Clustered unit vectors: centres plus noise, normalised (blocks of 100k rows)."""
    center_rng = np.random.default_rng(12345)
    c = center_rng.standard_normal((centers, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        block = c[rng.integers(0, centers, m)] + 0.8 * rng.standard_normal((m, dim)).astype(
            np.float32
        )
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def ground_truth(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row numbers by inner product (cosine on unit vectors)."""
    import faiss

    _, labels = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    return labels


def recall(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k found."""
    return float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


# ------------------------------------------------------------------ server process


def start_search_server(data_dir: Path, durable: bool = True, extra: list[str] | None = None) -> ServerProcess:
    """``python -m server.main serve search --port 0`` (perf/harness.py), ready once it
    prints its address; its log goes beside ``data_dir``. ``started_s`` is the load time."""
    argv = [
        sys.executable, "-m", "server.main", "serve", "search", "--port", "0",
        "--set", f"search.data_dir={data_dir}",
        "--set", f"search.durable={'true' if durable else 'false'}",
        "--set", "server.metrics_port=0",
        "--set", "server.max_message_bytes=16777216",
        *(extra or []),
    ]  # fmt: skip
    log_path = data_dir.parent / f"{data_dir.name}.log"
    return start_announced(argv, "search server", log_path, timeout_s=3600)


def rss_bytes(server: ServerProcess) -> int:
    """Resident memory of the server process."""
    import psutil

    return int(psutil.Process(server.pid).memory_info().rss)


def cpu_s(server: ServerProcess) -> float:
    """CPU seconds (user + system) the server process has used so far."""
    import psutil

    times = psutil.Process(server.pid).cpu_times()
    return float(times.user + times.system)


def stop(server: ServerProcess) -> None:
    """SIGTERM (graceful: it snapshots), then wait as long as that takes."""
    server.stop(grace_s=3600)


# ------------------------------------------------------------------ client side


def _stub(address: str):
    import grpc

    from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", 16 * 1024 * 1024)]
    )
    return channel, pb_grpc.VectorSearchServiceStub(channel)


def create(address: str, name: str, dim: int, kind: int) -> None:
    """Create the benchmark collection."""
    from backbone.v1 import vector_search_service_pb2 as pb

    channel, stub = _stub(address)
    with channel:
        stub.CreateCollection(
            pb.CreateCollectionRequest(name=name, dimension=dim, index_kind=kind), timeout=60
        )


def upload(address: str, name: str, vectors: np.ndarray, per_message: int = 1024) -> float:
    """Stream every vector in (ids are row numbers); seconds until acknowledged."""
    from backbone.v1 import common_pb2
    from backbone.v1 import vector_search_service_pb2 as pb

    def messages():
        for start in range(0, vectors.shape[0], per_message):
            block = vectors[start : start + per_message]
            yield pb.UpsertRequest(collection=name, points=[
                pb.Point(id=str(start + i), vector=common_pb2.Vector(values=v))
                for i, v in enumerate(block.tolist())
            ])  # fmt: skip

    channel, stub = _stub(address)
    with channel:
        began = time.perf_counter()
        stub.Upsert(messages(), timeout=24 * 3600)
        return time.perf_counter() - began


async def load_test(
    address: str, name: str, queries: np.ndarray, k: int, concurrency: int, requests: int
) -> dict:
    """``concurrency`` closed-loop callers; latency of each Search as the client sees it."""
    import grpc

    from backbone.v1 import common_pb2
    from backbone.v1 import vector_search_service_pb2 as pb
    from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc

    reqs = [
        pb.SearchRequest(collection=name, top_k=k, vector=common_pb2.Vector(values=q))
        for q in queries.tolist()
    ]
    latencies: list[float] = []
    found: dict[int, list[int]] = {}
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.VectorSearchServiceStub(channel)
        for r in reqs[: min(len(reqs), 200)]:  # warm up
            await stub.Search(r)
        counter = iter(range(requests))

        async def caller() -> None:
            for i in counter:
                qi = i % len(reqs)
                began = time.perf_counter()
                try:
                    response = await stub.Search(reqs[qi], timeout=30)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - began)
                found[qi] = [int(h.id) for h in response.hits]

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "found": found,
    }


async def floor_test(address: str, name: str, concurrency: int, requests: int) -> dict:
    """The same callers on the hop's cheapest RPC (Get of an unknown id): the gRPC floor."""
    import grpc

    from backbone.v1 import vector_search_service_pb2 as pb
    from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc

    request = pb.GetRequest(collection=name, ids=["no-such-id"])
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.VectorSearchServiceStub(channel)
        for _ in range(200):
            await stub.Get(request)
        counter = iter(range(requests))

        async def caller() -> None:
            for _ in counter:
                began = time.perf_counter()
                await stub.Get(request, timeout=30)
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    lat = np.array(latencies) * 1000
    return {
        "throughput_rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def in_process(index_path: Path, queries: np.ndarray, k: int, ef: int) -> dict:
    """The same index file searched directly with FAISS: per query and batched."""
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.read_index(str(index_path))
    params = faiss.SearchParametersHNSW(efSearch=max(ef, k)) if "HNSW" in type(index).__name__ else None
    for q in queries[:200]:
        index.search(q[None, :], k, params=params)
    lat = []
    found = []
    for q in queries:
        began = time.perf_counter()
        _, labels = index.search(q[None, :], k, params=params)
        lat.append(time.perf_counter() - began)
        found.append(labels[0].tolist())
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    began = time.perf_counter()
    index.search(queries, k, params=params)
    batch_s = time.perf_counter() - began
    lat_ms = np.array(lat) * 1000
    return {
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "single_thread_qps": len(queries) / float(np.sum(lat)),
        "batched_qps": len(queries) / batch_s,
        "found": found,
    }


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints a table and writes JSON."""
    parser = argparse.ArgumentParser(prog="python -m perf.search_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000, help="distinct query vectors")
    parser.add_argument("--requests", type=int, default=20_000, help="searches in the load test")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ingest-n", type=int, default=100_000, help="vectors per durability-on/off run")
    parser.add_argument("--data-dir", default="", help="where collections go (default: a temp dir)")
    parser.add_argument("--out", default=str(REPO / "perf" / "results" / "search_bench.json"))
    parser.add_argument(
        "--server-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="extra server config, e.g. search.faiss_threads=1 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--skip-ingest", action="store_true", help="skip the durability on/off runs")
    args = parser.parse_args(argv)

    from backbone.v1 import vector_search_service_pb2 as pb
    from retrieval.types import DEFAULT_EF_SEARCH

    root = Path(args.data_dir or tempfile.mkdtemp(prefix="search-bench-"))
    kind = pb.INDEX_KIND_UNSPECIFIED  # the server default
    print(f"generating {args.n} x {args.dim} vectors and exact top-{args.k} ...", flush=True)
    base = synthetic(args.n, args.dim, seed=1)
    queries = synthetic(args.queries, args.dim, seed=2)
    began = time.perf_counter()
    truth = ground_truth(base, queries, args.k)
    truth_s = time.perf_counter() - began

    print("building through the server (durable Upsert stream) ...", flush=True)
    extra = [item for kv in args.server_set for item in ("--set", kv)]
    server = start_search_server(root / "main", extra=extra)
    create(server.target, "bench", args.dim, kind)
    build_s = upload(server.target, "bench", base)
    print(f"  built in {build_s:.1f} s ({args.n / build_s:.0f} vectors/s)", flush=True)
    stop(server)
    server = start_search_server(root / "main", extra=extra)  # loads the snapshot written on stop
    load_s = server.started_s
    rss = rss_bytes(server)
    print(f"  restart (load snapshot) {load_s:.1f} s, server RSS {rss / 2**30:.2f} GiB", flush=True)
    print(f"load test: {args.concurrency} callers, {args.requests} searches ...", flush=True)
    cpu_before = cpu_s(server)
    client_before = time.process_time()
    grpc_result = asyncio.run(
        load_test(server.target, "bench", queries, args.k, args.concurrency, args.requests)
    )
    # CPU time per request, server and client: robust to other load on a shared machine.
    grpc_result["server_cpu_ms_per_request"] = (
        (cpu_s(server) - cpu_before) * 1000 / max(1, grpc_result["requests"])
    )
    grpc_result["client_cpu_ms_per_request"] = (
        (time.process_time() - client_before) * 1000 / max(1, grpc_result["requests"])
    )
    floor = asyncio.run(floor_test(server.target, "bench", args.concurrency, args.requests))
    stop(server)
    grpc_found = grpc_result.pop("found")
    grpc_result["recall@k"] = recall([grpc_found[i] for i in sorted(grpc_found)],
                                     truth[sorted(grpc_found)], args.k)  # fmt: skip
    print(f"  gRPC search p50 {grpc_result['p50_ms']:.2f} ms, p99 {grpc_result['p99_ms']:.2f} ms, "
          f"{grpc_result['throughput_rps']:.0f} req/s, recall@{args.k} {grpc_result['recall@k']:.3f}; "
          f"floor p99 {floor['p99_ms']:.2f} ms", flush=True)

    index_files = sorted((root / "main" / "bench").glob("snap-*/index.faiss"))
    local = in_process(index_files[-1], queries, args.k, DEFAULT_EF_SEARCH)
    local["recall@k"] = recall(local.pop("found"), truth, args.k)
    print(f"  in-process p50 {local['p50_ms']:.3f} ms, p99 {local['p99_ms']:.3f} ms", flush=True)

    ingest = {}
    subset = base[: min(args.ingest_n, args.n)]
    for durable in () if args.skip_ingest else (True, False):
        print(f"ingestion, durable={durable}: {subset.shape[0]} vectors ...", flush=True)
        s = start_search_server(root / f"ingest-{durable}", durable=durable, extra=extra)
        create(s.target, "ingest", args.dim, kind)
        seconds = upload(s.target, "ingest", subset)
        stop(s)
        ingest["durable_on" if durable else "durable_off"] = {
            "vectors": subset.shape[0], "seconds": seconds,
            "vectors_per_s": subset.shape[0] / seconds,
        }  # fmt: skip

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "n": args.n, "dim": args.dim, "k": args.k, "index": f"server default (HNSW M=32, efC=80, ef={DEFAULT_EF_SEARCH})",
        "ground_truth_s": truth_s,
        "build_s": build_s, "build_vectors_per_s": args.n / build_s,
        "restart_load_s": load_s, "server_rss_bytes": rss,
        "grpc_search": {"concurrency": args.concurrency, **grpc_result},
        "grpc_floor_get": floor,
        "in_process_faiss": local,
        "ingestion": ingest,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    g = report["grpc_search"]
    print(
        "\n| what | value |\n|---|---|\n"
        f"| vectors | {args.n} x {args.dim} |\n"
        f"| build (durable upsert stream) | {build_s:.1f} s ({args.n / build_s:.0f} vectors/s) |\n"
        f"| restart (load snapshot) | {load_s:.1f} s |\n"
        f"| server RSS | {rss / 2**30:.2f} GiB |\n"
        f"| gRPC search, {args.concurrency} callers | p50 {g['p50_ms']:.2f} ms, p95 {g['p95_ms']:.2f} ms, "
        f"p99 {g['p99_ms']:.2f} ms, {g['throughput_rps']:.0f} req/s, recall@{args.k} {g['recall@k']:.3f}, "
        f"errors {g['errors'] or 0}; CPU per request: server {g['server_cpu_ms_per_request']:.2f} ms, "
        f"client {g['client_cpu_ms_per_request']:.2f} ms |\n"
        f"| gRPC floor (Get of an unknown id), {args.concurrency} callers | p50 {floor['p50_ms']:.2f} ms, "
        f"p99 {floor['p99_ms']:.2f} ms, {floor['throughput_rps']:.0f} req/s |\n"
        f"| in-process FAISS, 1 query/call | p50 {local['p50_ms']:.3f} ms, p99 {local['p99_ms']:.3f} ms, "
        f"{local['single_thread_qps']:.0f} q/s; batched {local['batched_qps']:.0f} q/s; "
        f"recall@{args.k} {local['recall@k']:.3f} |\n"
        + "".join(
            f"| ingestion, {name.replace('_', ' ')} | {r['vectors_per_s']:.0f} vectors/s |\n"
            for name, r in ingest.items()
        )
        + f"\nJSON: {out}"
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
