"""The pipeline's benchmark: Answer's time to first token beside its parts, embedded and split.

One invocation, for each deployment (``--deployments``, default both):

* ``embedded``: one ``backbone serve`` process (every hop and the pipeline in-process);
* ``split``: embedding, search, rerank and generation each in its own process, the router
  in front of them, and the pipeline in its own process calling the hops through the router;
* ``routed``: the same four hops, and the router and the pipeline in one process
  (``backbone serve router pipeline``): the pipeline calls the hops through the router's
  policy in-process, one gRPC leg per call instead of two.

Against each, a client in its own process (``python -m perf.pipeline_bench client``)
ingests ``--docs`` MS MARCO passages into a collection, then runs ``--rounds`` rounds,
alternating within each round, over ``--questions`` MS MARCO queries, at 1 caller:

* ``answer``: Answer (cache skipped, greedy, one output token, so the generate hop's time
  is its time to first token): the client-side TTFT (send -> first delta) and the final
  message's hop timings; the pipeline's own overhead is TTFT minus the hops' own times;
* ``parts``: the same hops called directly on the same path the pipeline uses (in the split
  deployment: through the router): embed the query, search the vector, rerank the
  candidates, generate from the same packed prompt (``router.prompt_packing``) to the
  first token; each hop's client-side latency;
* ``cache``: Answer twice for a question not asked before (deterministic, cache on): the
  second one's TTFT (a hit replays the stored answer).

Figures are medians of the per-round p50s. Writes ``<out-dir>/pipeline.json`` and
``pipeline.md``; server logs go to ``<out-dir>/pipeline_raw/``.

    .venv/bin/python -m perf.pipeline_bench                          # 5 rounds x 8 questions
    .venv/bin/python -m perf.pipeline_bench --rounds 1 --questions 2 --deployments embedded
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from perf.harness import ServerProcess, log_tail, start_backbone_server
from perf.report import latency_summary, markdown_table, median, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "perf" / "results"
MSMARCO = REPO_ROOT.parent / "shared" / "datasets" / "msmarco"
SERVE = "{python} -m server.main serve"
COMMON = "--port {port} --set server.metrics_port=0"
GEN = "--set generation.kv_cache_gib=1"
COLLECTION = "bench"
OVERHEAD_P50_MAX_MS = 3.0
CACHE_HIT_TTFT_MAX_MS = 10.0
HOPS = ("embed", "search", "rerank", "generate")


# --- the client (its own process) ------------------------------------------------------


def _read_jsonl(path: Path, n: int) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


async def _seed(client, docs: int) -> None:
    from clients.errors import AlreadyExistsError
    from clients.search_messages import Document

    try:
        await client.search.create_collection(COLLECTION, 384, metric="cosine")
    except AlreadyExistsError:
        return
    rows = _read_jsonl(MSMARCO / "corpus.jsonl", docs)
    await client.search.ingest(
        COLLECTION, [Document(r["_id"], r["text"]) for r in rows], timeout=600
    )


async def _answer(client, question: str, *, skip_cache: bool, args) -> dict[str, Any]:
    from clients.generation import Delta
    from clients.pipeline import AnswerFinal

    began = time.perf_counter()
    ttft = None
    final = None
    stream = client.pipeline.answer(
        question, COLLECTION, search_top_k=args.candidates, top_n=args.top_n,
        skip_cache=skip_cache, temperature=0.0, max_tokens=args.max_tokens, timeout=120,
    )
    async for event in stream:
        if isinstance(event, Delta) and ttft is None:
            ttft = time.perf_counter() - began
        elif isinstance(event, AnswerFinal):
            final = event
    hops = {t.hop: t.total_us / 1000 for t in final.timings}
    own = sum(ms for hop, ms in hops.items() if hop != "pipeline")
    ttft_ms = ttft * 1000 if ttft is not None else None
    return {
        "ttft_ms": ttft_ms, "hops_ms": hops, "cache_hit": final.cache_hit,
        "overhead_ms": None if ttft_ms is None else ttft_ms - own,
        "server_overhead_ms": hops.get("pipeline", 0.0) - own,
        "degradations": list(final.degradations), "model": final.model,
    }


async def _parts(client, question: str, args) -> dict[str, float]:
    from clients.generation import Delta
    from router.prompt_packing import DEFAULT_SYSTEM_PROMPT, pack

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    vector = (await client.embedding.embed([question], normalize=True)).vectors[0]
    out["embed"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    hits = (await client.search.search(
        COLLECTION, vector, top_k=args.candidates, with_payload=True
    )).hits
    out["search"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    ranked = await client.rerank.rerank(question, [h.text for h in hits], top_n=args.top_n)
    out["rerank"] = (time.perf_counter() - t0) * 1000
    sources = [hits[r.index].text for r in ranked.results]

    async def count(messages) -> int:
        return (await client.generation.count_tokens(messages=list(messages))).tokens

    probe = await client.generation.count_tokens(messages=[("user", "x")])
    packed = await pack(
        count, system_prompt=DEFAULT_SYSTEM_PROMPT, sources=sources, history=(),
        question=question, window=max(0, probe.max_context_tokens - args.max_tokens),
    )
    t0 = time.perf_counter()
    stream = client.generation.generate(
        messages=list(packed.messages), temperature=0.0, max_tokens=args.max_tokens, timeout=120
    )
    async for event in stream:
        if isinstance(event, Delta):
            out["generate"] = (time.perf_counter() - t0) * 1000
            break
    stream.cancel()
    return out


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    """Seed, warm up, then the alternating rounds; returns the raw samples."""
    from clients.client import AsyncClient

    queries = [q["text"] for q in _read_jsonl(MSMARCO / "queries.jsonl", 400)]
    asked = queries[: args.questions]
    fresh = iter(queries[args.questions:])
    async with AsyncClient(address=args.target, timeout=120) as client:
        pipeline = AsyncClient(address=args.pipeline_target, timeout=120)
        try:
            await _seed(client, args.docs)
            for q in asked[:2]:  # warm-up: models, caches of the first calls, connections
                await _answer(pipeline, q, skip_cache=True, args=args)
                await _parts(client, q, args)
            rounds = []
            for index in range(args.rounds):
                answers, parts, hits = [], [], []
                order = ("answer", "parts") if index % 2 == 0 else ("parts", "answer")
                for phase in order:
                    for q in asked:
                        if phase == "answer":
                            answers.append(await _answer(pipeline, q, skip_cache=True, args=args))
                        else:
                            parts.append(await _parts(client, q, args))
                for _ in range(max(2, args.questions // 2)):
                    q = next(fresh)
                    await _answer(pipeline, q, skip_cache=False, args=args)  # stored
                    hits.append(await _answer(pipeline, q, skip_cache=False, args=args))
                rounds.append({"answers": answers, "parts": parts, "cache": hits})
                print(f"[client] round {index + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            await pipeline.close()
    return {"rounds": rounds}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Per-round p50s and their medians."""
    per_round = []
    for r in raw["rounds"]:
        row = {
            "answer_ttft_p50_ms": latency_summary(a["ttft_ms"] for a in r["answers"])["p50"],
            "overhead_p50_ms": latency_summary(a["overhead_ms"] for a in r["answers"])["p50"],
            "server_overhead_p50_ms": latency_summary(
                a["server_overhead_ms"] for a in r["answers"])["p50"],
            "cache_hit_ttft_p50_ms": latency_summary(
                c["ttft_ms"] for c in r["cache"] if c["cache_hit"])["p50"],
            "cache_hits": sum(c["cache_hit"] for c in r["cache"]),
            "cache_asked": len(r["cache"]),
        }
        for hop in HOPS:
            row[f"{hop}_in_answer_p50_ms"] = latency_summary(
                a["hops_ms"].get(hop, 0.0) for a in r["answers"])["p50"]
            row[f"{hop}_direct_p50_ms"] = latency_summary(
                p[hop] for p in r["parts"] if hop in p)["p50"]
        row["parts_sum_p50_ms"] = sum(row[f"{hop}_direct_p50_ms"] or 0 for hop in HOPS)
        per_round.append(row)
    keys = per_round[0].keys() if per_round else []
    medians = {k: median(r[k] for r in per_round) for k in keys}
    degradations = sorted({d for r in raw["rounds"] for a in r["answers"] for d in a["degradations"]})
    return {"per_round": per_round, "median": medians, "degradations_seen": degradations,
            "model": raw["rounds"][0]["answers"][0]["model"] if raw["rounds"] else ""}


