"""What the load generator sends: a registry of scenarios, one entry per kind of request.

A scenario turns a channel and its parsed options into a :data:`Call`, the coroutine
function the load generator awaits once per request. Adding a scenario (``search``,
``rerank``, ``generate``) is one :class:`Scenario` entry in :data:`SCENARIOS`: its options,
an async ``build`` that does any setup (create a collection, pick prompts) and returns the
call, and how many items (texts, queries) one request carries.

A call raises ``grpc.aio.AioRpcError`` for a non-OK status (counted under the status name)
or :class:`BadResponse` when an OK answer is malformed. It may return extra per-request
figures in milliseconds (a streaming scenario returns ``{"ttft_ms": ..., "tpot_ms": ...}``);
the load generator reports their percentiles next to the latency.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from perf.echo_server import ECHO_METHOD

#: One request: takes the per-request deadline in seconds, returns optional extra metrics (ms).
Call = Callable[[float], Awaitable[Mapping[str, float] | None]]

# The repo's parent directory holds the shared datasets (never copied into the repo).
REPO_ROOT = Path(__file__).resolve().parents[1]
MSMARCO_DIR = REPO_ROOT.parent / "shared" / "datasets" / "msmarco"
MSMARCO_CORPUS = MSMARCO_DIR / "corpus.jsonl"


class BadResponse(Exception):
    """An OK answer that does not match the request (wrong count, empty vector...)."""


def load_corpus_texts(path: Path = MSMARCO_CORPUS, limit: int | None = None) -> list[str]:
    """Passage texts of a BEIR-style corpus.jsonl (``title`` + ``text``), in file order."""
    texts: list[str] = []
    with Path(path).open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            text = " ".join(p for p in (record.get("title", ""), record.get("text", "")) if p).strip()
            if text:
                texts.append(text)
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"no texts in {path}")
    return texts


def shuffled_texts(path: Path = MSMARCO_CORPUS, seed: int = 0) -> list[str]:
    """The corpus texts in a seeded random order: same order for client and baseline."""
    texts = load_corpus_texts(path)
    random.Random(seed).shuffle(texts)
    return texts


def batches(texts: list[str], size: int) -> list[list[str]]:
    """Consecutive groups of ``size`` texts (the last short group dropped when possible)."""
    if size < 1:
        raise ValueError("size must be >= 1")
    groups = [texts[i : i + size] for i in range(0, len(texts) - size + 1, size)]
    return groups or [texts[:size]]


@dataclass(frozen=True)
class Scenario:
    """One kind of request the load generator can send."""

    name: str
    #: One line for ``--help``.
    help: str
    #: ``await build(channel, options)`` does any setup and returns the per-request call.
    build: Callable[[grpc.aio.Channel, argparse.Namespace], Awaitable[Call]]
    #: Adds this scenario's own options to its subcommand parser.
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    #: Items (texts, queries...) one request carries, for items/s.
    items_per_request: Callable[[argparse.Namespace], int] = lambda options: 1


# --- echo: the raw gRPC floor -------------------------------------------------------------


def _echo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--payload-bytes", type=int, default=512, help="request size in bytes (default 512)"
    )


async def _build_echo(channel: grpc.aio.Channel, options: argparse.Namespace) -> Call:
    payload = bytes(random.Random(options.seed).getrandbits(8) for _ in range(options.payload_bytes))
    # No serializers: bytes go out and come back as they are.
    echo = channel.unary_unary(ECHO_METHOD)

    async def call(timeout: float) -> None:
        reply = await echo(payload, timeout=timeout)
        if len(reply) != len(payload):
            raise BadResponse(f"echo returned {len(reply)} bytes, sent {len(payload)}")

    return call


# --- embed: EmbeddingService/Embed on MS MARCO passages -----------------------------------


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--texts-per-request", type=int, default=1, help="texts in one EmbedRequest (default 1)"
    )
    parser.add_argument("--normalize", action="store_true", help="ask for unit-norm vectors")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=MSMARCO_CORPUS,
        help="corpus.jsonl whose passages are sent (default: the shared MS MARCO subset)",
    )


async def _build_embed(channel: grpc.aio.Channel, options: argparse.Namespace) -> Call:
    from backbone.v1 import embedding_service_pb2, embedding_service_pb2_grpc

    per_request = options.texts_per_request
    requests = [
        embedding_service_pb2.EmbedRequest(inputs=group, normalize=options.normalize)
        for group in batches(shuffled_texts(options.corpus, options.seed), per_request)
    ]
    next_request = itertools.cycle(requests).__next__
    stub = embedding_service_pb2_grpc.EmbeddingServiceStub(channel)

    async def call(timeout: float) -> None:
        request = next_request()
        reply = await stub.Embed(request, timeout=timeout)
        if len(reply.embeddings) != len(request.inputs) or not reply.embeddings[0].values:
            raise BadResponse(f"{len(reply.embeddings)} embeddings for {len(request.inputs)} texts")

    return call


#: name -> scenario. Add new scenarios here.
SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            name="echo",
            help="raw gRPC echo of a fixed payload (perf.echo_server): the floor",
            build=_build_echo,
            add_arguments=_echo_arguments,
        ),
        Scenario(
            name="embed",
            help="EmbeddingService/Embed with MS MARCO passages",
            build=_build_embed,
            add_arguments=_embed_arguments,
            items_per_request=lambda options: options.texts_per_request,
        ),
    )
}
