"""Packing retrieved sources into a chat prompt that fits the model's context window.

Layout (chat messages): one system message (the system prompt, then "Sources:" and the
sources as "[1] text", "[2] text", ... in rank order), the earlier turns, then the
question as the last user message. Token counts come from the model's own tokenizer and
chat template (``count`` is the generation hop's CountTokens); the window is the model's
``max_context_tokens`` less the tokens kept for the answer.

Counting is skipped when it cannot change the outcome: ``token_bound`` is an upper bound
of a prompt's tokens under any tokenizer each of whose tokens stands for at least one
byte of its (normalised) text, and when the whole prompt's bound fits the window it fits
(the pipeline checks once per model, on ``CALIBRATION``, that its tokenizer keeps the
bound: ``Pipeline._model_window``). A CountTokens call costs 2-3 ms in-process here (the chat
template and the tokenizer), more over the network: most of the pipeline's own time.

Invariants: sources keep their rank order and numbering ([i] is the i-th source of the
answer's sources message); a source that does not fit whole is cut to what is left (at
a word boundary) when at least ``MIN_SOURCE_TOKENS`` are left, otherwise it and every
later source are dropped. The packed prompt never exceeds the window; when even the
prompt without sources does not fit, CONTEXT_LENGTH_EXCEEDED.
"""

from __future__ import annotations

import unicodedata
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
    tokens: int  # counted, or (when the count was skipped) ``token_bound``
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


#: Text to check a tokenizer against ``token_bound`` with: digits, punctuation, accents,
#: ligatures, CJK, Greek, an emoji and a character that compatibility normalisation
#: expands eighteen-fold.
CALIBRATION = (
    "Naïve café owners paid 3.14159 € (½ price) for the ﬁle — 東京, Ελληνικά, 😀, ﷺ; "
    "see https://example.org/a_b?c=1&d=2 or call +1-555-0100. ①②③ İstanbul ß"
)


def text_bound(text: str) -> int:
    """At most the tokens of ``text`` under a tokenizer whose every token stands for at
    least one byte of the text after normalisation: its UTF-8 bytes (ASCII: its length;
    otherwise after NFKD, the most expanding normalisation tokenizers apply), plus one
    for a prefix token (SentencePiece's leading space)."""
    if text.isascii():
        return len(text) + 1
    return len(unicodedata.normalize("NFKD", text).encode("utf-8")) + 1


def token_bound(messages: Messages, per_message: int) -> int:
    """At most the tokens of ``messages``: each one's ``text_bound`` plus ``per_message``
    for the chat template around it (the generation prompt included)."""
    return sum(text_bound(content) + per_message for _, content in messages)


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
    per_message: int | None = None,
) -> Packed:
    """Fit ``sources`` (rank order) into ``window`` tokens; see the module doc.
    ``per_message``: the template's tokens per message when the model's tokenizer keeps
    ``token_bound`` (no count when the bound fits); None: always count."""
    if sources:
        # The common case first: everything fits, one count (the prompt only grows with
        # sources, so the question alone fits too) or none.
        whole = build_messages(system_prompt, list(sources), history, question)
        if per_message is not None:
            bound = token_bound(whole, per_message)
            if bound <= window:
                return Packed(whole, bound, len(sources), ())
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
