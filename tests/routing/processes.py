"""Replica processes for the routing tests, started through perf/harness.py: start, wait
for "backbone serving on", signal, kill.

Every process started here is killed by ``stop_all`` (the tests call it in ``finally``).
"""

from __future__ import annotations

import asyncio
import os
import sys

from perf.harness import AsyncServerProcess, child_env, free_port, start_announced_async

__all__ = ["Replica", "embedding_hop", "fake", "free_port", "stop_all"]


class Replica:
    """One replica process (``python -m <module> <args>``) on a fixed port."""

    def __init__(self, args: list[str], port: int) -> None:
        self.args = args
        self.port = port
        self.server: AsyncServerProcess | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, known before it starts (the router is told it up front)."""
        return f"127.0.0.1:{self.port}"

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        """The running process, once started."""
        return self.server.proc if self.server is not None else None

    async def start(self, timeout_s: float = 180.0) -> None:
        """Start it and wait until it prints that it serves (few threads: a loaded box)."""
        self.server = await start_announced_async(
            [sys.executable, *self.args], f"replica {self.args}",
            env=child_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                          keep_backbone=True), timeout_s=timeout_s,
        )

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process."""
        if self.server is not None:
            self.server.signal(sig)

    async def kill(self) -> None:
        """SIGKILL it and reap it."""
        if self.server is not None:
            await self.server.kill()


def embedding_hop(port: int) -> Replica:
    """The real embedding hop (``backbone serve embedding``)."""
    # No queue-wait bound: the test is about death, not about a loaded box's admission.
    return Replica(["-m", "server.main", "serve", "embedding", "--port", str(port),
                    "--set", "server.metrics_port=0", "--set", "server.log_level=WARNING",
                    "--set", "embedding.max_queue_delay_ms=0"], port)


def fake(port: int, delay_ms: float = 0.0) -> Replica:
    """A fake replica process (tests/routing/fake_replica.py)."""
    return Replica(["-m", "tests.routing.fake_replica", "--port", str(port),
                    "--delay-ms", str(delay_ms)], port)


async def stop_all(replicas: list[Replica]) -> None:
    """Kill every replica process."""
    for r in replicas:
        await r.kill()
