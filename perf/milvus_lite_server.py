"""A milvus-lite server as its own process on loopback, for the tests and perf scripts.

milvus-lite 3.x is a pure-Python engine with a Milvus-protocol gRPC server
(``python -m milvus_lite server``); pymilvus talks to it exactly as to Milvus
Standalone / Distributed. Its ``--port 0`` does not report the port it bound, so a free
port is picked here first (perf/harness.py's ``free_port``; the tiny race with another
process taking it in between surfaces as a start timeout). The process is started and
stopped by the harness; only the readiness probe is Milvus's own (it has no gRPC health).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from perf.harness import ServerProcess, free_port, log_tail, spawn

START_TIMEOUT_S = 60.0


def wait_ready(
    uri: str, proc: subprocess.Popen, timeout_s: float = START_TIMEOUT_S, log_path: Path | None = None
) -> None:
    """Return once ``uri`` answers a Milvus call; raise if the process died or time ran out."""
    from pymilvus import MilvusClient

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-lite exited with {proc.returncode} before serving:\n"
                               f"{log_tail(log_path)}")
        try:
            client = MilvusClient(uri=uri, timeout=2)
            client.list_collections()
            client.close()
            return
        except Exception:  # not listening yet: pymilvus raises several kinds here
            if time.monotonic() > deadline:
                raise RuntimeError(f"milvus-lite at {uri} did not answer in {timeout_s:.0f} s")
            time.sleep(0.2)


@contextlib.contextmanager
def milvus_lite(data_dir: str | Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``python -m milvus_lite server`` on ``data_dir``; yields its ``http://`` URI.

    Its output goes to ``milvus_lite.log`` beside ``data_dir``."""
    port = free_port(host)
    log_path = Path(data_dir).parent / "milvus_lite.log"
    proc = spawn([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
                  "--host", host, "--port", str(port)], log_path)
    server = ServerProcess("milvus-lite", host, port, proc, log_path)
    uri = f"http://{host}:{port}"
    try:
        wait_ready(uri, proc, log_path=log_path)
        yield uri
    finally:
        server.stop(grace_s=10)
