"""The load generator: drives one scenario against a gRPC target and writes a JSON result.

Two modes:

* **open loop** (``--rate R``): arrivals follow a Poisson process at R requests/s, on an
  absolute schedule that does not wait for answers (a slow server does not slow the
  arrivals). At most ``--max-inflight`` requests are outstanding; an arrival beyond the cap
  is not sent and is counted as ``dropped_by_client`` -- never silently lost.
* **closed loop** (``--concurrency N``): N callers, each sending its next request as soon as
  its previous one is answered ("N concurrent callers").

The measurement window opens after ``--warmup`` seconds and lasts ``--duration`` seconds.
Open loop counts the requests *scheduled* in the window and waits for all of them (each has
the ``--timeout`` deadline), so every arrival ends as a status or a client drop; throughput
is their OK answers per second over the window extended to the last answer. Closed loop
counts the requests *answered* in the window (throughput = OK answers in the window /
duration, unbiased however long a request takes); requests still open when it closes are
waited for and reported as ``completed_after_window``. Latency is measured from the moment
the call is started; for open loop the gap between scheduled and actual start is reported
as ``schedule_lag_ms`` so a lagging client shows.

Run it as its own process, never inside the server: ``python -m perf.loadgen embed
--target 127.0.0.1:50051 --rate 100 --duration 20``. It runs on grpc.aio with uvloop and
shows a tqdm progress bar on stderr (``--no-progress`` turns it off).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import psutil

from clients.errors import retry_after_s
from perf.report import emit_json, latency_summary
from perf.scenarios import SCENARIOS, BadResponse, Call, Scenario

#: The status name recorded for a call that got no answer before the drain timed out.
NO_ANSWER = "NO_ANSWER"
#: Status name for an OK answer that did not match the request.
BAD_RESPONSE = "BAD_RESPONSE"
#: Status name for an exception on the client side that is not a gRPC status.
CLIENT_ERROR = "CLIENT_ERROR"
#: Seconds between progress updates and server RSS samples.
MONITOR_PERIOD_S = 0.25
#: Closed loop: longest wait after a refusal with pushback, seconds.
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class LoadConfig:
    """How to load the target; everything except the scenario's own options."""

    target: str
    mode: Literal["open", "closed"]
    #: Open loop: mean Poisson arrival rate, requests/s.
    rate: float = 0.0
    #: Closed loop: number of callers sending back to back.
    concurrency: int = 1
    #: Open loop: most requests outstanding at once; further arrivals are dropped and counted.
    max_inflight: int = 1024
    #: Measurement window, seconds (after the warm-up).
    duration: float = 10.0
    #: Seconds of load before the window opens; not counted.
    warmup: float = 2.0
    #: Per-request deadline, seconds.
    timeout: float = 10.0
    #: Seed of the arrival process (and of the scenario's choice of inputs).
    seed: int = 0
    #: Process whose RSS (with its children) and CPU time are sampled during the run.
    server_pid: int | None = None
    #: Show a tqdm progress bar on stderr.
    progress: bool = True
    #: Seconds to wait for the channel to connect before giving up.
    connect_timeout: float = 30.0
    #: Closed loop: a caller refused with RESOURCE_EXHAUSTED waits the server's pushback
    #: (google.rpc.RetryInfo; at most MAX_BACKOFF_S) before its next request, as gRPC's
    #: retry design (A6) has clients do: the server's pushback replaces the client's own
    #: backoff. Off: it retries at once (a refusal storm; measures the cost of refusing).
    honor_pushback: bool = True

    def validate(self) -> None:
        """Raise ValueError when the settings cannot describe a run."""
        if self.mode == "open" and not self.rate > 0:
            raise ValueError("open loop needs rate > 0")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("closed loop needs concurrency >= 1")
        if self.mode not in ("open", "closed"):
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.max_inflight < 1 or self.duration <= 0 or self.warmup < 0 or self.timeout <= 0:
            raise ValueError("max_inflight >= 1, duration > 0, warmup >= 0, timeout > 0 required")