# --- the driver ------------------------------------------------------------------------


def _start(args, name: str, command: str, service: str, log_dir: Path) -> ServerProcess:
    return start_backbone_server(
        f"{SERVE} {command} {COMMON}", log_dir, service, args.startup_timeout, name=name
    )


def deploy(args, kind: str, log_dir: Path, data_dir: Path) -> tuple[list[ServerProcess], str, str]:
    """Start a deployment; (processes, hops target, pipeline target)."""
    data = f"--set search.data_dir={data_dir}"
    if kind == "embedded":
        server = _start(args, "embedded", f"{data} {GEN}", "backbone.v1.PipelineService", log_dir)
        return [server], server.target, server.target
    procs: list[ServerProcess] = []
    try:
        emb = _start(args, "embedding", "embedding", "backbone.v1.EmbeddingService", log_dir)
        procs.append(emb)
        procs.append(_start(args, "search", f"search {data} --set search.embedding_address={emb.target}",
                            "backbone.v1.VectorSearchService", log_dir))
        procs.append(_start(args, "rerank", "rerank", "backbone.v1.RerankService", log_dir))
        procs.append(_start(args, "generation", f"generation {GEN}",
                            "backbone.v1.GenerationService", log_dir))
        upstreams = " ".join(f"--upstream {svc}={p.target}" for svc, p in
                             zip(("embedding", "search", "rerank", "generation"), procs))
        if kind == "routed":  # the pipeline in the router's process: one leg per hop call
            router = _start(args, "router+pipeline", f"router pipeline {upstreams}",
                            "backbone.v1.PipelineService", log_dir)
            procs.append(router)
            return procs, router.target, router.target
        router = _start(args, "router", f"router {upstreams}", "backbone.v1.RouterService", log_dir)
        procs.append(router)
        via = " ".join(f"--set upstream.{h}_address={router.target}"
                       for h in ("embedding", "search", "rerank", "generation"))
        pipeline = _start(args, "pipeline", f"pipeline {via}", "backbone.v1.PipelineService", log_dir)
        procs.append(pipeline)
    except BaseException:
        for p in reversed(procs):
            p.stop(grace_s=10)
        raise
    return procs, router.target, pipeline.target


