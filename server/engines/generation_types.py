"""The generation hop's domain types and limits: requests, sampling, events, and the
checks every request passes before any engine work (re-exported by
``server.engines.generator``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from router.admission import Priority
from server.errors import InvalidArgument

FinishReason = Literal["stop", "length", "abort"]

#: max_tokens when the request leaves it unset (proto: "Default 256").
DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 128
MAX_TOP_K = 1000
MAX_MESSAGES = 256
MAX_REQUEST_ID_CHARS = 128
CHAT_ROLES = frozenset({"system", "user", "assistant"})
#: Prompts longer than this many characters are tokenised off the event loop.
INLINE_TOKENIZE_CHARS = 4096
#: Model name the router uses for "choose for me"; served as the default model here.
AUTO_MODEL = "auto"


@dataclass(frozen=True)
class ChatTurn:
    """One chat message."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters; ``None`` means "the default" (documented in the proto)."""

    temperature: float = 1.0
    top_p: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    # None: DEFAULT_MAX_TOKENS, shortened to what the context leaves.
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt or chat messages (exactly one of them), with sampling parameters."""

    request_id: str
    prompt: str = ""
    messages: tuple[ChatTurn, ...] = ()
    params: GenerationParams = field(default_factory=GenerationParams)
    # The caller's deadline (a time.monotonic() instant; None: the model's default) and
    # priority, for admission.
    deadline: float | None = None
    priority: Priority = Priority.NORMAL


@dataclass(frozen=True)
class ModelLimits:
    """Per-model caps, checked before any work."""

    max_tokens_cap: int = 1024
    max_context_tokens: int = 2048
    max_prompt_chars: int = 65536


@dataclass(frozen=True)
class TokenDelta:
    """New output since the previous event: text (may be empty mid-character) and ids."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class GenerationFinal:
    """The end of a stream. Engines fill the counts and engine timings; the core adds
    ``ttft_s``/``tpot_s``/``total_s`` measured from the request's receipt."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # Waiting for the engine to schedule the request.
    queue_s: float = 0.0
    # From scheduling to the last token.
    compute_s: float = 0.0
    # Sequences the engine was running together when this one finished (>= 1).
    batch_size: int = 1
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    total_s: float = 0.0


GenerationEvent = TokenDelta | GenerationFinal


def _bad_sampling(name: str, value: object, allowed: str) -> InvalidArgument:
    return InvalidArgument(
        f"sampling.{name}={value!r} is outside {allowed}",
        reason="INVALID_SAMPLING",
        metadata={"field": f"sampling.{name}", "allowed": allowed},
    )


def _in_range(value: float, low: float, high: float, *, low_open: bool = False) -> bool:
    # NaN compares False everywhere, so it fails here too.
    if not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def validate_params(params: GenerationParams, limits: ModelLimits) -> None:
    """Raise InvalidArgument for a sampling value outside the contract's ranges."""
    if not _in_range(params.temperature, 0.0, 2.0):
        raise _bad_sampling("temperature", params.temperature, "[0, 2]")
    if not _in_range(params.top_p, 0.0, 1.0, low_open=True):
        raise _bad_sampling("top_p", params.top_p, "(0, 1]")
    if not 0 <= params.top_k <= MAX_TOP_K:
        raise _bad_sampling("top_k", params.top_k, f"[0, {MAX_TOP_K}]")
    if not _in_range(params.repetition_penalty, 0.0, 2.0, low_open=True):
        raise _bad_sampling("repetition_penalty", params.repetition_penalty, "(0, 2]")
    if not _in_range(params.presence_penalty, -2.0, 2.0):
        raise _bad_sampling("presence_penalty", params.presence_penalty, "[-2, 2]")
    if not _in_range(params.frequency_penalty, -2.0, 2.0):
        raise _bad_sampling("frequency_penalty", params.frequency_penalty, "[-2, 2]")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise _bad_sampling("stop", f"{len(params.stop)} strings", f"at most {MAX_STOP_STRINGS}")
    for stop in params.stop:
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise _bad_sampling("stop", stop[:16], f"1-{MAX_STOP_CHARS} characters")
    if params.max_tokens is not None:
        if params.max_tokens < 1:
            raise _bad_sampling("max_tokens", params.max_tokens, "at least 1")
        if params.max_tokens > limits.max_tokens_cap:
            raise InvalidArgument(
                f"max_tokens {params.max_tokens} exceeds this model's cap "
                f"{limits.max_tokens_cap}",
                reason="CONTEXT_LENGTH_EXCEEDED",
                metadata={"max_tokens": params.max_tokens, "cap": limits.max_tokens_cap},
            )


def validate_input(prompt: str, messages: Sequence[ChatTurn], limits: ModelLimits) -> None:
    """Raise InvalidArgument unless there is exactly one non-empty, bounded input."""
    if prompt and messages:
        raise InvalidArgument("give a prompt or messages, not both")
    if not prompt and not any(m.content for m in messages):
        raise InvalidArgument("the prompt is empty", reason="EMPTY_INPUT")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(
            f"{len(messages)} messages; at most {MAX_MESSAGES}",
            reason="TOO_MANY_INPUTS",
            metadata={"limit": MAX_MESSAGES},
        )
    for turn in messages:
        if turn.role not in CHAT_ROLES:
            raise InvalidArgument(
                f"unknown chat role {turn.role[:32]!r}; use {sorted(CHAT_ROLES)}",
                metadata={"field": "messages.role"},
            )
    chars = len(prompt) + sum(len(m.content) for m in messages)
    if chars > limits.max_prompt_chars:
        raise InvalidArgument(
            f"the prompt has {chars} characters; at most {limits.max_prompt_chars}",
            reason="INPUT_TOO_LARGE",
            metadata={"chars": chars, "limit": limits.max_prompt_chars},
        )


def validate_request(request: GenerationRequest, limits: ModelLimits) -> None:
    """All checks that need neither tokenizer nor engine."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            f"request_id has {len(request.request_id)} characters; at most "
            f"{MAX_REQUEST_ID_CHARS}",
            metadata={"field": "request_id", "limit": MAX_REQUEST_ID_CHARS},
        )
    validate_input(request.prompt, request.messages, limits)
    validate_params(request.params, limits)


def fit_to_context(prompt_tokens: int, params: GenerationParams, limits: ModelLimits) -> int:
    """The max_tokens to run with, or CONTEXT_LENGTH_EXCEEDED.

    The prompt must leave room for one token. An explicit max_tokens must fit after the
    prompt; the default one is shortened to what is left.
    """
    room = limits.max_context_tokens - prompt_tokens
    meta = {"prompt_tokens": prompt_tokens, "max_context_tokens": limits.max_context_tokens}
    if room < 1:
        raise InvalidArgument(
            f"the prompt has {prompt_tokens} tokens; the context holds "
            f"{limits.max_context_tokens} including the completion",
            reason="CONTEXT_LENGTH_EXCEEDED",
            metadata=meta,
        )
    if params.max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, limits.max_tokens_cap, room)
    if params.max_tokens > room:
        raise InvalidArgument(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceed "
            f"the context of {limits.max_context_tokens} tokens",
            reason="CONTEXT_LENGTH_EXCEEDED",
            metadata={**meta, "max_tokens": params.max_tokens},
        )
    return params.max_tokens


# --------------------------------------------------------------------------- serving
