"""Prometheus metrics of the process, served on a separate HTTP port (``/metrics``).

Metric objects live in one registry created on first use, so importing this module
starts nothing and tests can build several servers in one process. The names (README,
"Metrics") are:

* ``backbone_rpcs_total{method,code}``, ``backbone_rpc_seconds{method}``: every RPC served;
* ``backbone_batch_size{hop}``, ``backbone_batch_seconds{hop}``: executed batches;
* ``backbone_queue_depth{hop}``: items waiting in a hop's queue (embed, rerank: the
  batcher; generate: requests admitted beyond the engine's running slots);
* ``backbone_upstream_requests_total{hop,code}``, ``backbone_upstream_seconds{hop}``,
  ``backbone_upstream_queue_seconds{hop}``: calls one hop makes to another (the pipeline
  to embed / search / rerank / generate, search to embed), as the caller saw them, and
  the queue time the called hop reported;
* ``backbone_pipeline_degradations_total{step}``: deadline-budget steps taken;
* ``backbone_cache_lookups_total{result}`` (exact_hit, semantic_hit, miss,
  guard_rejection), ``backbone_cache_evictions_total``, ``backbone_cache_entries``,
  ``backbone_cache_bytes``: the pipeline's semantic answer cache.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        self.upstream_requests = Counter(
            "backbone_upstream_requests", "Calls to another hop, by hop and final code",
            ["hop", "code"], registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "backbone_upstream_seconds", "Latency of calls to another hop as the caller saw it",
            ["hop"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.upstream_queue_seconds = Histogram(
            "backbone_upstream_queue_seconds", "Queue time the called hop reported",
            ["hop"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.degradations = Counter(
            "backbone_pipeline_degradations", "Pipeline degradation steps taken, by step",
            ["step"], registry=self.registry,
        )
        self.caches = _CacheCollector()
        self.registry.register(self.caches)


class _CacheCollector:
    """The semantic caches of this process (usually one), read at scrape time."""

    def __init__(self) -> None:
        self._caches: weakref.WeakSet = weakref.WeakSet()

    def add(self, semantic_cache: Any) -> None:
        self._caches.add(semantic_cache)

    def describe(self) -> list:
        return []

    def collect(self):
        caches = list(self._caches)
        lookups = CounterMetricFamily(
            "backbone_cache_lookups", "Semantic cache lookups by result", labels=["result"]
        )
        for result, attr in (("exact_hit", "exact_hits"), ("semantic_hit", "semantic_hits"),
                             ("miss", "misses"), ("guard_rejection", "guard_rejections")):
            lookups.add_metric([result], sum(getattr(c.stats, attr) for c in caches))
        yield lookups
        yield CounterMetricFamily(
            "backbone_cache_evictions", "Entries evicted to stay within the bounds",
            value=sum(c.stats.evictions for c in caches),
        )
        yield GaugeMetricFamily("backbone_cache_entries", "Entries held",
                                value=sum(len(c) for c in caches))
        yield GaugeMetricFamily("backbone_cache_bytes", "Approximate bytes held",
                                value=sum(c.bytes for c in caches))


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


def watch_queue(hop: str, depth: Callable[[], float]) -> None:
    """Report ``depth()`` as ``hop``'s queue depth at every scrape."""
    get().queue_depth.labels(hop).set_function(depth)


def watch_cache(semantic_cache: Any) -> None:
    """Export a ``router.semantic_cache.SemanticCache``'s counters and size."""
    get().caches.add(semantic_cache)


def observe_upstream(hop: str, code: str, seconds: float, queue_s: float | None = None) -> None:
    """Record one call to another hop (``queue_s``: the queue time it reported)."""
    m = get()
    m.upstream_requests.labels(hop, code).inc()
    m.upstream_seconds.labels(hop).observe(seconds)
    if queue_s is not None:
        m.upstream_queue_seconds.labels(hop).observe(queue_s)


def observe_degradations(steps: list[str]) -> None:
    """Count the pipeline's degradation steps by their name (before the ``:``)."""
    m = get()
    for step in steps:
        m.degradations.labels(step.partition(":")[0]).inc()


def serve_http(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on ``host:port`` (a daemon thread)."""
    start_http_server(port, addr=host, registry=get().registry)
