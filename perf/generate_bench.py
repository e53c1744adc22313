"""The generation hop's benchmark: streaming through the server vs in-process vLLM.

One invocation, ``--runs`` times:

1. starts ``backbone serve generation`` as its own process and waits for SERVING;
2. for each concurrency (default 1, 4, 16) runs a closed-loop streaming client as a
   separate process (``python -m perf.generate_bench client``): every stream sends the
   same ~64-token raw prompt, greedy, ``--max-tokens`` tokens;
3. stops the server, then runs the same workload against vLLM in-process
   (``python -m perf.generate_bench inprocess``, its own process, the same engine
   arguments built from the same config, the same prompt token ids).

Per phase: TTFT (send -> first token; p50/p95/p99), time per output token (per stream,
(last - first) / (tokens - 1)), aggregate output tokens/s over the measurement window
(tokens received after ``--warmup`` until ``--duration`` later), errors by status.
Judged figures (medians over runs): TTFT p50 at 1 stream (target <= 100 ms), and
server / in-process tokens/s at each concurrency (target >= 0.9).

Writes ``<out-dir>/generate.json`` and ``generate.md`` and prints the table; raw
per-phase JSON and the server log go to ``<out-dir>/generate_raw/``.

    .venv/bin/python -m perf.generate_bench                  # full: 3 runs x 20 s windows
    .venv/bin/python -m perf.generate_bench --runs 1 --duration 3 --warmup 1 \\
        --out-dir /tmp/generate_smoke                        # smoke test of the machinery
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from perf.harness import REPO_ROOT, ServerProcess, free_port, log_tail
from perf.harness import start_server as start_server_process
from perf.report import latency_summary, markdown_table, median, read_json, write_json

DEFAULT_OUT_DIR = REPO_ROOT / "perf" / "results"
DEFAULT_SERVER_CMD = (
    "{python} -m server.main serve generation --port {port} --set server.metrics_port=0"
)
GENERATION_SERVICE = "backbone.v1.GenerationService"
TTFT_P50_MAX_MS = 100.0
TOKENS_RATIO_MIN = 0.90
PROMPT_TOKENS = 64
# A paragraph that the model continues at length; cut to PROMPT_TOKENS tokens.
PROMPT_SOURCE = (
    "The sky looks blue on a clear day because of the way sunlight interacts with the "
    "atmosphere. Sunlight contains every colour of the visible spectrum. When it enters "
    "the atmosphere it meets molecules of nitrogen and oxygen that are much smaller than "
    "the wavelength of light, and these molecules scatter short wavelengths far more "
    "strongly than long ones. This effect, called Rayleigh scattering, sends blue light "
    "across the whole sky, so that wherever we look we see it coming towards us. At "
    "sunrise and sunset the light travels through much more air, and"
)

# One stream yields (monotonic time, tokens in this delta) per delta.
StreamFn = Callable[[], AsyncIterator[tuple[float, int]]]


# --- the workload, shared by the client and the in-process runner ---------------------


def bench_prompt(model_dir: Path) -> tuple[str, list[int]]:
    """The ~64-token raw prompt (text and ids) for the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer.encode(PROMPT_SOURCE)[:PROMPT_TOKENS]
    text = tokenizer.decode(ids)
    return text, tokenizer.encode(text)


