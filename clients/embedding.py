"""Typed calls to ``backbone.v1.EmbeddingService``, sync and async.

Request building and response parsing are plain functions shared by both classes; the
classes only add the call (deadline, token, typed errors).
"""

from __future__ import annotations


from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import numpy as np
from backbone.v1 import embedding_service_pb2 as pb
from backbone.v1 import embedding_service_pb2_grpc as pb_grpc

from clients.channel import ClientOptions, call_kwargs
from clients.common import Timing, Usage, parse_timings, parse_usage, truncation_policy
from clients.errors import iterate, translated_errors


@dataclass(frozen=True)
class EmbedOptions:
    """Per-request settings of an embed call (see ``EmbedRequest`` in the contract)."""

    #: Scale each vector to unit L2 norm (after ``dimensions``).
    normalize: bool = False
    #: Output dimension; 0 is the model's native one (384 for all-MiniLM-L6-v2).
    dimensions: int = 0
    #: "truncate" or "reject" for texts over the model's window; None: server default.
    truncation: str | None = None
    #: Model name; "" is the server's default embedding model.
    model: str = ""


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings of one request, in input order."""

    #: float32 array of shape (number of texts, dimensions).
    vectors: np.ndarray
    #: The model that produced them.
    model: str
    #: Length of every vector.
    dimensions: int
    #: Tokens the model read per text.
    tokens: tuple[int, ...]
    #: Whether each text was cut to the model's window.
    truncated: tuple[bool, ...]
    usage: Usage
    timings: tuple[Timing, ...]


def as_texts(texts: str | Sequence[str]) -> list[str]:
    """A single text or a sequence of texts -> a list of texts."""
    return [texts] if isinstance(texts, str) else list(texts)


def build_embed_request(texts: str | Sequence[str], options: EmbedOptions) -> pb.EmbedRequest:
    """The ``EmbedRequest`` for these texts and options."""
    return pb.EmbedRequest(
        inputs=as_texts(texts),
        normalize=options.normalize,
        dimensions=options.dimensions,
        truncation=truncation_policy(options.truncation),
        model=options.model,
    )


def parse_embed_response(response: pb.EmbedResponse) -> EmbedResult:
    """``EmbedResponse`` -> EmbedResult (vectors as one float32 array)."""
    rows = [e.values for e in response.embeddings]
    vectors = (
        np.array(rows, dtype=np.float32)
        if rows
        else np.zeros((0, response.dimensions), dtype=np.float32)
    )
    return EmbedResult(
        vectors=vectors,
        model=response.model,
        dimensions=response.dimensions or vectors.shape[1],
        tokens=tuple(e.tokens for e in response.embeddings),
        truncated=tuple(e.truncated for e in response.embeddings),
        usage=parse_usage(response.usage),
        timings=parse_timings(response.timings),
    )


def build_stream_request(
    index: int, texts: str | Sequence[str], options: EmbedOptions
) -> pb.EmbedStreamRequest:
    """The ``index``-th message of an EmbedStream call (its id is the index)."""
    return pb.EmbedStreamRequest(request=build_embed_request(texts, options), id=str(index))


def parse_stream_response(response: pb.EmbedStreamResponse) -> EmbedResult:
    """``EmbedStreamResponse`` -> EmbedResult."""
    return parse_embed_response(response.response)


class EmbeddingClient:
    """Sync calls to EmbeddingService; get one as ``Client(...).embedding``."""

    def __init__(self, channel: grpc.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.EmbeddingServiceStub(channel)
        self._options = options

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        normalize: bool = False,
        dimensions: int = 0,
        truncation: str | None = None,
        model: str = "",
        timeout: float | None = None,
    ) -> EmbedResult:
        """Embeds one text or a batch; retried on UNAVAILABLE by the channel."""
        request = build_embed_request(
            texts, EmbedOptions(normalize, dimensions, truncation, model)
        )
        with translated_errors():
            response = self._stub.Embed(request, **call_kwargs(self._options, timeout))
        return parse_embed_response(response)

    def embed_stream(
        self,
        batches: Iterable[str | Sequence[str]],
        *,
        normalize: bool = False,
        dimensions: int = 0,
        truncation: str | None = None,
        model: str = "",
        timeout: float | None = None,
    ) -> Iterator[EmbedResult]:
        """One long-lived EmbedStream: a result per batch, in order (never retried).

        ``timeout`` defaults to the options' ``stream_timeout``; closing the iterator
        cancels the call.
        """
        options = EmbedOptions(normalize, dimensions, truncation, model)
        requests = (build_stream_request(i, b, options) for i, b in enumerate(batches))
        call = self._stub.EmbedStream(
            requests, **call_kwargs(self._options, timeout, stream=True)
        )
        for response in iterate(call):
            yield parse_stream_response(response)


class AsyncEmbeddingClient:
    """Async calls to EmbeddingService; get one as ``AsyncClient(...).embedding``."""

    def __init__(self, channel: grpc.aio.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.EmbeddingServiceStub(channel)
        self._options = options

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        normalize: bool = False,
        dimensions: int = 0,
        truncation: str | None = None,
        model: str = "",
        timeout: float | None = None,
    ) -> EmbedResult:
        """Embeds one text or a batch; retried on UNAVAILABLE by the channel."""
        request = build_embed_request(
            texts, EmbedOptions(normalize, dimensions, truncation, model)
        )
        with translated_errors():
            response = await self._stub.Embed(request, **call_kwargs(self._options, timeout))
        return parse_embed_response(response)

    async def embed_stream(
        self,
        batches: Iterable[str | Sequence[str]] | AsyncIterable[str | Sequence[str]],
        *,
        normalize: bool = False,
        dimensions: int = 0,
        truncation: str | None = None,
        model: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[EmbedResult]:
        """One long-lived EmbedStream: a result per batch, in order (never retried).

        ``batches`` may be sync or async; ``timeout`` defaults to ``stream_timeout``;
        closing the iterator cancels the call.
        """
        options = EmbedOptions(normalize, dimensions, truncation, model)

        async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
            index = 0
            if isinstance(batches, AsyncIterable):
                async for batch in batches:
                    yield build_stream_request(index, batch, options)
                    index += 1
            else:
                for batch in batches:
                    yield build_stream_request(index, batch, options)
                    index += 1

        # Lock-step: write one request, read its response, then write the next. A write
        # racing the end of the call makes grpc-aio replace the server's status with
        # INTERNAL (grpc/grpc#36066); lock-step never writes after the server answered
        # with an error, and the server handles a stream's messages in order anyway.
        call = self._stub.EmbedStream(**call_kwargs(self._options, timeout, stream=True))
        try:
            with translated_errors():
                async for request in requests():
                    await call.write(request)
                    response = await call.read()  # raises the call's error status
                    if response is grpc.aio.EOF:
                        return
                    yield parse_stream_response(response)
                await call.done_writing()
                await call.read()  # EOF, or raises the call's error status
        finally:
            call.cancel()  # no-op once the call has ended
