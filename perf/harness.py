"""The one perf harness: start a server process, pick a free port, wait until it reports
SERVING over grpc.health.v1, tail its log when it fails, stop it (SIGTERM, then SIGKILL).

Every ``perf/`` script and every test that starts a server process uses it, so a start-up
failure always reads the same way (the process's exit code and the last lines of its log).
"""

from __future__ import annotations

import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

@dataclass
class ServerProcess:
    """A server this bench started (or an external one when ``proc`` is None)."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: For an external server: its pid, when known (for RSS sampling).
    external_pid: int | None = None

    @property
    def target(self) -> str:
        """``host:port`` to dial."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id (of the process this bench started, or the one given)."""
        return self.proc.pid if self.proc else self.external_pid

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; no-op for an external server."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path | None, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for_serving(
    server: ServerProcess, service: str, timeout_s: float, credentials: Any = None
) -> float:
    """Poll ``grpc.health.v1`` until ``service`` is SERVING; returns seconds waited.

    ``credentials`` (``grpc.ChannelCredentials``) dials a TLS server; None: plaintext.
    Raises RuntimeError when the process exits first or ``timeout_s`` passes.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.monotonic()
    last = "no answer yet"
    if credentials is None:
        dial = grpc.insecure_channel(server.target)
    else:
        dial = grpc.secure_channel(server.target, credentials)
    with dial as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while (waited := time.monotonic() - started) < timeout_s:
            if server.proc is not None and server.proc.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited with {server.proc.returncode} before SERVING:\n"
                    f"{log_tail(server.log_path)}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return waited
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                last = error.code().name
            time.sleep(0.5)
    raise RuntimeError(f"{server.name} not SERVING after {timeout_s:.0f}s (last: {last})")


def start_echo_server(log_dir: Path, startup_timeout_s: float = 30.0) -> ServerProcess:
    """Start ``python -m perf.echo_server --port 0`` and wait until it is SERVING."""
    log_path = log_dir / "echo_server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "perf.echo_server", "--port", "0"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # a Ctrl-C on the bench does not hit it; we stop it
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], startup_timeout_s)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"echo server printed {line!r} instead of its port:\n{log_tail(log_path)}")
    server = ServerProcess("echo server", "127.0.0.1", int(line), proc, log_path)
    wait_for_serving(server, "", startup_timeout_s)
    return server


def start_backbone_server(
    command: str, log_dir: Path, service: str, startup_timeout_s: float, host: str = "127.0.0.1",
    name: str = "embedding server",
) -> ServerProcess:
    """Start the backbone server from ``command`` ({python}, {port}) and wait for SERVING
    of ``service``; its output goes to ``log_dir``/<name>.log."""
    port = free_port(host)
    argv = shlex.split(command.format(python=shlex.quote(sys.executable), port=port))
    log_path = log_dir / (name.replace(" ", "_") + ".log")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = ServerProcess(name, host, port, proc, log_path)
    try:
        waited = wait_for_serving(server, service, startup_timeout_s)
    except BaseException:
        server.stop(grace_s=5)
        raise
    print(f"[bench] {name} pid {proc.pid} SERVING on {server.target} after {waited:.1f}s", file=sys.stderr)
    return server
