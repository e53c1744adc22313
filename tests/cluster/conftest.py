"""Fixtures of the multi-host tests: a test network of namespaces, fake hops in them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.netns import DnsServer, Host, TestNetwork, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
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
    """The fake embedding hop on ``host:50051``; returns once it serves."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'clients' / 'gen'}")
    proc = host.popen(
        [sys.executable, "-m", "tests.cluster.fake_hop", host.address, str(HOP_PORT), str(replica)],
        cwd=REPO, env=env, stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if line.strip() != "serving":
        proc.kill()
        raise RuntimeError(f"fake hop on {host.address} did not start")
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
