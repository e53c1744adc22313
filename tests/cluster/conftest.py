"""Fixtures of the multi-host tests: a test network of namespaces, fake hops in them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from perf.harness import REPO_ROOT, child_env, read_ready_line
from tests.cluster.netns import DnsServer, Host, TestNetwork, unavailable_reason

HOP_PORT = 50051


@pytest.fixture
def network():
    """A fresh test network (skipped with the reason where namespaces cannot be made)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    net = TestNetwork()
    try:
        yield net
    finally:
        net.close()


def start_fake_hop(host: Host, replica: int) -> subprocess.Popen:
    """The fake embedding hop on ``host:50051`` (inside the host's namespace, so started with
    ``ip netns exec``, not the harness's spawn); returns once it prints "serving"."""
    proc = host.popen(
        [sys.executable, "-m", "tests.cluster.fake_hop", host.address, str(HOP_PORT), str(replica)],
        cwd=REPO_ROOT, env=child_env(keep_backbone=True), stdout=subprocess.PIPE,
    )
    try:
        read_ready_line(proc, 60, lambda line: line if line == "serving" else None,
                        f"fake hop on {host.address}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


@pytest.fixture
def dns(network):
    """A DNS server on the test network's gateway address (port 53)."""
    server = DnsServer(network.gateway, 53)
    server.start()
    try:
        yield server
    finally:
        server.stop()
