"""Typed calls to ``backbone.v1.GenerationService``, sync and async.

``generate`` returns a stream object: iterate it for :class:`Delta` events and then one
:class:`Final`; ``cancel()`` ends the call (the server aborts the sequence), and its
``request_id`` (assigned here when the caller gives none, so it is known before the
first token) can be passed to ``abort`` from anywhere::

    with Client() as client:
        for event in client.generation.generate("Why is the sky blue?", max_tokens=64):
            if isinstance(event, Delta):
                print(event.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import grpc
import grpc.aio
from backbone.v1 import generation_service_pb2 as pb
from backbone.v1 import generation_service_pb2_grpc as pb_grpc

from clients.channel import ClientOptions, call_kwargs
from clients.common import Timing, Usage, parse_timings, parse_usage
from clients.errors import CancelledRpcError, translated_errors

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


@dataclass(frozen=True)
class Message:
    """One chat message: role "system", "user" or "assistant"."""

    role: str
    content: str


#: A chat message as a Message, a (role, content) pair or a {"role", "content"} mapping.
MessageLike = Message | tuple[str, str] | Mapping[str, str]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None leaves a field to the server's default (see the proto)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass(frozen=True)
class Delta:
    """New output: text (may be empty mid-character) and its token ids."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Final:
    """The end of a generation: why it stopped, token counts, latencies, the model."""

    #: "stop", "length" or "abort" ("" for a value this client does not know).
    finish_reason: str
    usage: Usage
    time_to_first_token_s: float
    time_per_output_token_s: float
    timings: tuple[Timing, ...]
    model: str


@dataclass(frozen=True)
class ModelInfo:
    """A served model."""

    name: str
    engine: str
    max_context_tokens: int
    max_tokens_cap: int
    ready: bool
    default: bool


@dataclass(frozen=True)
class TokenCount:
    """A prompt's tokens after the chat template, and the model's context size."""

    tokens: int
    max_context_tokens: int


def as_message(message: MessageLike) -> pb.ChatMessage:
    """A chat message in any accepted shape -> ChatMessage."""
    if isinstance(message, Message):
        return pb.ChatMessage(role=message.role, content=message.content)
    if isinstance(message, tuple):
        return pb.ChatMessage(role=message[0], content=message[1])
    return pb.ChatMessage(role=message["role"], content=message["content"])


def build_sampling(sampling: Sampling) -> pb.SamplingParams:
    """SamplingParams with only the fields that were given set."""
    out = pb.SamplingParams(stop=list(sampling.stop))
    for f in fields(Sampling):
        value = getattr(sampling, f.name)
        if f.name != "stop" and value is not None:
            setattr(out, f.name, value)
    return out


def build_generate_request(
    prompt: str | None, messages: Sequence[MessageLike] | None, model: str,
    request_id: str, sampling: Sampling,
) -> pb.GenerateRequest:
    """The GenerateRequest: a raw prompt or chat messages; a fresh id when none is given."""
    return pb.GenerateRequest(
        model=model, prompt=prompt or "",
        messages=[as_message(m) for m in messages or ()],
        sampling=build_sampling(sampling),
        request_id=request_id or uuid.uuid4().hex,
    )


def build_count_request(
    prompt: str | None, messages: Sequence[MessageLike] | None, model: str
) -> pb.CountTokensRequest:
    """The CountTokensRequest."""
    return pb.CountTokensRequest(
        model=model, prompt=prompt or "", messages=[as_message(m) for m in messages or ()]
    )


def parse_event(message: pb.GenerateResponse) -> Delta | Final:
    """One GenerateResponse -> Delta or Final."""
    if message.HasField("delta"):
        return Delta(message.delta.text, tuple(message.delta.token_ids))
    final = message.final
    return Final(
        finish_reason=FINISH_REASONS.get(final.finish_reason, ""),
        usage=parse_usage(final.usage),
        time_to_first_token_s=final.time_to_first_token_us / 1e6,
        time_per_output_token_s=final.time_per_output_token_us / 1e6,
        timings=parse_timings(final.timings),
        model=final.model,
    )


def parse_models(response: pb.ListModelsResponse) -> tuple[ModelInfo, ...]:
    """ListModelsResponse -> ModelInfos, default first."""
    return tuple(
        ModelInfo(m.name, m.engine, m.max_context_tokens, m.max_tokens_cap, m.ready, m.default)
        for m in response.models
    )


class GenerationStream:
    """A running sync generation: iterate for Deltas then one Final.

    ``cancel()`` (from any thread) ends the call: iteration then stops quietly. Leaving a
    ``with`` block or closing the iterator cancels too. ``final`` is set once it arrived.
    """

    def __init__(self, call: grpc.Call, request_id: str) -> None:
        self._call = call
        self.request_id = request_id
        self.final: Final | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[Delta | Final]:
        try:
            with translated_errors():
                for message in self._call:
                    event = parse_event(message)
                    if isinstance(event, Final):
                        self.final = event
                    yield event
        except CancelledRpcError:
            if not self.cancelled:
                raise
        finally:
            self._call.cancel()  # no-op once the call has ended

    def cancel(self) -> None:
        """Cancel the call; the server aborts the generation."""
        self.cancelled = True
        self._call.cancel()

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The call's trailing metadata (blocks until the call ended)."""
        return tuple(self._call.trailing_metadata() or ())

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._call.cancel()


