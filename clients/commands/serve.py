"""``backbone serve``: run the server (the embedded default when no service is named)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve", help="run the server: every hop in one process, or the named ones"
    )
    from server.main import add_serve_arguments, serve

    add_serve_arguments(parser)
    parser.set_defaults(func=serve)
