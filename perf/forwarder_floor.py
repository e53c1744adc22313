"""The floor of any Python gRPC forwarder on this machine: what one extra hop through a
bare forwarder adds to a unary call, for the ways Python can forward.

Every server its own process (started through ``perf.harness``): an echo replica (a
grpc.aio generic handler answering ~1.7 KB, about one 384-d vector's response, at once)
and four forwarders of bytes in front of it, none with any policy:

* ``aio_uvloop``: grpc.aio server and channel on uvloop (what ``backbone serve router``
  runs on, and ``perf/router_bench.py``'s bare proxy);
* ``aio_asyncio``: the same on asyncio's default loop;
* ``sync_threads``: the synchronous grpc server (a thread pool) and channel;
* ``aio_sync_client``: a grpc.aio server calling upstream on the synchronous channel's
  future, its callback handing the answer back to the loop.

This process is the client: one caller, closed loop, rounds alternating the targets (the
order rotates every round), medians of the per-round p50/p99, "added" the median of
the per-round differences against calling the replica directly. ``--out DIR`` writes
``forwarder_floor.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from perf.harness import READY_PREFIX, ServerProcess, start_announced
from perf.report import latency_summary, markdown_table, write_json

METHOD = "/perf.Floor/Say"
ANSWER = b"x" * 1700
FORWARDERS = ("aio_uvloop", "aio_asyncio", "sync_threads", "aio_sync_client")


def _same(data: bytes) -> bytes:
    return data


def _handler(behaviour) -> grpc.GenericRpcHandler:  # noqa: ANN001
    method = grpc.unary_unary_rpc_method_handler(behaviour, _same, _same)
    return grpc.method_handlers_generic_handler("perf.Floor", {"Say": method})


def _announce(port: int) -> None:
    print(f"{READY_PREFIX}127.0.0.1:{port}", flush=True)


async def _serve_aio(behaviour) -> None:  # noqa: ANN001
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(behaviour),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _announce(port)
    await server.wait_for_termination()


def _run(main, loop: str = "uvloop") -> None:  # noqa: ANN001
    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def serve(kind: str, upstream: str) -> None:
    """Serve ``kind`` (``replica`` or one of ``FORWARDERS``) until killed."""
    if kind == "replica":
        async def answer(request: bytes, context) -> bytes:  # noqa: ANN001
            return ANSWER

        _run(lambda: _serve_aio(answer))
    elif kind in ("aio_uvloop", "aio_asyncio"):
        async def main() -> None:
            call = grpc.aio.insecure_channel(upstream).unary_unary(METHOD)

            async def forward(request: bytes, context) -> bytes:  # noqa: ANN001
                return await call(request, timeout=context.time_remaining())

            await _serve_aio(forward)

        _run(main, "uvloop" if kind == "aio_uvloop" else "asyncio")
    elif kind == "sync_threads":
        call = grpc.insecure_channel(upstream).unary_unary(METHOD)
        server = grpc.server(ThreadPoolExecutor(8))
        server.add_generic_rpc_handlers((_handler(
            lambda request, context: call(request, timeout=context.time_remaining())),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        _announce(port)
        server.wait_for_termination()
    elif kind == "aio_sync_client":
        async def main() -> None:
            call = grpc.insecure_channel(upstream).unary_unary(METHOD)
            loop = asyncio.get_running_loop()

            async def forward(request: bytes, context) -> bytes:  # noqa: ANN001
                answer = loop.create_future()

                def done(future) -> None:  # noqa: ANN001 - on grpc's thread
                    def settle() -> None:
                        if answer.done():
                            return
                        if future.exception() is not None:
                            answer.set_exception(future.exception())
                        else:
                            answer.set_result(future.result())
                    loop.call_soon_threadsafe(settle)

                call.future(request, timeout=context.time_remaining()).add_done_callback(done)
                return await answer

            await _serve_aio(forward)

        _run(main)
    else:
        raise SystemExit(f"unknown server kind {kind!r}")


async def drive(targets: dict[str, str], rounds: int, seconds: float) -> dict[str, dict]:
    """Per target: the median over rounds of p50/p99 (ms) and of p50 added vs direct."""
    channels = {name: grpc.aio.insecure_channel(address) for name, address in targets.items()}
    calls = {name: ch.unary_unary(METHOD) for name, ch in channels.items()}
    for call in calls.values():  # warm-up: connections
        for _ in range(200):
            await call(b"q", timeout=5)
    per: dict[str, list[tuple[float, float, int]]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            latencies_ms: list[float] = []
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                began = time.perf_counter()
                await calls[name](b"q", timeout=5)
                latencies_ms.append((time.perf_counter() - began) * 1e3)
            summary = latency_summary(latencies_ms)
            per[name].append((summary["p50"], summary["p99"], summary["count"]))
    for channel in channels.values():
        await channel.close()
    direct = per["direct"]
    return {name: {
        "p50_ms": round(statistics.median(g[0] for g in got), 3),
        "p99_ms": round(statistics.median(g[1] for g in got), 3),
        "calls": sum(g[2] for g in got),
        "added_p50_ms": round(statistics.median(g[0] - d[0] for g, d in zip(got, direct)), 3),
    } for name, got in per.items()}


def markdown(result: dict[str, dict], meta: dict) -> str:
    """The report's table."""
    rows = [[name, f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['added_p50_ms']:+.3f}", r["calls"]]
            for name, r in result.items()]
    return (f"Forwarder floor: {meta['rounds']} rounds x {meta['seconds']} s per target, 1 caller\n\n"
            + markdown_table(["target", "p50 ms", "p99 ms", "added p50 ms (vs direct)", "calls"], rows))


def main(argv: list[str] | None = None) -> int:
    """Without a subcommand: run the comparison; ``serve KIND [UPSTREAM]``: one server."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve(argv[1], argv[2] if len(argv) > 2 else "")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0, help="per target and round")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON and md")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds >= 1 and --seconds > 0")
    procs: list[ServerProcess] = []
    try:
        with tempfile.TemporaryDirectory() as logs:
            def start(kind: str, upstream: str = "") -> ServerProcess:
                proc = start_announced(
                    [sys.executable, "-m", "perf.forwarder_floor", "serve", kind, upstream],
                    kind, Path(logs) / f"{kind}.log", timeout_s=60)
                procs.append(proc)
                return proc

            replica = start("replica")
            targets = {"direct": replica.target}
            targets.update({kind: start(kind, replica.target).target for kind in FORWARDERS})
            result = asyncio.run(drive(targets, args.rounds, args.seconds))
    finally:
        for proc in procs:
            proc.kill()
    meta = {"rounds": args.rounds, "seconds": args.seconds}
    text = markdown(result, meta)
    print(text)
    if args.out is not None:
        write_json(args.out / "forwarder_floor.json", {"meta": meta, "result": result})
        (args.out / "forwarder_floor.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
