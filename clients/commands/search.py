"""``backbone search "query" --collection NAME``: print the hits of a text search."""

from __future__ import annotations

import argparse
import json
from typing import Any

from clients.commands._common import (
    UsageError,
    add_client_options,
    handles_errors,
    non_negative_int,
    open_client,
    positive_int,
)
from clients.search_messages import SEARCH_MODES, Condition, Eq, Hit, In, Range

SNIPPET_CHARS = 100


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``search`` subcommand."""
    parser = subparsers.add_parser(
        "search",
        help="search a collection by text",
        description="Search a collection by text: dense (embedding), keyword (BM25) or "
        "hybrid (both, fused with Reciprocal Rank Fusion).",
    )
    parser.add_argument("query", help="the query text")
    parser.add_argument("--collection", required=True, help="collection name")
    parser.add_argument("--top-k", type=positive_int, default=10, metavar="K")
    parser.add_argument("--mode", choices=sorted(SEARCH_MODES), default="dense")
    parser.add_argument(
        "--eq", action="append", default=[], metavar="FIELD=VALUE",
        help="metadata filter: field equals value (JSON or plain string); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--in", dest="in_", action="append", default=[], metavar="FIELD=V1,V2",
        help="metadata filter: field is one of the values; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--range", action="append", default=[], metavar="FIELD=LO:HI",
        help="metadata filter: LO <= field <= HI (either side may be empty); repeatable",
    )  # fmt: skip
    parser.add_argument("--ef-search", type=non_negative_int, default=0, metavar="N")
    parser.add_argument("--nprobe", type=non_negative_int, default=0, metavar="N")
    parser.add_argument("--json", action="store_true", help="one JSON object per hit")
    add_client_options(parser)
    parser.set_defaults(func=handles_errors(run))


def parse_value(text: str) -> Any:
    """A filter value: JSON when it parses as a scalar, else the plain string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (str, int, float, bool)) else text


def _split(spec: str, flag: str) -> tuple[str, str]:
    field, sep, rest = spec.partition("=")
    if not sep or not field:
        raise UsageError(f"{flag} wants FIELD=..., got {spec!r}")
    return field, rest


def build_filter(args: argparse.Namespace) -> list[Condition]:
    """The filter conditions of the --eq/--in/--range flags."""
    conditions: list[Condition] = []
    for spec in args.eq:
        field, value = _split(spec, "--eq")
        conditions.append(Eq(field, parse_value(value)))
    for spec in args.in_:
        field, values = _split(spec, "--in")
        conditions.append(In(field, [parse_value(v) for v in values.split(",")]))
    for spec in args.range:
        field, bounds = _split(spec, "--range")
        low, sep, high = bounds.partition(":")
        if not sep:
            raise UsageError(f"--range wants FIELD=LO:HI, got {spec!r}")
        if not low and not high:
            raise UsageError(f"--range needs at least one bound, got {spec!r}")
        try:
            conditions.append(Range(
                field, gte=float(low) if low else None, lte=float(high) if high else None
            ))
        except ValueError:
            raise UsageError(f"--range bounds must be numbers, got {spec!r}") from None
    return conditions


def format_hit(rank: int, hit: Hit) -> str:
    """One line: rank, score, id and the start of the text."""
    text = " ".join(hit.text.split())
    if len(text) > SNIPPET_CHARS:
        text = text[: SNIPPET_CHARS - 3] + "..."
    return f"{rank:>3}  {hit.score:>9.4f}  {hit.id}  {text}"


def run(args: argparse.Namespace) -> int:
    """Run the search and print the hits, best first."""
    conditions = build_filter(args)
    with open_client(args) as client:
        response = client.search.search(
            args.collection, text=args.query, top_k=args.top_k, mode=args.mode,
            filter=conditions, ef_search=args.ef_search, nprobe=args.nprobe,
            with_payload=True,
        )
    for rank, hit in enumerate(response.hits, start=1):
        if args.json:
            print(json.dumps({
                "rank": rank, "id": hit.id, "score": hit.score, "text": hit.text,
                "metadata": dict(hit.metadata),
            }))  # fmt: skip
        else:
            print(format_hit(rank, hit))
    if not response.hits and not args.json:
        print("no hits")
    return 0