class AsyncGenerationStream:
    """A running async generation: ``async for`` Deltas then one Final.

    ``cancel()`` ends the call: iteration then stops quietly. Leaving an ``async with``
    block or closing the iterator cancels too. ``final`` is set once it arrived.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall, request_id: str) -> None:
        self._call = call
        self.request_id = request_id
        self.final: Final | None = None
        self.cancelled = False

    async def _events(self) -> AsyncIterator[Delta | Final]:
        try:
            with translated_errors():
                async for message in self._call:
                    event = parse_event(message)
                    if isinstance(event, Final):
                        self.final = event
                    yield event
        except CancelledRpcError:
            if not self.cancelled:
                raise
        except asyncio.CancelledError:
            # grpc-aio reports a locally cancelled call as CancelledError; only that one
            # ends the iteration quietly, never a cancellation of the task itself.
            task = asyncio.current_task()
            if not self.cancelled or (task is not None and task.cancelling()):
                raise
        finally:
            self._call.cancel()

    def __aiter__(self) -> AsyncIterator[Delta | Final]:
        return self._events()

    def cancel(self) -> None:
        """Cancel the call; the server aborts the generation."""
        self.cancelled = True
        self._call.cancel()

    async def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The call's trailing metadata (waits until the call ended)."""
        return tuple(await self._call.trailing_metadata() or ())

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._call.cancel()


class GenerationClient:
    """Sync calls to GenerationService; get one as ``Client(...).generation``."""

    def __init__(self, channel: grpc.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.GenerationServiceStub(channel)
        self._options = options

    def generate(
        self, prompt: str | None = None, *, messages: Sequence[MessageLike] | None = None,
        model: str = "", request_id: str = "", timeout: float | None = None,
        **sampling: object,
    ) -> GenerationStream:
        """Start a generation (never retried); ``sampling``: any :class:`Sampling` field.

        ``timeout`` bounds the whole stream (default: the options' ``stream_timeout``).
        """
        request = build_generate_request(
            prompt, messages, model, request_id, Sampling(**sampling)  # type: ignore[arg-type]
        )
        call = self._stub.Generate(request, **call_kwargs(self._options, timeout, stream=True))
        return GenerationStream(call, request.request_id)

    def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Abort a running generation by id (REQUEST_NOT_FOUND when none runs)."""
        request = pb.AbortRequest(request_id=request_id)
        with translated_errors():
            return self._stub.Abort(request, **call_kwargs(self._options, timeout)).aborted

    def count_tokens(
        self, prompt: str | None = None, *, messages: Sequence[MessageLike] | None = None,
        model: str = "", timeout: float | None = None,
    ) -> TokenCount:
        """The prompt's tokens after the chat template, and the context size."""
        request = build_count_request(prompt, messages, model)
        with translated_errors():
            response = self._stub.CountTokens(request, **call_kwargs(self._options, timeout))
        return TokenCount(response.tokens, response.max_context_tokens)

    def list_models(self, *, timeout: float | None = None) -> tuple[ModelInfo, ...]:
        """The served models, default first."""
        with translated_errors():
            response = self._stub.ListModels(
                pb.ListModelsRequest(), **call_kwargs(self._options, timeout)
            )
        return parse_models(response)


class AsyncGenerationClient:
    """Async calls to GenerationService; get one as ``AsyncClient(...).generation``."""

    def __init__(self, channel: grpc.aio.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.GenerationServiceStub(channel)
        self._options = options

    def generate(
        self, prompt: str | None = None, *, messages: Sequence[MessageLike] | None = None,
        model: str = "", request_id: str = "", timeout: float | None = None,
        **sampling: object,
    ) -> AsyncGenerationStream:
        """Start a generation (never retried); ``sampling``: any :class:`Sampling` field.

        Not a coroutine: the call starts now; iterate the stream for its events.
        """
        request = build_generate_request(
            prompt, messages, model, request_id, Sampling(**sampling)  # type: ignore[arg-type]
        )
        call = self._stub.Generate(request, **call_kwargs(self._options, timeout, stream=True))
        return AsyncGenerationStream(call, request.request_id)

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Abort a running generation by id (REQUEST_NOT_FOUND when none runs)."""
        request = pb.AbortRequest(request_id=request_id)
        with translated_errors():
            response = await self._stub.Abort(request, **call_kwargs(self._options, timeout))
        return response.aborted

    async def count_tokens(
        self, prompt: str | None = None, *, messages: Sequence[MessageLike] | None = None,
        model: str = "", timeout: float | None = None,
    ) -> TokenCount:
        """The prompt's tokens after the chat template, and the context size."""
        request = build_count_request(prompt, messages, model)
        with translated_errors():
            response = await self._stub.CountTokens(
                request, **call_kwargs(self._options, timeout)
            )
        return TokenCount(response.tokens, response.max_context_tokens)

    async def list_models(self, *, timeout: float | None = None) -> tuple[ModelInfo, ...]:
        """The served models, default first."""
        with translated_errors():
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), **call_kwargs(self._options, timeout)
            )
        return parse_models(response)
