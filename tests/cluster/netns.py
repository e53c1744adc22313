"""Hosts on one box for multi-host tests: network namespaces joined by veth pairs to a
bridge this module creates, each with its own address, plus a DNS server (dnslib) on
the bridge answering a changing set of A records.

Only objects this module created are touched: names carry the creating process's pid,
the subnet is ``10.201.<octet>.0/24`` with the octet derived from it, and ``close``
removes the namespaces, links and bridge again. Needs root and ``ip`` (iproute2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip()}"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class Host:
    """One namespace with one address on the test bridge."""

    name: str
    address: str
    veth_host: str

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside this host's namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)

    def link(self, up: bool) -> None:
        """Take this host's link down (or up again): it drops off the network."""
        _ip("link", "set", self.veth_host, "up" if up else "down")


@dataclass
class TestNetwork:
    """A bridge with the host side at ``.1`` and namespaces at ``.10``, ``.11``, ..."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    hosts: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.octet = 10 + os.getpid() % 200
        self.bridge = f"bbt{self.tag}"
        self.gateway = f"10.201.{self.octet}.1"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self) -> Host:
        """A new namespace on the bridge, its loopback and link up."""
        i = len(self.hosts)
        name = f"bbt{self.tag}-{i}"
        outside, inside = f"bbt{self.tag}h{i}", f"bbt{self.tag}n{i}"
        address = f"10.201.{self.octet}.{10 + i}"
        _ip("netns", "add", name)
        host = Host(name, address, outside)
        self.hosts.append(host)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", name)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", name, "link", "set", inside, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Remove every namespace, veth and the bridge this network made."""
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.veth_host], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self.hosts.clear()


class DnsServer:
    """A dnslib server answering A records for names set with :meth:`set` (TTL 1 s)."""

    def __init__(self, address: str, port: int = 53) -> None:
        """Listen on ``address:port`` (UDP) once :meth:`start` runs."""
        from dnslib import QTYPE, RR, A
        from dnslib.server import BaseResolver, DNSServer

        records: dict[str, list[str]] = {}
        lock = threading.Lock()

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                name = str(request.q.qname).rstrip(".")
                if request.q.qtype in (QTYPE.A, QTYPE.ANY):
                    with lock:
                        current = list(records.get(name, ()))
                    for ip in current:
                        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=1))
                return reply

        self._records, self._lock = records, lock
        self.address, self.port = address, port
        self._server = DNSServer(Resolver(), port=port, address=address)

    def set(self, name: str, addresses: Sequence[str]) -> None:
        """Answer ``name`` with exactly ``addresses`` from now on."""
        with self._lock:
            self._records[name] = list(addresses)

    def start(self) -> None:
        """Serve in a background thread."""
        self._server.start_thread()

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()
