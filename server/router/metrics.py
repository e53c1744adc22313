"""Prometheus metrics of the router, per replica, in the process registry
(``server.metrics``): attempts by code, attempt latency, in flight, breaker state,
ejections, retries and hedges, and each service's retry budget left."""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter, Gauge, Histogram

from router.attempts import ReplicaSet
from router.breaker import State
from router.endpoints import Endpoint
from server import metrics

BREAKER_VALUE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}


class _RouterMetrics:
    def __init__(self) -> None:
        reg = metrics.get().registry
        labels = ["service", "replica"]
        self.requests = Counter("backbone_router_attempts", "Attempts sent to a replica, by final code",
                                [*labels, "code"], registry=reg)
        self.seconds = Histogram("backbone_router_attempt_seconds", "Attempt latency per replica",
                                 labels, buckets=metrics.LATENCY_BUCKETS, registry=reg)
        self.in_flight = Gauge("backbone_router_in_flight", "Attempts in flight per replica",
                               labels, registry=reg)
        self.breaker = Gauge("backbone_router_breaker_state",
                             "Breaker state per replica (0 closed, 1 half-open, 2 open)",
                             labels, registry=reg)
        self.ejections = Gauge("backbone_router_ejections", "Latency-outlier ejections per replica",
                               labels, registry=reg)
        self.resent = Counter("backbone_router_resent", "Retries and hedges sent, per replica",
                              [*labels, "kind"], registry=reg)
        self.budget = Gauge("backbone_router_retry_budget_left", "Retry budget tokens left",
                            ["service"], registry=reg)


@cache
def get() -> _RouterMetrics:
    """The router's metrics (created on first call)."""
    return _RouterMetrics()


def watch_set(rs: ReplicaSet) -> None:
    """Hook ``rs``'s attempts, retries and budget into the metrics."""
    m = get()
    m.budget.labels(rs.service).set_function(lambda: rs.budget.left)

    children: dict[tuple[str, str], tuple] = {}  # labels() per call costs more than the metric

    def attempt(ep: Endpoint, code: str, elapsed_s: float) -> None:
        key = (ep.address, code)
        pair = children.get(key)
        if pair is None:
            pair = children[key] = (m.requests.labels(ep.service, ep.address, code),
                                    m.seconds.labels(ep.service, ep.address))
        pair[0].inc()
        pair[1].observe(elapsed_s)

    rs.on_attempt = attempt
    rs.on_retry = lambda ep, kind: m.resent.labels(ep.service, ep.address, kind).inc()


def join(ep: Endpoint) -> None:
    """Start reporting a replica's gauges."""
    m = get()
    m.in_flight.labels(ep.service, ep.address).set_function(lambda: ep.in_flight)
    m.breaker.labels(ep.service, ep.address).set_function(lambda: BREAKER_VALUE[ep.breaker.state])
    m.ejections.labels(ep.service, ep.address).set_function(lambda: ep.ejections)


def leave(service: str, address: str) -> None:
    """Stop reporting a replica that left."""
    m = get()
    for gauge in (m.in_flight, m.breaker, m.ejections):
        try:
            gauge.remove(service, address)
        except KeyError:
            pass
