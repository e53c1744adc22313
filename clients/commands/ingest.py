"""``backbone ingest PATH --collection NAME``: send documents to the server's Ingest RPC.

PATH is a text/markdown file (one document, id = its path), a JSONL file (one document
per line: ``_id``/``id``, ``text``, optional ``title`` and ``metadata``) or a directory
(every ``*.txt``, ``*.md``, ``*.markdown`` and ``*.jsonl`` below it). The server chunks in
token windows, embeds and upserts durably; each call of at most ``--docs-per-call``
documents is acknowledged before the progress bar moves.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clients.commands._common import (
    UsageError,
    add_client_options,
    handles_errors,
    non_negative_int,
    open_client,
    positive_int,
)
from clients.client import Client
from clients.errors import AlreadyExistsError
from clients.search_messages import INDEX_KINDS, Document

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
#: Command-line metric name -> the client's.
METRICS = {"cosine": "cosine", "ip": "inner_product", "l2": "l2"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` subcommand."""
    parser = subparsers.add_parser(
        "ingest",
        help="chunk, embed and store documents in a collection",
        description="Ingest text/markdown files or JSONL documents into a collection.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="file or directory")
    parser.add_argument("--collection", required=True, help="collection name")
    parser.add_argument(
        "--create", action="store_true",
        help="create the collection first if it does not exist",
    )  # fmt: skip
    parser.add_argument("--dimension", type=positive_int, default=384, help="for --create")
    parser.add_argument("--metric", choices=sorted(METRICS), default="cosine")
    parser.add_argument("--index-kind", choices=sorted(INDEX_KINDS), default="hnsw")
    parser.add_argument(
        "--chunk-tokens", type=non_negative_int, default=0, metavar="N",
        help="window size in tokens (0: server default 512, capped at the model's limit)",
    )  # fmt: skip
    parser.add_argument(
        "--overlap-tokens", type=non_negative_int, default=0, metavar="N",
        help="tokens shared by consecutive windows (0: server default 50)",
    )  # fmt: skip
    parser.add_argument(
        "--docs-per-call", type=positive_int, default=256, metavar="N",
        help="documents per Ingest call (progress moves per acknowledged call)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_client_options(parser)
    parser.set_defaults(func=handles_errors(run))


def iter_files(paths: list[str]) -> list[Path]:
    """The files named, directories expanded (sorted), each at most once."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl"))
            )
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{name}: no such file or directory")
    return list(dict.fromkeys(files))


def count_documents(files: list[Path]) -> int:
    """Documents the files hold (JSONL: non-empty lines)."""
    total = 0
    for path in files:
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                total += sum(1 for line in fh if line.strip())
        else:
            total += 1
    return total


def read_documents(files: list[Path]) -> Iterator[Document]:
    """Every document of the files, in order."""
    for path in files:
        if path.suffix.lower() != ".jsonl":
            yield Document(id=str(path), text=path.read_text(encoding="utf-8"))
            continue
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    yield document_from_json(line, f"{path}:{number}")


def document_from_json(line: str, where: str) -> Document:
    """A Document from one JSONL line (BEIR style: ``_id``, ``title``, ``text``)."""
    try:
        obj: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise UsageError(f"{where}: a document needs a string field 'text'")
    text = obj["text"]
    if obj.get("title"):
        text = f"{obj['title']}\n{text}"
    metadata = obj.get("metadata")
    return Document(
        id=str(obj.get("_id", obj.get("id", ""))), text=text,
        metadata=metadata if isinstance(metadata, dict) else {},
    )


def _calls(docs: Iterator[Document], per_call: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == per_call:
            yield batch
            batch = []
    if batch:
        yield batch


def create_collection(client: Client, args: argparse.Namespace) -> None:
    """Create the collection; an existing one is fine."""
    try:
        client.search.create_collection(
            args.collection, args.dimension,
            metric=METRICS[args.metric], index_kind=args.index_kind,
        )
    except AlreadyExistsError:
        pass


def run(args: argparse.Namespace) -> int:
    """Ingest every document, with a progress bar and a final summary."""
    files = iter_files(args.paths)
    total = count_documents(files)
    documents = chunks = 0
    chunk_tokens = overlap_tokens = 0
    began = time.perf_counter()
    with open_client(args) as client:
        if args.create:
            create_collection(client, args)
        with tqdm(total=total, unit="doc", disable=args.quiet) as bar:
            for batch in _calls(read_documents(files), args.docs_per_call):
                response = client.search.ingest(
                    args.collection, batch,
                    chunk_tokens=args.chunk_tokens, overlap_tokens=args.overlap_tokens,
                )
                documents += response.documents
                chunks += response.chunks
                chunk_tokens, overlap_tokens = response.chunk_tokens, response.overlap_tokens
                bar.update(len(batch))
                bar.set_postfix(chunks=chunks)
    elapsed = time.perf_counter() - began
    rate = chunks / elapsed if elapsed > 0 else 0.0
    print(
        f"ingested {documents} documents into {args.collection!r}: {chunks} chunks "
        f"({chunk_tokens}-token windows, {overlap_tokens} overlap), "
        f"{rate:.1f} vectors/s, {elapsed:.1f} s"
    )
    return 0
