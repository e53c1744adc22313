"""The embedding hop's judged benchmark, every figure a ratio measured in the same run.

One invocation starts the raw echo server and the backbone embedding server as separate
processes, then, ``--runs`` times (servers idle between phases):

1. the in-process baseline (``perf.embed_baseline``, its own process): best batched
   texts/s and single-text encode p50 -- the limit;
2. echo, 64 closed-loop callers -- the floor;
3. embed, 1 caller -- the "unloaded" p99; then ``perf.embed_single``: in-process encodes
   and gRPC calls of the same texts, alternating in blocks in one client process -- the
   single-caller overhead (drift of the machine hits both sides alike) -- with a third
   block of echo ``Hold`` calls as long as an encode: that overhead's floor;
4. embed, 64 callers of one text each -- saturation throughput, in rounds alternating
   with in-process blocks of the baseline's best setting (``perf.embed_baseline
   --blocks``, one worker process that keeps the model loaded), each round's ratio taken
   within the round, so the machine's drift over minutes hits both sides alike;
5. embed, open loop at 0.5x saturation -- p99 at half load;
6. embed, open loop at 3x saturation -- overload: every request answered (OK or
   RESOURCE_EXHAUSTED), server RSS bounded, admitted p99 vs unloaded p99.

Each load phase is ``python -m perf.loadgen`` in its own process. Medians over the runs go
to ``perf/results/embed.json`` and ``perf/results/embed.md``; raw per-phase JSON and the
servers' logs go under ``perf/results/embed_raw/``.

``python -m perf.embed_bench`` (defaults: 3 runs, 20 s windows); a quick smoke:
``python -m perf.embed_bench --runs 1 --duration 3 --warmup 1 --baseline-seconds 1
--saturation-rounds 2 --saturation-seconds 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perf.harness import (  # noqa: F401 - re-exported for the scripts that import them from here
    REPO_ROOT, ServerProcess, free_port, log_tail, start_backbone_server, start_echo_server,
    wait_for_serving,
)
from perf.report import dig, fmt, markdown_table, median, read_json, write_json

DEFAULT_OUT_DIR = REPO_ROOT / "perf" / "results"
DEFAULT_SERVER_CMD = "{python} -m server.main serve embedding --port {port} --set server.metrics_port=0"
EMBED_SERVICE = "backbone.v1.EmbeddingService"

# The judged claims' thresholds.
THROUGHPUT_RATIO_MIN = 0.90
SINGLE_P50_OVERHEAD_MAX_MS = 2.0
HALF_LOAD_P99_MAX_MS = 100.0
OVERLOAD_P99_RATIO_MAX = 2.0


# --- processes: perf/harness.py ---


class InProcessWorker:
    """``perf.embed_baseline --blocks`` in its own process: times a setting on request,
    with the model kept loaded between requests."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perf.embed_baseline", "--blocks", "--seed", str(args.seed)],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def measure(self, setting: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Time ``setting`` (a baseline row's mode, batch size, lanes) for ``seconds``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {k: setting.get(k) for k in ("mode", "batch_size", "lanes")}
        try:
            self.proc.stdin.write(json.dumps({**request, "seconds": seconds}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # reported below, with the exit code
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"in-process worker exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        """End the worker (EOF on its stdin), killing it if it does not leave."""
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --- phases -------------------------------------------------------------------------------


def run_baseline(args: argparse.Namespace, out_path: Path) -> dict[str, Any]:
    """The in-process baseline in its own process; its JSON."""
    cmd = [
        sys.executable, "-m", "perf.embed_baseline",
        "--seconds", str(args.baseline_seconds),
        "--batch-sizes", args.baseline_batch_sizes,
        "--sorted-batch-sizes", args.baseline_sorted_batch_sizes,
        "--seed", str(args.seed),
        "--json-out", str(out_path),
    ]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return read_json(out_path)


def run_single(
    args: argparse.Namespace, server: ServerProcess, echo: ServerProcess, out_path: Path
) -> dict[str, Any]:
    """The interleaved single-caller comparison (with the echo server's Hold floor) in its
    own (client) process; its JSON."""
    cmd = [
        sys.executable, "-m", "perf.embed_single",
        "--target", server.target,
        "--echo-target", echo.target,
        "--rounds", str(args.single_rounds),
        "--block", str(args.single_block),
        "--seed", str(args.seed),
        "--timeout", str(args.timeout),
        "--engine", args.engine,
        "--json-out", str(out_path),
    ]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return read_json(out_path)


def run_loadgen(
    args: argparse.Namespace,
    scenario: str,
    server: ServerProcess,
    out_path: Path,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    extra: list[str] | None = None,
    duration: float | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One ``python -m perf.loadgen`` phase in its own process; its JSON (``timeout``: this
    phase's per-request deadline, default ``--timeout``)."""
    cmd = [
        sys.executable, "-m", "perf.loadgen", scenario,
        "--target", server.target,
        "--duration", str(args.duration if duration is None else duration),
        "--warmup", str(args.warmup),
        "--timeout", str(args.timeout if timeout is None else timeout),
        "--seed", str(args.seed),
        "--json-out", str(out_path),
    ]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    else:
        cmd += ["--rate", f"{rate:.3f}", "--max-inflight", str(args.max_inflight)]
    if server.pid is not None:
        cmd += ["--server-pid", str(server.pid)]
    if args.no_progress:
        cmd.append("--no-progress")
    cmd += extra or []
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return read_json(out_path)


def run_saturation(
    args: argparse.Namespace, embed: ServerProcess, worker: InProcessWorker,
    setting: dict[str, Any], prefix: str,
) -> list[dict[str, Any]]:
    """Rounds of an in-process block of ``setting`` and a block of 64 callers on the
    server, the two leading a round in turn; each round's two results."""
    rounds = []
    for r in range(1, args.saturation_rounds + 1):
        def server_block() -> dict[str, Any]:
            return run_loadgen(
                args, "embed", embed, Path(f"{prefix}_embed_saturation{r}.json"),
                concurrency=args.concurrency, duration=args.saturation_seconds,
            )

        if r % 2:
            inprocess = worker.measure(setting, args.saturation_seconds)
            server = server_block()
        else:
            server = server_block()
            inprocess = worker.measure(setting, args.saturation_seconds)
        print(
            f"[bench]   round {r}: server {server['items_per_s']:.1f} vs in-process "
            f"{inprocess['texts_per_s']:.1f} texts/s",
            file=sys.stderr,
        )
        rounds.append({"round": r, "inprocess": inprocess, "server": server})
    return rounds


def run_once(
    args: argparse.Namespace, index: int, echo: ServerProcess, embed: ServerProcess,
    raw_dir: Path, worker: InProcessWorker,
) -> dict[str, Any]:
    """All phases of one run; the per-phase results plus this run's ratios."""
    prefix = raw_dir / f"run{index}"
    phases: dict[str, Any] = {}

    def note(name: str) -> None:
        print(f"[bench] run {index}: {name}", file=sys.stderr)

    note("in-process baseline")
    phases["baseline"] = run_baseline(args, Path(f"{prefix}_baseline.json"))
    time.sleep(args.cooldown)
    note(f"echo, {args.concurrency} callers")
    phases["echo_closed"] = run_loadgen(args, "echo", echo, Path(f"{prefix}_echo_closed.json"), concurrency=args.concurrency)
    time.sleep(args.cooldown)
    note("embed, 1 caller")
    phases["embed_single"] = run_loadgen(args, "embed", embed, Path(f"{prefix}_embed_single.json"), concurrency=1)
    time.sleep(args.cooldown)
    note("embed, 1 caller, interleaved with in-process encodes")
    phases["embed_interleaved"] = run_single(args, embed, echo, Path(f"{prefix}_embed_interleaved.json"))
    time.sleep(args.cooldown)
    best = phases["baseline"]["best"]
    note(
        f"embed, {args.concurrency} callers, {args.saturation_rounds} rounds alternating with "
        f"in-process {best['mode']} (batch {best['batch_size']})"
    )
    rounds = run_saturation(args, embed, worker, best, str(prefix))
    phases["saturation_rounds"] = rounds
    # The round with the median server throughput stands for the phase (plot, rates).
    by_rate = sorted(rounds, key=lambda r: r["server"]["items_per_s"])
    phases["embed_saturation"] = by_rate[(len(by_rate) - 1) // 2]["server"]
    saturation_rps = median(r["server"]["throughput_rps"] for r in rounds)
    if not saturation_rps > 0:
        raise RuntimeError(f"embed saturation phase got no OK answers: {phases['embed_saturation']['errors_by_status']}")
    time.sleep(args.cooldown)
    note(f"embed, open loop {args.half_load}x saturation ({args.half_load * saturation_rps:.1f}/s)")
    phases["embed_half"] = run_loadgen(
        args, "embed", embed, Path(f"{prefix}_embed_half.json"), rate=args.half_load * saturation_rps
    )
    time.sleep(args.cooldown)
    note(f"embed, open loop {args.overload}x saturation ({args.overload * saturation_rps:.1f}/s)")
    phases["embed_overload"] = run_loadgen(
        args, "embed", embed, Path(f"{prefix}_embed_overload.json"), rate=args.overload * saturation_rps,
        timeout=args.overload_timeout,
    )
    time.sleep(args.cooldown)
    return {"run": index, "phases": phases, "figures": run_figures(phases, args.rss_growth_limit)}


# --- figures ------------------------------------------------------------------------------


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def run_figures(phases: dict[str, Any], rss_growth_limit: float = 0.25) -> dict[str, Any]:
    """The judged figures of one run, each against something measured in that run."""
    base = phases["baseline"]
    single = phases["embed_single"]
    rounds = phases["saturation_rounds"]
    servers = [r["server"] for r in rounds]
    half = phases["embed_half"]
    over = phases["embed_overload"]
    echo = phases["echo_closed"]
    paired = phases["embed_interleaved"]

    over_counts = over["counts"]
    resource_exhausted = over["errors_by_status"].get("RESOURCE_EXHAUSTED", 0)
    sent = over_counts["issued"]
    unanswered = sent - over_counts["ok"] - resource_exhausted
    rss_before = dig(over, "server.rss_mb.start")
    rss_max = dig(over, "server.rss_mb.max")
    single_p50 = dig(paired, "server_ms.p50")
    base_single = dig(paired, "inprocess_ms.p50")
    return {
        "inprocess_best_texts_per_s": base["best"]["texts_per_s"],
        # The same setting timed again in blocks interleaved with the server's rounds.
        "inprocess_interleaved_texts_per_s": median(r["inprocess"]["texts_per_s"] for r in rounds),
        "inprocess_best_batch_size": base["best"]["batch_size"],
        "inprocess_best_sorted": 1.0 if base["best"].get("mode") == "sorted" else 0.0,
        "inprocess_single_p50_ms": base_single,
        "server_single_compute_p50_ms": dig(paired, "server_reported_compute_ms.p50"),
        "saturation_texts_per_s": median(s["items_per_s"] for s in servers),
        "saturation_rps": median(s["throughput_rps"] for s in servers),
        "saturation_p50_ms": median(dig(s, "latency_ms.p50") for s in servers),
        "saturation_p99_ms": median(dig(s, "latency_ms.p99") for s in servers),
        "saturation_refused_share": _ratio(
            sum(s["errors_by_status"].get("RESOURCE_EXHAUSTED", 0) for s in servers),
            sum(s["counts"]["issued"] for s in servers),
        ),
        # Within each round, then the median over the rounds.
        "throughput_ratio": median(
            _ratio(r["server"]["items_per_s"], r["inprocess"]["texts_per_s"]) for r in rounds
        ),
        "single_p50_ms": single_p50,
        "single_p99_ms": dig(single, "latency_ms.p99"),
        "single_overhead_ms": None if single_p50 is None or base_single is None else single_p50 - base_single,
        "single_loadgen_p50_ms": dig(single, "latency_ms.p50"),
        # A bare grpc.aio call that awaits as long on a worker thread (the echo server's Hold).
        "single_floor_overhead_ms": dig(paired, "rpc_floor.overhead_p50_ms"),
        "half_rate_rps": half["target_rate_rps"],
        "half_p50_ms": dig(half, "latency_ms.p50"),
        "half_p99_ms": dig(half, "latency_ms.p99"),
        "half_errors": half["counts"]["errors"] + half["counts"]["dropped_by_client"],
        "overload_rate_rps": over["target_rate_rps"],
        "overload_sent": sent,
        "overload_ok": over_counts["ok"],
        "overload_resource_exhausted": resource_exhausted,
        "overload_other": unanswered,
        "overload_dropped_by_client": over_counts["dropped_by_client"],
        "overload_answered_pct": None if sent == 0 else 100.0 * (sent - unanswered) / sent,
        "overload_admitted_p99_ms": dig(over, "latency_ms.p99"),
        "overload_p99_vs_single_p99": _ratio(dig(over, "latency_ms.p99"), dig(single, "latency_ms.p99")),
        "overload_p99_vs_half_p99": _ratio(dig(over, "latency_ms.p99"), dig(half, "latency_ms.p99")),
        "overload_rejected_p99_ms": dig(over, "latency_by_status_ms.RESOURCE_EXHAUSTED.p99"),
        "overload_rss_before_mb": rss_before,
        "overload_rss_max_mb": rss_max,
        "overload_rss_growth": _ratio(None if rss_max is None or rss_before is None else rss_max - rss_before, rss_before),
        "rss_growth_limit": rss_growth_limit,
        "echo_rps": echo["throughput_rps"],
        "echo_p50_ms": dig(echo, "latency_ms.p50"),
        "echo_p99_ms": dig(echo, "latency_ms.p99"),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every figure over the runs, and the pass/fail of each judged claim."""
    keys = runs[0]["figures"].keys()
    med = {k: median(r["figures"][k] for r in runs) for k in keys}

    def at_most(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    rss_growth = med["overload_rss_growth"]
    checks = {
        "throughput_ratio": None if med["throughput_ratio"] is None else med["throughput_ratio"] >= THROUGHPUT_RATIO_MIN,
        "single_p50_overhead": at_most(med["single_overhead_ms"], SINGLE_P50_OVERHEAD_MAX_MS),
        "half_load_p99": at_most(med["half_p99_ms"], HALF_LOAD_P99_MAX_MS),
        # Every run, not the median: one unanswered request anywhere fails the claim.
        "overload_all_answered": all(
            r["figures"]["overload_other"] == 0 and r["figures"]["overload_dropped_by_client"] == 0 for r in runs
        ),
        "overload_p99_ratio": at_most(med["overload_p99_vs_single_p99"], OVERLOAD_P99_RATIO_MAX),
        "overload_rss_bounded": None if rss_growth is None else rss_growth <= med["rss_growth_limit"],
    }
    return {"runs": len(runs), "median": med, "pass": checks}


def markdown_report(summary: dict[str, Any], runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The short markdown table of judged ratios, the echo floor beside them, and per-run rows."""
    m = summary["median"]
    ok = summary["pass"]
    rows = [
        (
            f"server throughput, {meta['concurrency']} callers x 1 text / in-process best batch "
            f"(rounds alternating the two, ratio within each round)",
            f"{fmt(m['throughput_ratio'], 3)} ({fmt(m['saturation_texts_per_s'])} vs "
            f"{fmt(m['inprocess_interleaved_texts_per_s'])} texts/s @ batch {fmt(m['inprocess_best_batch_size'], 0)}"
            f"{', length-sorted' if m['inprocess_best_sorted'] else ''}; "
            f"{fmt(None if m['saturation_refused_share'] is None else 100 * m['saturation_refused_share'])}% "
            f"of the server's calls refused; best in the baseline phase "
            f"{fmt(m['inprocess_best_texts_per_s'])} texts/s)",
            f">= {THROUGHPUT_RATIO_MIN:.2f}",
            ok["throughput_ratio"],
        ),
        (
            "single-caller p50 - in-process single-text encode p50 (same texts, interleaved)",
            f"{fmt(m['single_overhead_ms'], 2)} ms ({fmt(m['single_p50_ms'], 2)} vs "
            f"{fmt(m['inprocess_single_p50_ms'], 2)} ms; server-reported compute "
            f"{fmt(m['server_single_compute_p50_ms'], 2)} ms; a bare grpc.aio call holding as "
            f"long: +{fmt(m['single_floor_overhead_ms'], 2)} ms)",
            f"<= {SINGLE_P50_OVERHEAD_MAX_MS:.0f} ms",
            ok["single_p50_overhead"],
        ),
        (
            f"p99 at {meta['half_load']}x saturation ({fmt(m['half_rate_rps'])} req/s, open loop)",
            f"{fmt(m['half_p99_ms'])} ms (p50 {fmt(m['half_p50_ms'])} ms)",
            f"<= {HALF_LOAD_P99_MAX_MS:.0f} ms",
            ok["half_load_p99"],
        ),
        (
            f"overload {meta['overload']}x ({fmt(m['overload_rate_rps'])} req/s): answered OK or RESOURCE_EXHAUSTED",
            f"{fmt(m['overload_answered_pct'], 2)}% (OK {fmt(m['overload_ok'], 0)}, "
            f"RESOURCE_EXHAUSTED {fmt(m['overload_resource_exhausted'], 0)}, other {fmt(m['overload_other'], 0)}, "
            f"client-dropped {fmt(m['overload_dropped_by_client'], 0)})",
            "100% in every run",
            ok["overload_all_answered"],
        ),
        (
            "overload: admitted p99 / unloaded (single-caller) p99",
            f"{fmt(m['overload_p99_vs_single_p99'], 2)} ({fmt(m['overload_admitted_p99_ms'])} vs "
            f"{fmt(m['single_p99_ms'])} ms; vs half-load p99: {fmt(m['overload_p99_vs_half_p99'], 2)})",
            f"<= {OVERLOAD_P99_RATIO_MAX:.0f}",
            ok["overload_p99_ratio"],
        ),
        (
            "overload: server RSS max / RSS before the phase",
            f"{fmt(m['overload_rss_max_mb'])} vs {fmt(m['overload_rss_before_mb'])} MiB "
            f"(+{fmt(None if m['overload_rss_growth'] is None else 100 * m['overload_rss_growth'])}%)",
            f"<= +{100 * m['rss_growth_limit']:.0f}%",
            ok["overload_rss_bounded"],
        ),
        (
            f"echo floor, {meta['concurrency']} callers (raw gRPC, same harness)",
            f"{fmt(m['echo_rps'])} req/s, p50 {fmt(m['echo_p50_ms'], 2)} ms, p99 {fmt(m['echo_p99_ms'], 2)} ms",
            "reference",
            "–",
        ),
    ]
    per_run = [
        (
            r["run"],
            r["figures"]["inprocess_interleaved_texts_per_s"],
            r["figures"]["saturation_texts_per_s"],
            r["figures"]["throughput_ratio"],
            r["figures"]["inprocess_single_p50_ms"],
            r["figures"]["single_p50_ms"],
            r["figures"]["single_floor_overhead_ms"],
            r["figures"]["half_p99_ms"],
            r["figures"]["overload_answered_pct"],
            r["figures"]["overload_p99_vs_single_p99"],
            r["figures"]["overload_rss_max_mb"],
            r["figures"]["echo_rps"],
        )
        for r in runs
    ]
    return (
        "# Embedding hop benchmark\n\n"
        f"{meta['started_at']} · {meta['host']['cpus']} CPUs · {summary['runs']} run(s), medians shown · "
        f"{meta['duration']} s windows after {meta['warmup']} s warm-up · client and servers in separate "
        f"processes · server: `{meta['server_command']}`\n\n"
        + markdown_table(["claim", "measured (median)", "target", "pass"], rows)
        + "\n## Per run\n\n"
        + markdown_table(
            [
                "run", "in-process best texts/s (interleaved)", f"server texts/s ({meta['concurrency']} callers)", "ratio", "in-process single p50 ms",
                "server single p50 ms", "bare call holding as long, +ms", "half-load p99 ms", "overload answered %", "overload p99 / single p99",
                "overload RSS max MiB", "echo req/s",
            ],
            [[fmt(c, 3) if isinstance(c, float) and c < 10 else c for c in row] for row in per_run],
        )
        + f"\n{meta['plot_note']}\n"
    )


def plot_latency_vs_load(runs: list[dict[str, Any]], path: Path) -> str:
    """Latency (p50, p99) against achieved throughput per embed phase, if matplotlib exists."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plot skipped: matplotlib is not installed."
    names = ["embed_single", "embed_half", "embed_saturation", "embed_overload"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        xs = [run["phases"][n]["throughput_rps"] for n in names]
        for key, style in (("p50", "o-"), ("p99", "s--")):
            ys = [dig(run["phases"][n], f"latency_ms.{key}") for n in names]
            ax.plot(xs, ys, style, label=f"run {run['run']} {key}")
    ax.set_xlabel("OK responses/s")
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"Plot: `{path.name}`."


# --- main ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m perf.embed_bench`` parser."""
    parser = argparse.ArgumentParser(prog="python -m perf.embed_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repeat the whole set; medians reported (default 3)")
    parser.add_argument("--duration", type=float, default=20.0, help="measurement window per phase, s (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="uncounted load before each window, s (default 3)")
    parser.add_argument("--baseline-seconds", type=float, default=3.0, help="timed seconds per batch size in the baseline")
    parser.add_argument(
        "--baseline-batch-sizes", default="1,8,16,32,64,128", help="batch sizes the baseline tries"
    )
    parser.add_argument(
        "--baseline-sorted-batch-sizes", default="2,4,8,16,32",
        help="batch sizes the baseline tries on length-sorted lists (empty: none)",
    )
    parser.add_argument(
        "--engine", choices=("onnx", "torch"), default="onnx",
        help="the engine the server runs (embedding.engine): the in-process side of the "
        "single-caller comparison uses the same one (default onnx)",
    )
    parser.add_argument("--single-rounds", type=int, default=8, help="interleaved single-caller rounds")
    parser.add_argument("--single-block", type=int, default=25, help="calls per side per interleaved round")
    parser.add_argument("--concurrency", type=int, default=64, help="callers for the saturation and echo phases")
    parser.add_argument(
        "--saturation-rounds", type=int, default=4,
        help="rounds of the saturation phase, each an in-process block and a server block (default 4)",
    )
    parser.add_argument(
        "--saturation-seconds", type=float, default=8.0,
        help="measured seconds of each block of a saturation round (default 8; the server's "
        "block also gets --warmup)",
    )
    parser.add_argument("--half-load", type=float, default=0.5, help="fraction of saturation for the p99 phase")
    parser.add_argument("--overload", type=float, default=3.0, help="multiple of saturation for the overload phase")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s (default 10)")
    parser.add_argument(
        "--overload-timeout", type=float, default=None,
        help="the overload phase's per-request deadline, s (default: --timeout; 0.2 for the short-"
        "deadline overload claim, which perf.embed_overload judges on its own)",
    )
    parser.add_argument("--max-inflight", type=int, default=4096, help="open-loop client cap (drops are reported)")
    parser.add_argument("--cooldown", type=float, default=2.0, help="idle seconds between phases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-cmd",
        default=DEFAULT_SERVER_CMD,
        help="command starting the embedding server; {python} and {port} are filled in "
        f"(default: {DEFAULT_SERVER_CMD!r})",
    )
    parser.add_argument("--server-target", help="use this running server (host:port) instead of starting one")
    parser.add_argument("--server-pid", type=int, help="with --server-target: its pid, for RSS")
    parser.add_argument("--health-service", default=EMBED_SERVICE, help="health service name to wait for")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for SERVING")
    parser.add_argument(
        "--rss-growth-limit", type=float, default=0.25,
        help="overload passes 'memory bounded' when RSS max <= (1 + this) x RSS before (default 0.25)",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where embed.json/embed.md go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars from the load generator")
    return parser


@contextlib.contextmanager
def _servers(args: argparse.Namespace, log_dir: Path) -> Iterator[tuple[ServerProcess, ServerProcess, str]]:
    started: list[ServerProcess] = []
    try:
        echo = start_echo_server(log_dir)
        started.append(echo)
        print(f"[bench] echo server pid {echo.pid} on {echo.target}", file=sys.stderr)
        if args.server_target:
            host, _, port = args.server_target.rpartition(":")
            embed = ServerProcess("embedding server", host, int(port), external_pid=args.server_pid)
            wait_for_serving(embed, args.health_service, args.startup_timeout)
            yield echo, embed, f"external server at {args.server_target}"
        else:
            embed = start_backbone_server(args.server_cmd, log_dir, args.health_service, args.startup_timeout)
            started.append(embed)
            yield echo, embed, args.server_cmd
    finally:
        for server in reversed(started):
            server.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m perf.embed_bench``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.saturation_rounds < 1 or args.saturation_seconds <= 0:
        parser.error("--saturation-rounds must be at least 1 and --saturation-seconds positive")
    out_dir: Path = args.out_dir
    raw_dir = out_dir / "embed_raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    runs: list[dict[str, Any]] = []
    with _servers(args, raw_dir) as (echo, embed, server_command):
        worker = InProcessWorker(args)
        try:
            for index in range(1, args.runs + 1):
                runs.append(run_once(args, index, echo, embed, raw_dir, worker))
        finally:
            worker.close()
    summary = summarize(runs)
    plot_note = plot_latency_vs_load(runs, out_dir / "embed_latency_vs_load.png")
    meta = {
        "started_at": started_at,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "git_commit": _git_commit(),
        "server_command": server_command,
        "concurrency": args.concurrency,
        "half_load": args.half_load,
        "overload": args.overload,
        "duration": args.duration,
        "warmup": args.warmup,
        "saturation_rounds": args.saturation_rounds,
        "saturation_seconds": args.saturation_seconds,
        "baseline_seconds": args.baseline_seconds,
        "timeout": args.timeout,
        "plot_note": plot_note,
    }
    write_json(out_dir / "embed.json", {"meta": meta, "summary": summary, "runs": runs})
    (out_dir / "embed.md").write_text(markdown_report(summary, runs, meta), encoding="utf-8")
    print((out_dir / "embed.md").read_text(), file=sys.stderr)
    return 0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
