"""The one perf harness: start a server process, pick a free port, wait until it is ready,
tail its log when it fails, stop it (SIGTERM, then SIGKILL).

Every ``perf/`` script and every test that starts a server process uses it, so a start-up
failure always reads the same way (the process's exit code and the last lines of its log).
A process is ready either when ``grpc.health.v1`` says SERVING (``start_server``,
``start_backbone_server``) or when it prints its ready line on stdout
(``start_announced``, ``start_announced_async``: ``backbone serving on HOST:PORT``, as
``python -m server.main serve`` does). Children get ``child_env()`` and are detached from
the caller's terminal (``start_new_session``: a Ctrl-C on the caller does not reach them;
the caller stops them).
"""

from __future__ import annotations

import asyncio
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
#: What ``python -m server.main serve`` prints on stdout once it serves (then the address).
READY_PREFIX = "backbone serving on "

#: Reads one stdout line; returns the process's ``host:port`` when it is the ready line.
ReadyParser = Callable[[str], "str | None"]


def serving_address(line: str) -> str | None:
    """``HOST:PORT`` from a ``backbone serving on HOST:PORT`` line, else None."""
    return line.split()[-1] if line.startswith(READY_PREFIX) else None


def child_env(extra: Mapping[str, str] | None = None, keep_backbone: bool = False) -> dict[str, str]:
    """The environment of a server child: this process's, without ``BACKBONE_*`` (a child's
    config comes from its flags, not from what the caller exported) unless ``keep_backbone``,
    with the repository and its generated stubs on ``PYTHONPATH``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if keep_backbone or not k.startswith("BACKBONE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "clients" / "gen")])
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    """A server this harness started (or an external one when ``proc`` is None)."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: For an external server: its pid, when known (for RSS sampling).
    external_pid: int | None = None
    #: Seconds from the start of the process until it was ready.
    started_s: float = 0.0

    @property
    def target(self) -> str:
        """``host:port`` to dial."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id (of the process this harness started, or the one given)."""
        return self.proc.pid if self.proc else self.external_pid

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process, if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL it and reap it (SIGCONT first, in case a test stopped it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; no-op for an external server."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()


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


def _log_file(log_path: Path | None) -> IO[bytes] | int:
    if log_path is None:
        return subprocess.DEVNULL
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return log_path.open("ab")


def spawn(
    argv: Sequence[str], log_path: Path | None = None, env: Mapping[str, str] | None = None,
    stdout_pipe: bool = False, **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the repository, detached from the caller's terminal, stderr (and stdout unless
    ``stdout_pipe``) appended to ``log_path`` (or discarded), with ``child_env()``."""
    log = _log_file(log_path)
    try:
        return subprocess.Popen(
            list(argv), cwd=REPO_ROOT, env=dict(env) if env is not None else child_env(),
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log if log_path is not None else subprocess.DEVNULL,
            start_new_session=True, **popen,
        )
    finally:
        if not isinstance(log, int):
            log.close()  # the child holds its own copy


def read_ready_line(
    proc: subprocess.Popen[bytes], timeout_s: float, parse: ReadyParser = serving_address,
    what: str = "the server", log_path: Path | None = None,
) -> str:
    """Read ``proc``'s stdout until ``parse`` accepts a line; returns what it returned.

    Raises RuntimeError (with the log's tail) when the process exits or ``timeout_s`` passes.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            break
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            code = proc.wait(timeout=30)
            raise RuntimeError(f"{what} exited with {code} before it was ready:\n{log_tail(log_path)}")
        found = parse(line.strip())
        if found is not None:
            return found
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f}s:\n{log_tail(log_path)}")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def start_announced(
    argv: Sequence[str], name: str, log_path: Path | None = None,
    env: Mapping[str, str] | None = None, timeout_s: float = 180.0,
    parse: ReadyParser = serving_address,
) -> ServerProcess:
    """Start ``argv`` and wait for its ready line (``backbone serving on HOST:PORT``).

    The process's stdout carries only that line; its stderr goes to ``log_path``.
    """
    began = time.perf_counter()
    proc = spawn(argv, log_path, env, stdout_pipe=True)
    try:
        address = read_ready_line(proc, timeout_s, parse, name, log_path)
    except BaseException:
        ServerProcess(name, "", 0, proc).kill()
        raise
    host, port = _split(address)
    return ServerProcess(name, host, port, proc, log_path, started_s=time.perf_counter() - began)


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


