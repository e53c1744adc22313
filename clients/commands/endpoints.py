"""``backbone endpoints``: the router's replicas as a table (health, breaker, in
flight, latency, calls, failures, ejections)."""

from __future__ import annotations

import argparse

from clients.commands._common import EXIT_OK, add_client_options, handles_errors, open_client
from clients.router import SHORT_SERVICE, EndpointInfo, RouterClient

COLUMNS = ("SERVICE", "ADDRESS", "HEALTH", "BREAKER", "IN-FLIGHT", "EWMA", "P99",
           "CALLS", "FAILED", "EJECTIONS", "QUEUE", "WEIGHT")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``endpoints`` subcommand."""
    parser = subparsers.add_parser(
        "endpoints", help="list the router's replicas: health, breaker, latency, calls",
        description="Print every replica a router balances over (RouterService."
                    "ListEndpoints). EWMA is per unit of work (text, passage, search).")
    parser.add_argument("--service", default="",
                        help="only this service (embedding, search, rerank, generation)")
    add_client_options(parser)
    parser.set_defaults(func=handles_errors(run))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}ms" if seconds else "-"


def rows(endpoints: list[EndpointInfo]) -> list[tuple[str, ...]]:
    """Table rows of the endpoints."""
    return [(
        SHORT_SERVICE.get(e.service, e.service), e.address, e.health,
        e.breaker + (" EJECTED" if e.ejected else ""), str(e.in_flight), _ms(e.latency_ewma_s),
        _ms(e.latency_p99_s), str(e.calls), str(e.failures), str(e.ejections),
        _ms(e.reported_queue_wait_s), f"{e.weight:.2f}" if e.weight else "-",
    ) for e in endpoints]


def run(args: argparse.Namespace) -> int:
    """Call ListEndpoints and print the table."""
    with open_client(args) as client:
        endpoints = RouterClient(client.channel, client.options).list_endpoints(args.service)
    table = [COLUMNS, *rows(endpoints)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return EXIT_OK
