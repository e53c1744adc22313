"""``backbone rerank QUERY DOC...``: the documents best first, one line each.

Each line is ``rank<TAB>score<TAB>index<TAB>document`` (``--format text``, default) or one
JSON object (``--format json``). A document marked ``*`` was cut to the model's window.
"""

from __future__ import annotations

import argparse
import json
import sys

from clients.commands._common import add_client_options, handles_errors, non_negative_int, open_client
from clients.rerank import Ranked


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rerank`` subcommand."""
    parser = subparsers.add_parser(
        "rerank",
        help="rerank documents for a query, best first",
        description='Rerank documents for a query; a document "-" reads one document per '
        "line from stdin.",
    )
    parser.add_argument("query", help="the query")
    parser.add_argument("documents", nargs="+", metavar="DOC", help='a document, or "-" for stdin')
    parser.add_argument(
        "--top-n", type=non_negative_int, default=0, metavar="N",
        help="print only the N best (default: all)",
    )
    parser.add_argument("--truncation", choices=("truncate", "reject"), default=None)
    parser.add_argument("--model", default="", help="reranker (default: the server's)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_client_options(parser)
    parser.set_defaults(func=handles_errors(run))


def read_documents(args: list[str]) -> list[str]:
    """The documents: each argument, with "-" replaced by stdin's lines."""
    documents: list[str] = []
    for arg in args:
        documents.extend(sys.stdin.read().splitlines() if arg == "-" else [arg])
    return documents


def format_result(rank: int, result: Ranked, fmt: str) -> str:
    """One output line for a result."""
    if fmt == "json":
        return json.dumps(
            {
                "rank": rank,
                "index": result.index,
                "score": result.score,
                "truncated": result.truncated,
                "document": result.document,
            }
        )
    mark = "*" if result.truncated else ""
    return f"{rank}\t{result.score:.4f}\t{result.index}\t{result.document}{mark}"


def run(args: argparse.Namespace) -> int:
    """Rerank and print the results, best first."""
    documents = read_documents(args.documents)
    with open_client(args) as client:
        response = client.rerank.rerank(
            args.query, documents, top_n=args.top_n, return_documents=True,
            model=args.model, truncation=args.truncation,
        )
    for rank, result in enumerate(response.results, start=1):
        print(format_result(rank, result, args.format))
    return 0
