"""Overload of the embedding hop with short deadlines: 3x saturation, 200 ms per request.

One invocation starts the backbone embedding server (its own process), then ``--rounds``
times: a saturation block (``--concurrency`` closed-loop callers of one MS MARCO passage
each, 10 s deadlines: the server's OK answers/s, "saturation"), then an open-loop block at
``--overload`` x that round's saturation, every request carrying a ``--overload-timeout``
deadline (200 ms). Each block is ``python -m perf.loadgen`` in its own process.

Judged per round (all rounds must pass): every request sent is answered OK or
RESOURCE_EXHAUSTED (a late answer shows as DEADLINE_EXCEEDED and fails it), every answer
came before its deadline (none ended DEADLINE_EXCEEDED at the client's gRPC deadline;
the wall-clock slowest answer and the load generator's own loop stall are shown beside
it: on 2 shared cores a stalled client sees an in-time answer late), no arrival
dropped by the client; the admitted (OK) p99 <= the deadline; the server's RSS during the
block stays within ``--rss-growth-limit`` of its RSS before it. ``perf/results/
embed_overload.json`` and ``.md``; raw blocks under ``perf/results/embed_overload_raw/``.

``python -m perf.embed_overload`` (3 rounds); ``perf.embed_bench --overload-timeout 0.2``
runs the same overload phase inside the full bench.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path
from typing import Any

from perf.embed_bench import DEFAULT_SERVER_CMD, EMBED_SERVICE, run_loadgen
from perf.harness import REPO_ROOT, start_backbone_server
from perf.report import dig, fmt, markdown_table, median, write_json

DEFAULT_OUT_DIR = REPO_ROOT / "perf" / "results"


def overload_figures(over: dict[str, Any], saturation_rps: float, deadline_s: float,
                     rss_growth_limit: float) -> dict[str, Any]:
    """One overload block's judged figures."""
    counts, errors = over["counts"], over["errors_by_status"]
    refused = errors.get("RESOURCE_EXHAUSTED", 0)
    other = counts["issued"] - counts["ok"] - refused
    slowest = max([dig(over, "latency_ms.max") or 0.0]
                  + [(s.get("max") or 0.0) for s in over["latency_by_status_ms"].values()])
    rss0, rss_max = dig(over, "server.rss_mb.start"), dig(over, "server.rss_mb.max")
    growth = None if rss0 is None or rss_max is None else (rss_max - rss0) / rss0
    deadline_ms = 1e3 * deadline_s
    admitted_p99 = dig(over, "latency_ms.p99")
    return {
        "saturation_rps": saturation_rps,
        "offered_rps": over["target_rate_rps"],
        "sent": counts["issued"],
        "ok": counts["ok"],
        "resource_exhausted": refused,
        "other": other,
        "other_by_status": {k: v for k, v in errors.items() if k != "RESOURCE_EXHAUSTED"},
        "dropped_by_client": counts["dropped_by_client"],
        "answered_pct": None if not counts["issued"] else 100.0 * (counts["issued"] - other) / counts["issued"],
        "ok_share": None if not counts["issued"] else counts["ok"] / counts["issued"],
        "ok_rps": over["throughput_rps"],
        "admitted_p50_ms": dig(over, "latency_ms.p50"),
        "admitted_p99_ms": admitted_p99,
        "refused_p99_ms": dig(over, "latency_by_status_ms.RESOURCE_EXHAUSTED.p99"),
        "slowest_answer_ms": slowest,
        "client_stall_max_ms": dig(over, "schedule_lag_ms.max"),
        "rss_before_mb": rss0,
        "rss_max_mb": rss_max,
        "rss_growth": growth,
        "pass": {
            "all_answered_ok_or_resource_exhausted": other == 0 and counts["dropped_by_client"] == 0,
            # gRPC's own deadline at the client decides: an answer that came after it ends
            # DEADLINE_EXCEEDED there (core's timer, not the Python loop, fires it). The
            # wall-clock slowest also holds the client's loop stalls (2 cores shared with
            # the server): shown beside it, not judged.
            "every_answer_before_its_deadline": other == 0,
            "admitted_p99_within_deadline": admitted_p99 is not None and admitted_p99 <= deadline_ms,
            "rss_bounded": growth is not None and growth <= rss_growth_limit,
        },
    }


