"""Typed calls to ``backbone.v1.RerankService``, sync and async.

Request building and response parsing are plain functions shared by both classes; the
classes only add the call (deadline, token, typed errors)::

    with Client() as client:
        best = client.rerank.rerank("query", ["doc a", "doc b"], top_n=1).results[0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
from backbone.v1 import rerank_service_pb2 as pb
from backbone.v1 import rerank_service_pb2_grpc as pb_grpc

from clients.channel import ClientOptions, call_kwargs
from clients.common import Timing, Usage, parse_timings, parse_usage, truncation_policy
from clients.errors import translated_errors


@dataclass(frozen=True)
class Ranked:
    """One document's place: its index in the request, score, text (if asked for)."""

    index: int
    score: float
    #: The document's text when ``return_documents`` was set, else "".
    document: str
    #: Whether the (query, document) pair was cut to the model's window.
    truncated: bool


@dataclass(frozen=True)
class RerankResult:
    """The documents best first (``top_n`` of them when set)."""

    results: tuple[Ranked, ...]
    model: str
    #: Pairs that were cut to the model's window.
    truncated_pairs: int
    usage: Usage
    timings: tuple[Timing, ...]


def build_rerank_request(
    query: str, documents: Sequence[str], top_n: int, return_documents: bool,
    model: str, truncation: str | None,
) -> pb.RerankRequest:
    """The RerankRequest (``truncation``: "truncate", "reject" or None for the default)."""
    return pb.RerankRequest(
        query=query, documents=list(documents), top_n=top_n,
        return_documents=return_documents, model=model,
        truncation=truncation_policy(truncation),
    )


def parse_rerank_response(response: pb.RerankResponse) -> RerankResult:
    """RerankResponse -> RerankResult."""
    return RerankResult(
        results=tuple(Ranked(r.index, r.score, r.document, r.truncated) for r in response.results),
        model=response.model,
        truncated_pairs=response.truncated_pairs,
        usage=parse_usage(response.usage),
        timings=parse_timings(response.timings),
    )


class RerankClient:
    """Sync calls to RerankService; get one as ``Client(...).rerank``."""

    def __init__(self, channel: grpc.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.RerankServiceStub(channel)
        self._options = options

    def rerank(
        self, query: str, documents: Sequence[str], *, top_n: int = 0,
        return_documents: bool = False, model: str = "", truncation: str | None = None,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score every document against the query; retried on UNAVAILABLE by the channel."""
        request = build_rerank_request(
            query, documents, top_n, return_documents, model, truncation
        )
        with translated_errors():
            response = self._stub.Rerank(request, **call_kwargs(self._options, timeout))
        return parse_rerank_response(response)


class AsyncRerankClient:
    """Async calls to RerankService; get one as ``AsyncClient(...).rerank``."""

    def __init__(self, channel: grpc.aio.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.RerankServiceStub(channel)
        self._options = options

    async def rerank(
        self, query: str, documents: Sequence[str], *, top_n: int = 0,
        return_documents: bool = False, model: str = "", truncation: str | None = None,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score every document against the query; retried on UNAVAILABLE by the channel."""
        request = build_rerank_request(
            query, documents, top_n, return_documents, model, truncation
        )
        with translated_errors():
            response = await self._stub.Rerank(request, **call_kwargs(self._options, timeout))
        return parse_rerank_response(response)
