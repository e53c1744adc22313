"""What every client command shares: connection flags, the client, error handling.

Exit codes, the same for every command: 0 success, 1 the call failed (one line on
stderr: status, reason, message), 2 a bad command line.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

from clients.channel import DEFAULT_ADDRESS, ClientOptions
from clients.client import Client
from clients.errors import BackboneRpcError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad command line found after parsing (e.g. an unreadable TLS file); exit 2."""


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Add the connection flags; BACKBONE_ADDRESS / BACKBONE_TOKEN are read now."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=os.environ.get("BACKBONE_ADDRESS") or DEFAULT_ADDRESS,
        help="server host:port or gRPC target (env BACKBONE_ADDRESS; default %(default)s)",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("BACKBONE_TOKEN", ""),
        help="bearer token (env BACKBONE_TOKEN)",
    )
    group.add_argument("--tls", action="store_true", help="use TLS with the system CAs")
    group.add_argument("--tls-ca", default="", metavar="PEM", help="CA bundle (implies TLS)")
    group.add_argument("--tls-cert", default="", metavar="PEM", help="client cert (mTLS)")
    group.add_argument("--tls-key", default="", metavar="PEM", help="client key (mTLS)")
    group.add_argument(
        "--tls-server-name", default="", metavar="NAME", help="expected server cert name"
    )
    group.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="deadline of each call (default: 10 s)",
    )


def client_options(args: argparse.Namespace) -> ClientOptions:
    """ClientOptions from the parsed connection flags."""
    timeout = {} if args.timeout is None else {"timeout": args.timeout}
    try:
        return ClientOptions(
            address=args.address,
            token=args.token,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            **timeout,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def open_client(args: argparse.Namespace) -> Client:
    """A sync Client from the parsed connection flags; the caller closes it."""
    options = client_options(args)
    try:
        return Client(options)
    except OSError as error:  # a TLS file that cannot be read
        raise UsageError(f"{error.filename}: {error.strerror}") from None


def handles_errors(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: a failed call prints one line and exits 1; a usage error exits 2."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        name = f"backbone {getattr(args, 'command', '')}".rstrip()
        try:
            return command(args)
        except BackboneRpcError as error:
            details = "".join(f" {k}={v}" for k, v in sorted(error.metadata.items()))
            print(f"{name}: {error}{details}", file=sys.stderr)
            return EXIT_FAILED
        except UsageError as error:
            print(f"{name}: {error}", file=sys.stderr)
            return EXIT_USAGE

    return run


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return value
