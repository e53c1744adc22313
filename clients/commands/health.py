"""``backbone health``: the serving status of the process and of each backbone service.

Exit 0 only when healthy: without ``--service``, the process ("", shown as "(server)")
and every service it hosts are SERVING (services it does not host print SERVICE_UNKNOWN
and are ignored); with ``--service``, every named service is SERVING.
"""

from __future__ import annotations

import argparse

from clients.commands._common import (
    EXIT_FAILED,
    EXIT_OK,
    add_client_options,
    handles_errors,
    open_client,
)
from clients.health import ALL_SERVICES, SERVING, is_healthy

DESCRIPTION = (
    "Print the serving status of the server and of each backbone service. Exit 0 only "
    "when the server and every service it hosts are SERVING (services it does not host "
    "show SERVICE_UNKNOWN and are ignored); with --service, when every named one is."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``health`` subcommand."""
    parser = subparsers.add_parser(
        "health",
        help="print SERVING/NOT_SERVING per service; exit 0 only when serving",
        description=DESCRIPTION,
    )
    parser.add_argument(
        "--service",
        action="append",
        metavar="NAME",
        help='a service to check ("" for the whole process); repeatable; default: all',
    )
    add_client_options(parser)
    parser.set_defaults(func=handles_errors(run))


def run(args: argparse.Namespace) -> int:
    """Check, print one line per service, and exit by the result."""
    services = args.service if args.service is not None else ALL_SERVICES
    with open_client(args) as client:
        statuses = client.health.check_all(services)
    width = max(len(name or "(server)") for name in statuses)
    for name, status in statuses.items():
        print(f"{name or '(server)':<{width}}  {status}")
    if args.service is not None:
        healthy = all(status == SERVING for status in statuses.values())
    else:
        healthy = is_healthy(statuses)
    return EXIT_OK if healthy else EXIT_FAILED
