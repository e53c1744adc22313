"""Packing retrieved sources into a chat prompt that fits the model's context window.

Layout (chat messages): one system message (the system prompt, then "Sources:" and the
sources as "[1] text", "[2] text", ... in rank order), the earlier turns, then the
question as the last user message. Token counts come from the model's own tokenizer and
chat template (``count`` is the generation hop's CountTokens); the window is the model's
``max_context_tokens`` less the tokens kept for the answer.

Invariants: sources keep their rank order and numbering ([i] is the i-th source of the
answer's sources message); a source that does not fit whole is cut to what is left (at
a word boundary) when at least ``MIN_SOURCE_TOKENS`` are left, otherwise it and every
later source are dropped. The packed prompt never exceeds the window; when even the
prompt without sources does not fit, CONTEXT_LENGTH_EXCEEDED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from router.errors import InvalidArgument

#: The default system prompt (AnswerRequest.system_prompt empty).
DEFAULT_SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources below. After each sentence, "
    "cite the sources it relies on as [1], [2], ... If the sources do not contain the "
    "answer, say that you do not know."
)
#: A source cut to fewer tokens than this is dropped instead.
MIN_SOURCE_TOKENS = 32

Messages = tuple[tuple[str, str], ...]
Counter = Callable[[Messages], Awaitable[int]]


@dataclass(frozen=True)
class Packed:
    """The messages to generate from, how many sources they hold, which were cut."""

    messages: Messages
    tokens: int
    sources_used: int
    truncated: tuple[int, ...]  # 1-based numbers of sources cut to fit


def build_messages(
    system_prompt: str, sources: Sequence[str], history: Messages, question: str
) -> Messages:
    """The chat messages for these (already fitted) sources."""
    system = system_prompt
    if sources:
        listed = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(sources, 1))
        system = f"{system_prompt}\n\nSources:\n{listed}"
    return (("system", system), *history, ("user", question))


def _cut(text: str, fraction: float) -> str:
    """The first ``fraction`` of ``text``, ended at a word boundary."""
    keep = text[: max(0, int(len(text) * fraction))]
    space = keep.rfind(" ")
    return keep[:space] if space > len(keep) // 2 else keep


async def pack(
    count: Counter,
    *,
    system_prompt: str,
    sources: Sequence[str],
    history: Messages,
    question: str,
    window: int,
) -> Packed:
    """Fit ``sources`` (rank order) into ``window`` tokens; see the module doc."""
    if sources:
        # The common case first: everything fits, one count (the prompt only grows with
        # sources, so the question alone fits too).
        whole = build_messages(system_prompt, list(sources), history, question)
        tokens = await count(whole)
        if tokens <= window:
            return Packed(whole, tokens, len(sources), ())
    base = await count(build_messages(system_prompt, [], history, question))
    if base > window:
        raise InvalidArgument(
            f"the question, history and system prompt take {base} tokens; the model's "
            f"window leaves {window}",
            reason="CONTEXT_LENGTH_EXCEEDED", metadata={"limit": window},
        )
    kept: list[str] = []
    truncated: list[int] = []
    tokens = base
    for number, text in enumerate(sources, 1):
        trial = await count(build_messages(system_prompt, [*kept, text], history, question))
        if trial <= window:
            kept.append(text)
            tokens = trial
            continue
        left = window - tokens
        if left < MIN_SOURCE_TOKENS:
            break
        # Cut proportionally to the tokens left, then shrink until it fits (a few counts).
        needed = trial - tokens
        fraction = left / needed
        fitted = None
        for _ in range(4):
            piece = _cut(text, fraction)
            if not piece:
                break
            trial = await count(build_messages(system_prompt, [*kept, piece], history, question))
            if trial <= window:
                fitted = piece
                break
            fraction *= 0.8
        if fitted is None:
            break
        kept.append(fitted)
        truncated.append(number)
        tokens = trial
        break  # the window is (nearly) full
    return Packed(
        build_messages(system_prompt, kept, history, question), tokens, len(kept), tuple(truncated)
    )