async def closed_loop(
    stream: StreamFn, concurrency: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """``concurrency`` workers stream back to back; figures over the measurement window."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = (start + warmup_s, start + warmup_s + duration_s)
    ttft_ms: list[float] = []
    tpot_ms: list[float] = []
    tokens_in_window = 0
    completed = 0
    errors: dict[str, int] = {}

    async def worker() -> None:
        nonlocal tokens_in_window, completed
        while loop.time() < window[1]:
            sent = loop.time()
            first = last = None
            count = 0
            try:
                # aclosing: leaving early cancels the stream (and aborts it in the engine).
                async with contextlib.aclosing(stream()) as deltas:
                    async for at, n in deltas:
                        if n == 0:
                            continue
                        first = first if first is not None else at
                        last = at
                        count += n
                        if window[0] <= at <= window[1]:
                            tokens_in_window += n
                        if at > window[1]:
                            break
            except Exception as exc:  # noqa: BLE001 - counted by kind, the run goes on
                errors[error_name(exc)] = errors.get(error_name(exc), 0) + 1
                continue
            # Streams sent inside the window count, finished or cut at its end.
            if sent >= window[0] and first is not None and first <= window[1]:
                completed += 1
                ttft_ms.append((first - sent) * 1000)
                if count > 1:
                    tpot_ms.append((last - first) * 1000 / (count - 1))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "tokens_per_s": round(tokens_in_window / duration_s, 2),
        "streams": completed,
        "ttft_ms": latency_summary(ttft_ms),
        "tpot_ms": latency_summary(tpot_ms),
        "errors": errors,
    }


async def run_phases(stream: StreamFn, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every concurrency of ``args.concurrency`` after one warm-up stream."""
    async for _ in stream():
        pass
    results = []
    for concurrency in parse_ints(args.concurrency):
        results.append(await closed_loop(stream, concurrency, args.warmup, args.duration))
        print(f"[bench] {args.command} c={concurrency}: {one_line(results[-1])}", file=sys.stderr)
    return results


def error_name(exc: BaseException) -> str:
    """A gRPC status name, or the exception's type."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    return getattr(code, "name", None) or type(exc).__name__


def one_line(result: dict[str, Any]) -> str:
    """A phase in one line."""
    return (
        f"{result['tokens_per_s']} tok/s, ttft p50 {result['ttft_ms']['p50']} ms, "
        f"tpot p50 {result['tpot_ms']['p50']} ms, {result['streams']} streams, "
        f"errors {result['errors'] or 0}"
    )


def parse_ints(text: str) -> list[int]:
    """"1,4,16" -> [1, 4, 16]."""
    return [int(part) for part in text.split(",") if part.strip()]


def config_from(args: argparse.Namespace):
    """The process config the server would build from the same --config/--set."""
    from server.config import load_config, parse_assignment

    overrides: dict[str, dict[str, str]] = {}
    for item in args.set or ():
        section, key, value = parse_assignment(item)
        overrides.setdefault(section, {})[key] = value
    return load_config(args.config or None, environ=os.environ, overrides=overrides)


# --- the two sides -------------------------------------------------------------------


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop streams against a running server (its own process)."""
    import grpc

    from backbone.v1 import generation_service_pb2 as pb
    from backbone.v1 import generation_service_pb2_grpc
    from server.engines.model_prep import ensure_model_dir

    config = config_from(args)
    text, ids = bench_prompt(ensure_model_dir(config.generation.model_dir or None))
    request = pb.GenerateRequest(
        prompt=text, sampling=pb.SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    )
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)

        async def stream() -> AsyncIterator[tuple[float, int]]:
            call = stub.Generate(request, timeout=args.timeout)
            try:
                async for message in call:
                    if message.HasField("delta"):
                        yield time.monotonic(), len(message.delta.token_ids)
            finally:
                call.cancel()

        phases = await run_phases(stream, args)
    return {"side": "server", "prompt_tokens": len(ids), "phases": phases}


async def inprocess_main(args: argparse.Namespace) -> dict[str, Any]:
    """The same workload straight on vLLM's AsyncLLM in this process."""
    from vllm import SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind

    from server.engines.generator import model_specs
    from server.engines.vllm_engine import make_async_llm, resolve_model_dir

    spec = model_specs(config_from(args).generation)[0]
    model_dir = resolve_model_dir(spec)
    _, ids = bench_prompt(model_dir)
    started = time.monotonic()
    llm = await asyncio.to_thread(make_async_llm, spec, model_dir)
    print(f"[bench] in-process engine up in {time.monotonic() - started:.1f}s", file=sys.stderr)
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, output_kind=RequestOutputKind.DELTA
    )

    async def stream() -> AsyncIterator[tuple[float, int]]:
        async for out in llm.generate(tokens_input(ids), params, uuid.uuid4().hex):
            yield time.monotonic(), len(out.outputs[0].token_ids)

    try:
        phases = await run_phases(stream, args)
    finally:
        llm.shutdown()
    return {"side": "in-process", "prompt_tokens": len(ids), "phases": phases}


# --- orchestration -------------------------------------------------------------------


def start_server(args: argparse.Namespace, log_path: Path) -> ServerProcess:
    """``backbone serve generation`` in its own process, SERVING (perf/harness.py)."""
    port = free_port()
    command = args.server_cmd.format(python=shlex.quote(sys.executable), port=port)
    argv = shlex.split(command) + _passthrough(args)
    return start_server_process(argv, "generation server", port, GENERATION_SERVICE,
                                args.startup_timeout, log_path)


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--config", args.config] if args.config else []
    for item in args.set or ():
        out += ["--set", item]
    return out


def _side(args: argparse.Namespace, command: str, out: Path, extra: list[str]) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "perf.generate_bench", command,
        "--concurrency", args.concurrency, "--duration", str(args.duration),
        "--warmup", str(args.warmup), "--max-tokens", str(args.max_tokens),
        "--json-out", str(out), *_passthrough(args), *extra,
    ]
    subprocess.run(argv, cwd=REPO_ROOT, check=True)
    return read_json(out)


