"""Where a service's replicas are: fixed ``host:port`` lists and ``dns:`` targets that
are resolved again every few seconds (a Kubernetes headless Service answers with one A
record per ready pod).

Target syntax is gRPC's: ``dns:///name:port`` uses the system resolver;
``dns://DNS_IP:DNS_PORT/name:port`` asks that DNS server directly (the authority), which
is how tests point the router at a dnslib server on loopback. No grpc imports.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass

from dnslib import QTYPE, DNSRecord

DNS_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Target:
    """One configured upstream: a fixed address, or a name to resolve."""

    text: str
    host: str
    port: int
    dns: bool = False
    #: (ip, port) of the DNS server to ask, for ``dns://ip:port/...``; None: the system's.
    authority: tuple[str, int] | None = None


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {text!r} is not host:port")
    return host.strip("[]"), int(port)


def parse_target(text: str) -> Target:
    """Parse ``host:port``, ``dns:///name:port`` or ``dns://ip:port/name:port``."""
    text = text.strip()
    if text.startswith("dns:"):
        rest = text[len("dns:"):]
        authority = None
        if rest.startswith("//"):
            auth, slash, rest = rest[2:].partition("/")
            if not slash:
                raise ValueError(f"upstream {text!r}: expected dns:///name:port")
            if auth:
                authority = _split_host_port(auth, "DNS server")
        host, port = _split_host_port(rest, "upstream")
        return Target(text, host, port, dns=True, authority=authority)
    host, port = _split_host_port(text, "upstream")
    return Target(text, host, port)


class _Answer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:  # noqa: ANN001 - asyncio API
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def query_a(name: str, server: tuple[str, int], timeout_s: float = DNS_TIMEOUT_S) -> list[str]:
    """The A records of ``name`` from the DNS server at ``server`` (UDP)."""
    loop = asyncio.get_running_loop()
    request = DNSRecord.question(name, "A")
    request.header.id = random.randrange(1 << 16)
    transport, proto = await loop.create_datagram_endpoint(_Answer, remote_addr=server)
    try:
        transport.sendto(request.pack())
        data = await asyncio.wait_for(proto.reply, timeout_s)
    finally:
        transport.close()
    reply = DNSRecord.parse(data)
    if reply.header.id != request.header.id:
        raise OSError(f"DNS reply for {name} has the wrong id")
    return sorted({str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A})


async def resolve(target: Target) -> list[str]:
    """The ``host:port`` addresses ``target`` stands for now (sorted, no duplicates).
    Raises OSError (or TimeoutError) when a name cannot be resolved."""
    if not target.dns:
        return [f"{target.host}:{target.port}"]
    if target.authority is not None:
        ips = await query_a(target.host, target.authority)
    else:
        infos = await asyncio.get_running_loop().getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM)
        ips = sorted({info[4][0] for info in infos})
    return [f"[{ip}]:{target.port}" if ":" in ip else f"{ip}:{target.port}" for ip in ips]