def run_deployment(args, kind: str, raw_dir: Path) -> dict[str, Any]:
    """One deployment: start it, run the client process, stop it."""
    with tempfile.TemporaryDirectory(prefix=f"pipeline-bench-{kind}-") as data_dir:
        procs, hops_target, pipeline_target = deploy(args, kind, raw_dir, Path(data_dir))
        out = raw_dir / f"{kind}_client.json"
        try:
            cmd = [sys.executable, "-m", "perf.pipeline_bench", "client", "--target", hops_target,
                   "--pipeline-target", pipeline_target, "--out", str(out),
                   "--rounds", str(args.rounds), "--questions", str(args.questions),
                   "--docs", str(args.docs), "--candidates", str(args.candidates),
                   "--top-n", str(args.top_n), "--max-tokens", str(args.max_tokens)]
            subprocess.run(cmd, cwd=REPO_ROOT, check=True)
        except BaseException:
            for p in procs:
                print(f"--- {p.name}\n{log_tail(p.log_path)}", file=sys.stderr)
            raise
        finally:
            for p in reversed(procs):
                p.stop(grace_s=15)
        raw = json.loads(out.read_text())
    return {"deployment": kind, "processes": [p.name for p in procs], **summarize(raw)}


def render(result: dict[str, Any]) -> str:
    """The markdown table."""
    rows = []
    for d in result["deployments"]:
        m = d["median"]
        rows.append([
            d["deployment"], m["answer_ttft_p50_ms"],
            " / ".join(f"{m[f'{h}_direct_p50_ms']:.1f}" for h in HOPS), m["parts_sum_p50_ms"],
            " / ".join(f"{m[f'{h}_in_answer_p50_ms']:.1f}" for h in HOPS),
            m["overhead_p50_ms"], m["server_overhead_p50_ms"], m["cache_hit_ttft_p50_ms"],
        ])
    return markdown_table(
        ["deployment", "Answer TTFT p50 ms", "direct embed/search/rerank/gen-TTFT p50 ms",
         "sum of parts ms", "hops inside Answer ms", "pipeline overhead p50 ms (client)",
         "overhead p50 ms (server)", "cache-hit TTFT p50 ms"], rows)


def main(argv: list[str] | None = None) -> int:
    """``client`` runs the workload; without it, the driver runs every deployment."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="driver", choices=("driver", "client"))
    parser.add_argument("--deployments", default="embedded,split,routed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=20, help="search_top_k")
    parser.add_argument("--top-n", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--target", default="")
    parser.add_argument("--pipeline-target", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.mode == "client":
        write_json(args.out, asyncio.run(client_main(args)))
        return 0
    raw_dir = args.out_dir / "pipeline_raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    deployments = [run_deployment(args, kind, raw_dir) for kind in args.deployments.split(",")]
    result = {
        "bench": "pipeline", "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "settings": {k: getattr(args, k) for k in
                     ("rounds", "questions", "docs", "candidates", "top_n", "max_tokens")},
        "thresholds": {"overhead_p50_ms": OVERHEAD_P50_MAX_MS,
                       "cache_hit_ttft_p50_ms": CACHE_HIT_TTFT_MAX_MS},
        "deployments": deployments,
    }
    write_json(args.out_dir / "pipeline.json", result)
    table = render(result)
    (args.out_dir / "pipeline.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