def markdown_report(rounds: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One row per round and the verdict over all rounds."""
    rows = [
        [r["round"], fmt(f["saturation_rps"]), fmt(f["offered_rps"]), f["sent"], f["ok"], f["resource_exhausted"],
         f["other"], f["dropped_by_client"], fmt(f["admitted_p50_ms"]), fmt(f["admitted_p99_ms"]),
         fmt(f["refused_p99_ms"], 2), fmt(f["slowest_answer_ms"]), fmt(f.get("client_stall_max_ms")),
         f"{fmt(f['rss_before_mb'])} → {fmt(f['rss_max_mb'])}"]
        for r in rounds for f in [r["figures"]]
    ]
    verdict = {k: all(r["figures"]["pass"][k] for r in rounds) for k in rounds[0]["figures"]["pass"]}
    med = {k: median(r["figures"][k] for r in rounds) for k in ("ok_rps", "admitted_p99_ms", "refused_p99_ms")}
    return (
        "# Embedding hop overload, short deadlines\n\n"
        f"{meta['started_at']} · {meta['host']['cpus']} CPUs, load average {meta['loadavg']} at start · "
        f"{meta['rounds']} rounds · saturation: {meta['concurrency']} closed-loop callers, 10 s deadlines · "
        f"overload: open loop at {meta['overload']}x that round's saturation, {1e3 * meta['deadline_s']:.0f} ms "
        f"deadlines, {meta['duration']} s windows · server: `{meta['server_command']}`\n\n"
        + markdown_table(
            ["round", "saturation req/s", "offered req/s", "sent", "OK", "RESOURCE_EXHAUSTED", "other",
             "client-dropped", "admitted p50 ms", "admitted p99 ms", "refused p99 ms", "slowest answer ms",
             "client stall max ms", "RSS MiB before → max"],
            rows,
        )
        + f"\nMedians: {fmt(med['ok_rps'])} OK/s served under overload, admitted p99 "
        f"{fmt(med['admitted_p99_ms'])} ms, refusals answered in {fmt(med['refused_p99_ms'], 2)} ms (p99).\n\n"
        + markdown_table(["claim (every round)", "pass"], [[k.replace("_", " "), v] for k, v in verdict.items()])
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m perf.embed_overload`` parser."""
    parser = argparse.ArgumentParser(prog="python -m perf.embed_overload", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64, help="saturation callers (default 64)")
    parser.add_argument("--saturation-seconds", type=float, default=8.0)
    parser.add_argument("--duration", type=float, default=15.0, help="overload window, s (default 15)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--overload", type=float, default=3.0, help="multiple of saturation (default 3)")
    parser.add_argument("--overload-timeout", type=float, default=0.2, help="overload deadline, s (default 0.2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="saturation deadline, s (default 10)")
    parser.add_argument("--max-inflight", type=int, default=4096)
    parser.add_argument("--rss-growth-limit", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m perf.embed_overload``."""
    args = build_parser().parse_args(argv)
    args.no_progress = True
    raw = args.out_dir / "embed_overload_raw"
    raw.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    loadavg = "%.1f %.1f %.1f" % os.getloadavg()
    server = start_backbone_server(args.server_cmd, raw, EMBED_SERVICE, args.startup_timeout)
    rounds = []
    try:
        for r in range(1, args.rounds + 1):
            sat = run_loadgen(args, "embed", server, raw / f"round{r}_saturation.json",
                              concurrency=args.concurrency, duration=args.saturation_seconds)
            rate = args.overload * sat["throughput_rps"]
            if not rate > 0:
                raise RuntimeError(f"saturation got no OK answers: {sat['errors_by_status']}")
            over = run_loadgen(args, "embed", server, raw / f"round{r}_overload.json", rate=rate,
                               timeout=args.overload_timeout)
            figures = overload_figures(over, sat["throughput_rps"], args.overload_timeout, args.rss_growth_limit)
            print(f"[bench] round {r}: saturation {sat['throughput_rps']:.1f}/s, overload {rate:.1f}/s: "
                  f"OK {figures['ok']} RE {figures['resource_exhausted']} other {figures['other_by_status']} "
                  f"admitted p99 {fmt(figures['admitted_p99_ms'])} ms, slowest {fmt(figures['slowest_answer_ms'])} ms",
                  file=sys.stderr)
            rounds.append({"round": r, "figures": figures})
    finally:
        server.stop()
    meta = {
        "started_at": started_at, "loadavg": loadavg, "loadavg_end": "%.1f %.1f %.1f" % os.getloadavg(),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rounds": args.rounds, "concurrency": args.concurrency, "overload": args.overload,
        "deadline_s": args.overload_timeout, "duration": args.duration, "server_command": args.server_cmd,
    }
    write_json(args.out_dir / "embed_overload.json", {"meta": meta, "rounds": rounds})
    report = markdown_report(rounds, meta)
    (args.out_dir / "embed_overload.md").write_text(report, encoding="utf-8")
    print(report, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
