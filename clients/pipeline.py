"""Typed calls to ``backbone.v1.PipelineService`` (Retrieve, Answer), sync and async.

``answer`` returns a stream object: iterate it for one :class:`Sources` event, the
:class:`~clients.generation.Delta` events of the answer, then one :class:`AnswerFinal`
(the model that ran, every hop's timing, whether the cache answered, what was
degraded)::

    with Client() as client:
        for event in client.pipeline.answer("What is green tea?", collection="notes"):
            if isinstance(event, Delta):
                print(event.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from backbone.v1 import pipeline_service_pb2 as pb
from backbone.v1 import pipeline_service_pb2_grpc as pb_grpc
from google.protobuf import json_format

from clients.channel import ClientOptions, call_kwargs
from clients.common import Timing, Usage, parse_timings, parse_usage
from clients.errors import CancelledRpcError, translated_errors
from clients.generation import (
    FINISH_REASONS,
    Delta,
    MessageLike,
    Sampling,
    as_message,
    build_sampling,
)
from clients.search_messages import SEARCH_MODES, Condition, build_filter, enum_value


@dataclass(frozen=True)
class Source:
    """A retrieved passage: both scores (rerank 0 when not reranked) and its metadata."""

    id: str
    text: str
    search_score: float
    rerank_score: float
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Sources:
    """The first event of an answer: the sources, best first (cited as [1]..[n])."""

    sources: tuple[Source, ...]


@dataclass(frozen=True)
class Retrieved:
    """What Retrieve returns."""

    sources: tuple[Source, ...]
    timings: tuple[Timing, ...]
    degradations: tuple[str, ...]


@dataclass(frozen=True)
class AnswerFinal:
    """The end of an answer."""

    #: "stop", "length" or "abort" ("" for a value this client does not know).
    finish_reason: str
    usage: Usage
    #: Every hop's timing: embed, search, rerank, generate, then "pipeline" (the whole).
    timings: tuple[Timing, ...]
    model: str
    degradations: tuple[str, ...]
    cache_hit: bool
    sources_used: int


def build_retrieve_request(
    query: str, collection: str, *, search_top_k: int = 0, top_n: int = 0,
    skip_rerank: bool = False, mode: str | None = None,
    filter: Iterable[Condition] | None = None,
) -> pb.RetrieveRequest:
    """The RetrieveRequest (0: the server's default)."""
    request = pb.RetrieveRequest(
        query=query, collection=collection, search_top_k=search_top_k, top_n=top_n,
        skip_rerank=skip_rerank, mode=enum_value(SEARCH_MODES, mode, "mode"),
    )
    if filter:
        request.filter.CopyFrom(build_filter(filter))
    return request


def build_answer_request(
    retrieve: pb.RetrieveRequest, *, model: str = "", system_prompt: str = "",
    history: Sequence[MessageLike] = (), skip_cache: bool = False,
    sampling: Sampling | None = None,
) -> pb.AnswerRequest:
    """The AnswerRequest around a RetrieveRequest."""
    request = pb.AnswerRequest(
        retrieve=retrieve, model=model, system_prompt=system_prompt,
        history=[as_message(m) for m in history], skip_cache=skip_cache,
    )
    if sampling is not None:
        request.sampling.CopyFrom(build_sampling(sampling))
    return request


def parse_source(source: pb.Source) -> Source:
    """Wire Source -> Source."""
    return Source(
        source.id, source.text, source.search_score, source.rerank_score,
        json_format.MessageToDict(source.metadata) if source.HasField("metadata") else {},
    )


def parse_retrieve_response(response: pb.RetrieveResponse) -> Retrieved:
    """RetrieveResponse -> Retrieved."""
    return Retrieved(
        tuple(parse_source(s) for s in response.sources), parse_timings(response.timings),
        tuple(response.degradations),
    )


def parse_answer_event(message: pb.AnswerResponse) -> Sources | Delta | AnswerFinal:
    """One AnswerResponse -> Sources, Delta or AnswerFinal."""
    kind = message.WhichOneof("event")
    if kind == "sources":
        return Sources(tuple(parse_source(s) for s in message.sources.sources))
    if kind == "delta":
        return Delta(message.delta.text, tuple(message.delta.token_ids))
    final = message.final
    return AnswerFinal(
        finish_reason=FINISH_REASONS.get(final.finish_reason, ""),
        usage=parse_usage(final.usage),
        timings=parse_timings(final.timings),
        model=final.model,
        degradations=tuple(final.degradations),
        cache_hit=final.cache_hit,
        sources_used=final.sources_used,
    )


def _answer_request(question: str, collection: str, kwargs: dict[str, Any]) -> pb.AnswerRequest:
    retrieve_keys = ("search_top_k", "top_n", "skip_rerank", "mode", "filter")
    answer_keys = ("model", "system_prompt", "history", "skip_cache")
    retrieve = build_retrieve_request(
        question, collection, **{k: kwargs.pop(k) for k in retrieve_keys if k in kwargs}
    )
    answer = {k: kwargs.pop(k) for k in answer_keys if k in kwargs}
    sampling = Sampling(**kwargs) if kwargs else None  # what is left: sampling fields
    return build_answer_request(retrieve, sampling=sampling, **answer)


class AnswerStream:
    """A running sync answer: iterate for Sources, Deltas, then one AnswerFinal.

    ``cancel()`` ends the call (the server stops generating); leaving a ``with`` block
    cancels too. ``sources`` and ``final`` are set once they arrived.
    """

    def __init__(self, call: grpc.Call) -> None:
        self._call = call
        self.sources: tuple[Source, ...] = ()
        self.final: AnswerFinal | None = None
        self.cancelled = False

    def _keep(self, event: Sources | Delta | AnswerFinal) -> None:
        if isinstance(event, Sources):
            self.sources = event.sources
        elif isinstance(event, AnswerFinal):
            self.final = event

    def __iter__(self) -> Iterator[Sources | Delta | AnswerFinal]:
        try:
            with translated_errors():
                for message in self._call:
                    event = parse_answer_event(message)
                    self._keep(event)
                    yield event
        except CancelledRpcError:
            if not self.cancelled:
                raise
        finally:
            self._call.cancel()

    def cancel(self) -> None:
        """Cancel the call."""
        self.cancelled = True
        self._call.cancel()

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._call.cancel()


class AsyncAnswerStream(AnswerStream):
    """A running async answer: ``async for`` Sources, Deltas, then one AnswerFinal."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        super().__init__(call)

    async def _events(self) -> AsyncIterator[Sources | Delta | AnswerFinal]:
        try:
            with translated_errors():
                async for message in self._call:
                    event = parse_answer_event(message)
                    self._keep(event)
                    yield event
        except CancelledRpcError:
            if not self.cancelled:
                raise
        except asyncio.CancelledError:
            # A locally cancelled call ends the iteration quietly; a cancelled task does not.
            task = asyncio.current_task()
            if not self.cancelled or (task is not None and task.cancelling()):
                raise
        finally:
            self._call.cancel()

    def __aiter__(self) -> AsyncIterator[Sources | Delta | AnswerFinal]:
        return self._events()

    async def __aenter__(self) -> AsyncAnswerStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._call.cancel()


class PipelineClient:
    """Sync calls to PipelineService; get one as ``Client(...).pipeline``."""

    def __init__(self, channel: grpc.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.PipelineServiceStub(channel)
        self._options = options

    def retrieve(
        self, query: str, collection: str, *, timeout: float | None = None, **options: Any
    ) -> Retrieved:
        """Embed, search, rerank; ``options``: search_top_k, top_n, skip_rerank, mode, filter."""
        request = build_retrieve_request(query, collection, **options)
        with translated_errors():
            response = self._stub.Retrieve(request, **call_kwargs(self._options, timeout))
        return parse_retrieve_response(response)

    def answer(
        self, question: str, collection: str, *, timeout: float | None = None, **options: Any
    ) -> AnswerStream:
        """Start an answer (never retried). ``options``: the Retrieve options, model,
        system_prompt, history, skip_cache and any :class:`Sampling` field.
        ``timeout`` bounds the whole stream (default: the options' ``stream_timeout``)."""
        request = _answer_request(question, collection, dict(options))
        call = self._stub.Answer(request, **call_kwargs(self._options, timeout, stream=True))
        return AnswerStream(call)


class AsyncPipelineClient:
    """Async calls to PipelineService; get one as ``AsyncClient(...).pipeline``."""

    def __init__(self, channel: grpc.aio.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.PipelineServiceStub(channel)
        self._options = options

    async def retrieve(
        self, query: str, collection: str, *, timeout: float | None = None, **options: Any
    ) -> Retrieved:
        """See :meth:`PipelineClient.retrieve`."""
        request = build_retrieve_request(query, collection, **options)
        with translated_errors():
            response = await self._stub.Retrieve(request, **call_kwargs(self._options, timeout))
        return parse_retrieve_response(response)

    def answer(
        self, question: str, collection: str, *, timeout: float | None = None, **options: Any
    ) -> AsyncAnswerStream:
        """See :meth:`PipelineClient.answer`; not a coroutine: iterate the stream."""
        request = _answer_request(question, collection, dict(options))
        call = self._stub.Answer(request, **call_kwargs(self._options, timeout, stream=True))
        return AsyncAnswerStream(call)