def run_once(args: argparse.Namespace, index: int, raw_dir: Path) -> dict[str, Any]:
    """Server phases (client in its own process), then in-process phases."""
    server = start_server(args, raw_dir / f"server_run{index}.log")
    try:
        served = _side(args, "client", raw_dir / f"run{index}_server.json",
                       ["--target", server.target, "--timeout", str(args.timeout)])
    except BaseException:
        print(log_tail(server.log_path), file=sys.stderr)
        raise
    finally:
        server.stop(grace_s=30)
    local = _side(args, "inprocess", raw_dir / f"run{index}_inprocess.json", [])
    return {"server": served, "in_process": local}


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """Per-concurrency figures and ratios of one run."""
    out: dict[str, Any] = {}
    for served, local in zip(run["server"]["phases"], run["in_process"]["phases"], strict=True):
        c = served["concurrency"]
        out[str(c)] = {
            "server_tokens_per_s": served["tokens_per_s"],
            "inprocess_tokens_per_s": local["tokens_per_s"],
            "tokens_ratio": _ratio(served["tokens_per_s"], local["tokens_per_s"]),
            "server_ttft_p50_ms": served["ttft_ms"]["p50"],
            "inprocess_ttft_p50_ms": local["ttft_ms"]["p50"],
            "server_tpot_p50_ms": served["tpot_ms"]["p50"],
            "inprocess_tpot_p50_ms": local["tpot_ms"]["p50"],
            "server_errors": served["errors"],
        }
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs, and pass/fail of the judged claims."""
    per_run = [figures(r) for r in runs]
    keys = per_run[0].keys()
    medians = {
        c: {k: median(f[c][k] for f in per_run) for k in per_run[0][c] if k != "server_errors"}
        for c in keys
    }
    ttft = medians.get("1", {}).get("server_ttft_p50_ms")
    claims = {"ttft_p50_1_stream_ms": {
        "value": ttft, "target": f"<= {TTFT_P50_MAX_MS}",
        "pass": ttft is not None and ttft <= TTFT_P50_MAX_MS}}
    for c, row in medians.items():
        ratio = row["tokens_ratio"]
        claims[f"tokens_ratio_c{c}"] = {
            "value": ratio, "target": f">= {TOKENS_RATIO_MIN}",
            "pass": ratio is not None and ratio >= TOKENS_RATIO_MIN}
    return {"medians": medians, "claims": claims, "per_run": per_run}


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The report: the per-concurrency table and the claims."""
    rows = [
        [c, r["server_tokens_per_s"], r["inprocess_tokens_per_s"], r["tokens_ratio"],
         r["server_ttft_p50_ms"], r["inprocess_ttft_p50_ms"],
         r["server_tpot_p50_ms"], r["inprocess_tpot_p50_ms"]]
        for c, r in summary["medians"].items()
    ]
    table = markdown_table(
        ["streams", "server tok/s", "in-process tok/s", "ratio", "server TTFT p50 ms",
         "in-process TTFT p50 ms", "server TPOT p50 ms", "in-process TPOT p50 ms"],
        rows,
    )
    claims = markdown_table(
        ["claim", "value", "target", "pass"],
        [[k, v["value"], v["target"], v["pass"]] for k, v in summary["claims"].items()],
    )
    return (
        f"# Generation benchmark\n\n{meta['runs']} run(s), {meta['duration_s']} s windows, "
        f"prompt {meta['prompt_tokens']} tokens, max_tokens {meta['max_tokens']}, greedy; "
        f"{meta['when']} on {meta['machine']}. Medians over runs.\n\n{table}\n{claims}"
    )


def orchestrate(args: argparse.Namespace) -> int:
    """The whole benchmark."""
    out_dir = Path(args.out_dir)
    raw_dir = out_dir / "generate_raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_once(args, i, raw_dir) for i in range(args.runs)]
    summary = summarize(runs)
    meta = {
        "runs": args.runs, "duration_s": args.duration, "warmup_s": args.warmup,
        "max_tokens": args.max_tokens, "concurrency": parse_ints(args.concurrency),
        "prompt_tokens": runs[0]["server"]["prompt_tokens"],
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "server_cmd": args.server_cmd, "set": args.set or [],
    }
    write_json(out_dir / "generate.json", {"meta": meta, "summary": summary, "runs": runs})
    report = markdown(summary, meta)
    (out_dir / "generate.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the orchestrator and of its two sides."""
    parser = argparse.ArgumentParser(prog="python -m perf.generate_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=("run", "client", "inprocess"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--duration", type=float, default=20.0, help="window per phase, s")
    parser.add_argument("--warmup", type=float, default=3.0, help="discarded lead-in, s")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0, help="per-stream deadline, s")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD)
    parser.add_argument("--config", default="", help="TOML config for server and in-process")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="config override for server and in-process (repeatable)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--target", default="", help="(client) server host:port")
    parser.add_argument("--json-out", default="", help="(client/inprocess) result file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; the sides run on uvloop."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return orchestrate(args)
    import uvloop

    side = client_main if args.command == "client" else inprocess_main
    result = uvloop.run(side(args))
    write_json(Path(args.json_out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
