"""``backbone embed TEXT...``: one line per text, the vector as a JSON list (default)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

import numpy as np

from clients.commands._common import (
    add_client_options,
    handles_errors,
    non_negative_int,
    open_client,
    positive_int,
)

SHORT_VALUES = 4  # components shown by --format short


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``embed`` subcommand."""
    parser = subparsers.add_parser(
        "embed",
        help="embed texts, one vector per line",
        description='Embed texts; "-" reads one text per line from stdin.',
    )
    parser.add_argument("texts", nargs="+", metavar="TEXT", help='a text, or "-" for stdin')
    parser.add_argument("--normalize", action="store_true", help="unit L2 norm vectors")
    parser.add_argument(
        "--dimensions", type=non_negative_int, default=0, metavar="N",
        help="keep the first N components (0: the model's dimension)",
    )
    parser.add_argument("--truncation", choices=("truncate", "reject"), default=None)
    parser.add_argument("--model", default="", help="embedding model (default: server's)")
    parser.add_argument(
        "--format", choices=("json", "short"), default="json",
        help="json: the vector; short: dimension and first values",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, metavar="N",
        help="texts per request (default %(default)s)",
    )
    add_client_options(parser)
    parser.set_defaults(func=handles_errors(run))


def read_texts(args: list[str]) -> list[str]:
    """The texts: each argument, with "-" replaced by stdin's lines."""
    texts: list[str] = []
    for arg in args:
        texts.extend(sys.stdin.read().splitlines() if arg == "-" else [arg])
    return texts


def format_vector(vector: np.ndarray, fmt: str) -> str:
    """One output line for a vector."""
    if fmt == "short":
        head = ", ".join(f"{v:.4f}" for v in vector[:SHORT_VALUES])
        more = ", ..." if len(vector) > SHORT_VALUES else ""
        return f"{len(vector)} [{head}{more}]"
    return json.dumps(vector.tolist())


def batched(items: list[str], size: int) -> Iterator[list[str]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run(args: argparse.Namespace) -> int:
    """Embed the texts and print one line per text, in order."""
    texts = read_texts(args.texts)
    with open_client(args) as client:
        for batch in batched(texts, args.batch_size):
            result = client.embedding.embed(
                batch,
                normalize=args.normalize,
                dimensions=args.dimensions,
                truncation=args.truncation,
                model=args.model,
            )
            for vector in result.vectors:
                print(format_vector(vector, args.format))
    return 0
