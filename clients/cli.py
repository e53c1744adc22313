"""The ``backbone`` command: one subcommand per module in ``clients.commands``.

Each command module exposes ``add_parser(subparsers)``, which adds its subparser and sets
``func`` (called with the parsed args; its return value is the exit code). Modules are
imported only for the command being run, so ``backbone embed`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under clients.commands
COMMANDS: dict[str, str] = {
    "serve": "serve",
    "health": "health",
    "embed": "embed",
    "search": "search",
    "ingest": "ingest",
    "rerank": "rerank",
    "generate": "generate",
    "ask": "ask",
    "endpoints": "endpoints",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that command's subparser is built."""
    parser = argparse.ArgumentParser(
        prog="backbone", description="gRPC inference backbone: serve it, or call it."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"see 'backbone {name} --help'")
            continue
        importlib.import_module(f"clients.commands.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``backbone`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    only = wanted if wanted in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    if only is None:  # e.g. --help
        return 2
    code = args.func(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
