"""perf/harness.py itself: ready lines, start-up failures, timeouts, both flavours, the env."""

from __future__ import annotations

import signal
import sys

import pytest

from perf.harness import child_env, start_announced, start_announced_async

# A stand-in server: says where it serves, then waits to be signalled.
ANNOUNCES = "import time; print('backbone serving on 127.0.0.1:4242', flush=True); time.sleep(120)"
DIES = "import sys; print('bad config: no such key', file=sys.stderr); sys.exit(3)"
SILENT = "import time; time.sleep(120)"


def test_a_process_is_ready_at_its_serving_line_and_stops_on_sigterm(tmp_path) -> None:
    server = start_announced([sys.executable, "-c", ANNOUNCES], "stand-in", tmp_path / "s.log")
    assert (server.host, server.port, server.target) == ("127.0.0.1", 4242, "127.0.0.1:4242")
    assert server.started_s > 0 and server.proc.poll() is None
    server.stop(grace_s=10)
    assert server.proc.returncode == -signal.SIGTERM


def test_a_process_that_exits_first_is_reported_with_its_code_and_log(tmp_path) -> None:
    with pytest.raises(RuntimeError, match=r"exited with 3 .*\n.*bad config: no such key"):
        start_announced([sys.executable, "-c", DIES], "stand-in", tmp_path / "s.log")


def test_a_process_that_never_gets_ready_is_killed_after_the_timeout(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="not ready after"):
        start_announced([sys.executable, "-c", SILENT], "stand-in", timeout_s=0.5)


async def test_the_asyncio_flavour_reads_the_same_line_and_reports_the_same_failure(tmp_path) -> None:
    server = await start_announced_async([sys.executable, "-c", ANNOUNCES], "stand-in")
    assert server.address == "127.0.0.1:4242" and server.proc.returncode is None
    assert await server.stop(grace_s=10) == -signal.SIGTERM
    with pytest.raises(RuntimeError, match=r"exited with 3 .*\n.*bad config"):
        await start_announced_async([sys.executable, "-c", DIES], "stand-in", tmp_path / "d.log")
    with pytest.raises(RuntimeError, match="not ready after"):
        await start_announced_async([sys.executable, "-c", SILENT], "stand-in", timeout_s=0.5)


def test_a_child_gets_no_backbone_settings_from_the_caller_but_the_repo_on_its_path(monkeypatch) -> None:
    monkeypatch.setenv("BACKBONE_SERVER__PORT", "1")
    monkeypatch.setenv("OTHER_SETTING", "kept")
    env = child_env({"EXTRA": "x"})
    assert "BACKBONE_SERVER__PORT" not in env and env["OTHER_SETTING"] == "kept"
    assert env["EXTRA"] == "x" and "clients" in env["PYTHONPATH"]
    assert child_env(keep_backbone=True)["BACKBONE_SERVER__PORT"] == "1"