class _ServerSampler:
    """RSS (process + children) and CPU time of the server process, sampled over the run."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_bytes: list[int] = []
        self.exited = False
        self._proc = psutil.Process(pid)
        self._cpu_start: float | None = None
        self._cpu_end: float | None = None

    def _family(self) -> list[psutil.Process]:
        return [self._proc, *self._proc.children(recursive=True)]

    def _cpu_seconds(self) -> float | None:
        total = 0.0
        try:
            for proc in self._family():
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            self.exited = True
            return None
        return total

    def sample(self) -> None:
        """Take one RSS sample; marks the server exited when it is gone."""
        if self.exited:
            return
        try:
            self.rss_bytes.append(sum(p.memory_info().rss for p in self._family()))
        except psutil.Error:
            self.exited = True

    def window_opened(self) -> None:
        """Remember the CPU time at the start of the measurement window."""
        self._cpu_start = self._cpu_seconds()

    def window_closed(self) -> None:
        """Remember the CPU time at the end of the measurement window."""
        self._cpu_end = self._cpu_seconds()

    def result(self) -> dict[str, Any]:
        """RSS start/max/end in MiB, CPU seconds used in the window, samples taken."""
        mib = [b / 2**20 for b in self.rss_bytes]
        cpu = None
        if self._cpu_start is not None and self._cpu_end is not None:
            cpu = round(self._cpu_end - self._cpu_start, 3)
        return {
            "pid": self.pid,
            "rss_mb": {
                "start": round(mib[0], 1) if mib else None,
                "max": round(max(mib), 1) if mib else None,
                "end": round(mib[-1], 1) if mib else None,
            },
            "cpu_s_in_window": cpu,
            "rss_samples": len(mib),
            "exited": self.exited,
        }


class LoadRun:
    """One run of one scenario; :meth:`run` returns the result dict."""

    def __init__(self, config: LoadConfig, call: Call, items_per_request: int = 1) -> None:
        config.validate()
        if config.mode == "closed" and config.concurrency > config.max_inflight:
            config = LoadConfig(**{**asdict(config), "max_inflight": config.concurrency})
        self.config = config
        self._call = call
        self._items = items_per_request
        # Counters cover measured requests only (open loop: scheduled inside the window;
        # closed loop: answered inside it), except `inflight` and `after_window`.
        self.inflight = 0
        self.max_inflight_seen = 0
        self.arrivals = 0
        self.issued = 0
        self.dropped = 0
        # Closed loop: answers that came after the window closed (waited for, not counted).
        self.after_window = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.ok_latency_ms: list[float] = []
        self.error_latency_ms: dict[str, list[float]] = collections.defaultdict(list)
        self.extra_ms: dict[str, list[float]] = collections.defaultdict(list)
        self.lag_ms: list[float] = []
        self.client_errors: collections.Counter[str] = collections.Counter()
        self.last_done = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        # Client CPU seconds at the window's start and end (set by the monitor).
        self._client_cpu: list[float | None] = [None, None]
        self.t0 = self.window_start = self.window_end = 0.0

    # -- one request -----------------------------------------------------------------------

    def _measured(self, scheduled: float, end: float) -> bool:
        if self.config.mode == "open":
            return self.window_start <= scheduled < self.window_end
        if end >= self.window_end:
            self.after_window += 1
        return self.window_start <= end < self.window_end

    async def _issue(self, scheduled: float) -> float | None:
        """Send one request; caller already counted it in ``inflight``. Returns the
        server's pushback in seconds when it refused with RESOURCE_EXHAUSTED + RetryInfo."""
        start = time.perf_counter()
        status = NO_ANSWER
        extra = None
        pushback = None
        try:
            extra = await self._call(self.config.timeout)
            status = "OK"
        except grpc.aio.AioRpcError as error:
            status = error.code().name
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                pushback = retry_after_s(error)
        except BadResponse:
            status = BAD_RESPONSE
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - counted and reported, never lost
            status = CLIENT_ERROR
            self.client_errors[f"{type(error).__name__}: {error}"[:200]] += 1
        finally:
            end = time.perf_counter()
            self.inflight -= 1
            if self._measured(scheduled, end):
                self._record(status, (end - start) * 1e3, extra, end)
        return pushback

    def _record(self, status: str, latency_ms: float, extra: Any, end: float) -> None:
        self.issued += 1
        if self.config.mode == "closed":
            self.arrivals += 1
        self.statuses[status] += 1
        self.last_done = max(self.last_done, end)
        if status == "OK":
            self.ok_latency_ms.append(latency_ms)
            for key, value in (extra or {}).items():
                self.extra_ms[key].append(float(value))
        else:
            self.error_latency_ms[status].append(latency_ms)

    def _start(self, scheduled: float) -> None:
        """Count and launch one request now (inflight is raised before the task runs)."""
        self.inflight += 1
        self.max_inflight_seen = max(self.max_inflight_seen, self.inflight)
        task = asyncio.create_task(self._issue(scheduled))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the two modes ---------------------------------------------------------------------

    async def _open_loop(self) -> None:
        rng = np.random.default_rng(self.config.seed)
        mean_gap = 1.0 / self.config.rate
        scheduled = self.t0
        while True:
            for gap in rng.exponential(mean_gap, size=1024):
                scheduled += gap
                if scheduled >= self.window_end:
                    return
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                measured = scheduled >= self.window_start
                if measured:
                    self.arrivals += 1
                if self.inflight >= self.config.max_inflight:
                    if measured:
                        self.dropped += 1
                    continue
                if measured:
                    self.lag_ms.append((time.perf_counter() - scheduled) * 1e3)
                self._start(scheduled)

    # -- the run ---------------------------------------------------------------------------

    async def run(self, scenario: str = "", scenario_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load the target for warm-up + duration, wait for every answer, return the result."""
        cfg = self.config
        sampler = _ServerSampler(cfg.server_pid) if cfg.server_pid else None
        client = psutil.Process()
        if sampler:
            sampler.sample()
        self.t0 = time.perf_counter()
        self.window_start = self.t0 + cfg.warmup
        self.window_end = self.window_start + cfg.duration
        started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        monitor = asyncio.create_task(self._monitor(sampler, client))
        try:
            if cfg.mode == "open":
                await self._open_loop()
            else:
                await asyncio.gather(*(self._closed_caller() for _ in range(cfg.concurrency)))
            if self._tasks:
                # Every sent request carries a deadline; the margin covers a slow loop.
                await asyncio.wait(set(self._tasks), timeout=cfg.timeout + 5.0)
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                # A request cancelled here got no answer: count it, never drop it silently.
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        finally:
            monitor.cancel()
            try:
                await monitor
            except asyncio.CancelledError:
                pass
        return self._result(scenario, scenario_options or {}, sampler, started_at)

    async def _closed_caller(self) -> None:
        """One closed-loop caller: its next request goes out when the previous one is answered."""
        while (now := time.perf_counter()) < self.window_end:
            self.inflight += 1
            self.max_inflight_seen = max(self.max_inflight_seen, self.inflight)
            pushback = await self._issue(now)
            if pushback is not None and self.config.honor_pushback:
                wait = min(MAX_BACKOFF_S, pushback)
                await asyncio.sleep(min(wait, max(0.0, self.window_end - time.perf_counter())))
            else:
                # A call that fails without suspending must not starve the loop.
                await asyncio.sleep(0)

    async def _monitor(self, sampler: _ServerSampler | None, client: psutil.Process) -> None:
        """Progress bar, server RSS samples, window-edge CPU readings; runs until cancelled."""
        from tqdm import tqdm

        cfg = self.config
        total = cfg.warmup + cfg.duration
        bar = tqdm(
            total=round(total, 2),
            unit="s",
            file=sys.stderr,
            disable=not cfg.progress,
            bar_format="{desc} {bar} {n:.0f}/{total:.0f}s {postfix}",
            desc=f"{cfg.mode} {'%.0f/s' % cfg.rate if cfg.mode == 'open' else f'x{cfg.concurrency}'}",
            leave=False,
        )
        opened = closed = False
        try:
            while True:
                now = time.perf_counter()
                if not opened and now >= self.window_start:
                    opened = True
                    self._client_cpu[0] = _cpu_seconds(client)
                    if sampler:
                        sampler.window_opened()
                if not closed and now >= self.window_end:
                    closed = True
                    self._client_cpu[1] = _cpu_seconds(client)
                    if sampler:
                        sampler.window_closed()
                if sampler:
                    # /proc scans can take milliseconds: keep them off the client's loop.
                    await asyncio.to_thread(sampler.sample)
                bar.n = round(min(now - self.t0, total), 2)
                bar.set_postfix(
                    ok=self.statuses["OK"],
                    err=sum(self.statuses.values()) - self.statuses["OK"],
                    drop=self.dropped,
                    inflight=self.inflight,
                    refresh=False,
                )
                bar.refresh()
                await asyncio.sleep(MONITOR_PERIOD_S)
        finally:
            if not closed:
                self._client_cpu[1] = _cpu_seconds(client)
                if sampler:
                    if not opened:
                        sampler.window_opened()
                    sampler.window_closed()
            bar.close()

    def _result(
        self,
        scenario: str,
        scenario_options: dict[str, Any],
        sampler: _ServerSampler | None,
        started_at: str,
    ) -> dict[str, Any]:
        cfg = self.config
        if cfg.mode == "open":
            elapsed = max(self.window_end, self.last_done) - self.window_start
        else:
            elapsed = cfg.duration
        ok = self.statuses["OK"]
        answered = ok + self.statuses["RESOURCE_EXHAUSTED"]
        errors = {k: v for k, v in sorted(self.statuses.items()) if k != "OK"}
        cpu_start, cpu_end = self._client_cpu
        return {
            "scenario": scenario,
            "scenario_options": scenario_options,
            "target": cfg.target,
            "mode": cfg.mode,
            "target_rate_rps": cfg.rate if cfg.mode == "open" else None,
            "concurrency": cfg.concurrency if cfg.mode == "closed" else None,
            "max_inflight": cfg.max_inflight,
            "honor_pushback": cfg.honor_pushback,
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "timeout_s": cfg.timeout,
            "elapsed_s": round(elapsed, 3),
            "throughput_rps": round(ok / elapsed, 3),
            "items_per_s": round(ok * self._items / elapsed, 3),
            "items_per_request": self._items,
            "offered_rps": round(self.arrivals / cfg.duration, 3),
            "latency_ms": latency_summary(self.ok_latency_ms),
            "latency_by_status_ms": {k: latency_summary(v) for k, v in sorted(self.error_latency_ms.items())},
            "metrics_ms": {k: latency_summary(v) for k, v in sorted(self.extra_ms.items())},
            "schedule_lag_ms": latency_summary(self.lag_ms) if cfg.mode == "open" else None,
            "counts": {
                "arrivals": self.arrivals,
                "issued": self.issued,
                "ok": ok,
                "errors": sum(errors.values()),
                "dropped_by_client": self.dropped,
                "answered_ok_or_resource_exhausted": answered,
                "completed_after_window": self.after_window,
            },
            "errors_by_status": errors,
            "client_errors": dict(self.client_errors),
            "max_inflight_observed": self.max_inflight_seen,
            "client": {
                "pid": os.getpid(),
                "cpu_s_in_window": (
                    round(cpu_end - cpu_start, 3) if cpu_start is not None and cpu_end is not None else None
                ),
                "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            },
            "server": sampler.result() if sampler else None,
            "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "started_at": started_at,
        }


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


async def run_scenario(
    config: LoadConfig, scenario: Scenario, options: argparse.Namespace | None = None
) -> dict[str, Any]:
    """Connect to ``config.target``, build the scenario's call, run the load, return the result.

    ``options`` are the scenario's parsed options (defaults when None); ``options.seed`` is
    set from the config.
    """
    options = _scenario_defaults(scenario) if options is None else options
    options.seed = config.seed
    async with grpc.aio.insecure_channel(config.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=config.connect_timeout)
        call = await scenario.build(channel, options)
        run = LoadRun(config, call, scenario.items_per_request(options))
        shown = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items() if k in _scenario_keys(scenario)}
        return await run.run(scenario.name, shown)


def _scenario_parser(scenario: Scenario) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    scenario.add_arguments(parser)
    return parser


def _scenario_defaults(scenario: Scenario) -> argparse.Namespace:
    return _scenario_parser(scenario).parse_args([])


def _scenario_keys(scenario: Scenario) -> set[str]:
    return {action.dest for action in _scenario_parser(scenario)._actions}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m perf.loadgen`` parser: one subcommand per scenario."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default="127.0.0.1:50051", help="host:port (default 127.0.0.1:50051)")
    mode = common.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: callers sending back to back")
    common.add_argument(
        "--max-inflight",
        type=int,
        default=1024,
        help="open loop: outstanding requests at most; arrivals beyond are dropped and counted",
    )
    common.add_argument("--duration", type=float, default=10.0, help="measurement window, s (default 10)")
    common.add_argument("--warmup", type=float, default=2.0, help="uncounted load before the window, s")
    common.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s (default 10)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--server-pid", type=int, help="sample this process's RSS and CPU during the run")
    common.add_argument("--json-out", type=Path, help="write the result here (default: stdout)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument(
        "--ignore-pushback",
        action="store_true",
        help="closed loop: retry at once after RESOURCE_EXHAUSTED instead of waiting the "
        "server's RetryInfo pushback",
    )
    parser = argparse.ArgumentParser(
        prog="python -m perf.loadgen", description="Open- or closed-loop gRPC load generator."
    )
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for scenario in SCENARIOS.values():
        scenario_parser = sub.add_parser(scenario.name, parents=[common], help=scenario.help)
        scenario.add_arguments(scenario_parser)
    return parser


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """The LoadConfig the parsed command line describes."""
    return LoadConfig(
        target=args.target,
        mode="open" if args.rate is not None else "closed",
        rate=args.rate or 0.0,
        concurrency=args.concurrency or 1,
        # Closed loop: the callers are the cap.
        max_inflight=args.max_inflight if args.rate is not None else (args.concurrency or 1),
        duration=args.duration,
        warmup=args.warmup,
        timeout=args.timeout,
        seed=args.seed,
        server_pid=args.server_pid,
        progress=not args.no_progress,
        honor_pushback=not args.ignore_pushback,
    )


def one_line(result: dict[str, Any]) -> str:
    """A human summary of a result, for stderr."""
    lat = result["latency_ms"]
    counts = result["counts"]
    return (
        f"{result['scenario']} {result['mode']}: {result['throughput_rps']:.1f} ok/s, "
        f"p50 {lat['p50']} ms p99 {lat['p99']} ms, ok {counts['ok']}/{counts['issued']} sent, "
        f"dropped {counts['dropped_by_client']}, errors {result['errors_by_status'] or 0}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m perf.loadgen``."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as error:
        print(f"loadgen: {error}", file=sys.stderr)
        return 2
    import uvloop

    result = uvloop.run(run_scenario(config, SCENARIOS[args.scenario], args))
    emit_json(args.json_out, result)
    print(one_line(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
