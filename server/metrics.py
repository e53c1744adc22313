"""Prometheus metrics of the process, served on a separate HTTP port (``/metrics``).

Metric objects live in one registry created on first use, so importing this module
starts nothing and tests can build several servers in one process.
"""

from __future__ import annotations

import time
from functools import cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "backbone_rpcs", "RPCs handled, by method and final status code",
            ["method", "code"], registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "backbone_rpc_seconds", "RPC handling time in seconds, by method",
            ["method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "backbone_batch_size", "Items per executed batch, by hop",
            ["hop"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "backbone_batch_seconds", "Compute time per executed batch, by hop",
            ["hop"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "backbone_queue_depth", "Items waiting in a hop's queue", ["hop"],
            registry=self.registry,
        )


@cache
def get() -> _Metrics:
    """The process's metrics (created on first call)."""
    return _Metrics()


def observe_rpc(method: str, code: str, started: float) -> None:
    """Record one finished RPC that began at ``started`` (perf_counter)."""
    m = get()
    m.rpcs.labels(method, code).inc()
    m.rpc_seconds.labels(method).observe(time.perf_counter() - started)


def observe_batch(hop: str, size: int, compute_s: float) -> None:
    """Record one executed batch."""
    m = get()
    m.batch_size.labels(hop).observe(size)
    m.batch_seconds.labels(hop).observe(compute_s)


def serve_http(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on ``host:port`` (a daemon thread)."""
    start_http_server(port, addr=host, registry=get().registry)
