"""Replica processes for the routing tests: start, wait for "backbone serving on", kill.

Every process started here is killed by ``stop_all`` (the tests call it in ``finally``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
READY = b"backbone serving on "


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the replica binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """The environment of a child: this repo and its stubs on the path, few threads."""
    e = dict(os.environ)
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{REPO / 'clients' / 'gen'}"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


class Replica:
    """One replica process (``python -m <module> <args>``) on a fixed port."""

    def __init__(self, args: list[str], port: int) -> None:
        self.args = args
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 180.0) -> None:
        """Start it and wait until it prints that it serves."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *self.args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env(), cwd=REPO)

        async def ready() -> None:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"replica {self.args} exited before serving")
                if line.startswith(READY):
                    return

        await asyncio.wait_for(ready(), timeout_s)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def kill(self) -> None:
        """SIGKILL it and reap it."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            await self.proc.wait()


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