def start_server(
    argv: Sequence[str], name: str, port: int, service: str, startup_timeout_s: float,
    log_path: Path | None = None, host: str = "127.0.0.1", credentials: Any = None,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Start ``argv`` (which listens on ``host:port``) and wait until ``service`` is SERVING."""
    began = time.perf_counter()
    proc = spawn(argv, log_path, env)
    server = ServerProcess(name, host, port, proc, log_path)
    try:
        waited = wait_for_serving(server, service, startup_timeout_s, credentials)
    except BaseException:
        server.stop(grace_s=5)
        raise
    server.started_s = time.perf_counter() - began
    print(f"[bench] {name} pid {proc.pid} SERVING on {server.target} after {waited:.1f}s",
          file=sys.stderr)
    return server


def start_backbone_server(
    command: str, log_dir: Path, service: str, startup_timeout_s: float, host: str = "127.0.0.1",
    name: str = "embedding server", extra_sets: Sequence[str] = (), credentials: Any = None,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Start the backbone server from ``command`` ({python}, {port}) plus one ``--set`` per
    item of ``extra_sets``, and wait for SERVING of ``service``; its output goes to
    ``log_dir``/<name>.log."""
    port = free_port(host)
    argv = shlex.split(command.format(python=shlex.quote(sys.executable), port=port))
    for item in extra_sets:
        argv += ["--set", item]
    log_path = log_dir / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".log")
    return start_server(argv, name, port, service, startup_timeout_s, log_path, host,
                        credentials, env)


def start_echo_server(log_dir: Path, startup_timeout_s: float = 30.0) -> ServerProcess:
    """Start ``python -m perf.echo_server --port 0`` (it prints its port) and wait for SERVING."""
    server = start_announced(
        [sys.executable, "-m", "perf.echo_server", "--port", "0"], "echo server",
        log_dir / "echo_server.log", timeout_s=startup_timeout_s,
        parse=lambda line: f"127.0.0.1:{line}" if line.isdigit() else None,
    )
    try:
        wait_for_serving(server, "", startup_timeout_s)
    except BaseException:
        server.kill()
        raise
    return server


# --- asyncio: the same for tests that run on an event loop ---------------------------------


@dataclass
class AsyncServerProcess:
    """A server process started on the running event loop (``start_announced_async``)."""

    name: str
    address: str
    proc: asyncio.subprocess.Process
    log_path: Path | None = None
    started_s: float = 0.0

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process, if it still runs."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def kill(self) -> None:
        """SIGKILL it and reap it (SIGCONT first, in case a test stopped it)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            await self.proc.wait()

    async def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except asyncio.TimeoutError:
                await self.kill()
        return self.proc.returncode


async def start_announced_async(
    argv: Sequence[str], name: str, log_path: Path | None = None,
    env: Mapping[str, str] | None = None, timeout_s: float = 180.0,
    parse: ReadyParser = serving_address,
) -> AsyncServerProcess:
    """``start_announced`` on the running event loop: start ``argv``, await its ready line."""
    began = time.perf_counter()
    log = _log_file(log_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO_ROOT, env=dict(env) if env is not None else child_env(),
            stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
        )
    finally:
        if not isinstance(log, int):
            log.close()
    server = AsyncServerProcess(name, "", proc, log_path)

    async def ready() -> str:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode(errors="replace")
            if not line:
                code = await proc.wait()
                raise RuntimeError(f"{name} exited with {code} before it was ready:\n"
                                   f"{log_tail(log_path)}")
            found = parse(line.strip())
            if found is not None:
                return found

    try:
        server.address = await asyncio.wait_for(ready(), timeout_s)
    except asyncio.TimeoutError:
        await server.kill()
        raise RuntimeError(f"{name} not ready after {timeout_s:.0f}s:\n{log_tail(log_path)}") from None
    except BaseException:
        await server.kill()
        raise
    server.started_s = time.perf_counter() - began
    return server
