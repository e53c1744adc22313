"""Guardrails of the Answer path: PII on the question and the answer, prompt injection on
the question and on every retrieved passage. Plain Python, no grpc.

Detectors: the PII kinds of ``router.pii`` (``email``, ``phone``, ``credit_card``,
``iban``, ``ip_address``, ``us_ssn``) and ``prompt_injection`` (``router.injection``).
Each has a policy:

- ``off``: not run;
- ``flag``: run and reported in the final message, the text left as it is;
- ``redact``: the matched values replaced by a placeholder (``<EMAIL>``, ...) before the
  text goes on (question: before retrieval and the prompt; answer: in the stream);
- ``block``: the request ends with ``GUARDRAIL_BLOCKED`` naming the detector
  (``INVALID_ARGUMENT`` for the question, ``FAILED_PRECONDITION`` for an answer that
  would carry it); the matched text is never echoed.

A retrieved passage flagged by ``prompt_injection`` (any policy but ``off``) is dropped:
it never reaches the prompt and the final message reports its id and the detector.

Settings come from ``[pipeline.guardrails]`` (a table: a detector name, or ``pii`` for
every PII kind, mapped to a policy; ``answer`` / ``passages`` switch those checks;
``phone_region``; ``overrides`` whether requests may change policies) and a request's
override (the same keys). Nothing here logs text unless ``log_text`` is set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from router import injection, pii
from router.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

POLICIES = ("off", "flag", "redact", "block")
INJECTION = "prompt_injection"
DETECTORS = (*pii.PII_KINDS, INJECTION)
DEFAULT_POLICIES: Mapping[str, str] = {**dict.fromkeys(pii.PII_KINDS, "redact"), INJECTION: "block"}
REASON = "GUARDRAIL_BLOCKED"
#: The redactor never holds back more than this many characters of an answer.
MAX_HOLD_CHARS = 96


@dataclass(frozen=True)
class GuardrailSettings:
    """Policies per detector and which checks run."""

    policies: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    answer: bool = True
    passages: bool = True
    phone_region: str = "US"
    overrides: bool = True

    def policy(self, detector: str) -> str:
        """The policy of ``detector``."""
        return self.policies.get(detector, "off")

    def with_overrides(self, overrides: Mapping[str, str]) -> GuardrailSettings:
        """These settings with a request's policies (``pii`` = every PII kind) on top;
        INVALID_ARGUMENT for an unknown detector or policy, or when overrides are off."""
        if not overrides:
            return self
        if not self.overrides:
            raise InvalidArgument(
                "guardrail overrides are disabled on this server", metadata={"field": "guardrails"}
            )
        try:
            policies = _policies(overrides, dict(self.policies))
        except ValueError as exc:
            raise InvalidArgument(str(exc), metadata={"field": "guardrails"}) from exc
        return replace(self, policies=policies)


def _policies(values: Mapping[str, Any], base: dict[str, str]) -> dict[str, str]:
    out = dict(base)
    items = sorted(values.items(), key=lambda kv: kv[0] != "pii")  # "pii" first, kinds refine
    for key, policy in items:
        if key != "pii" and key not in DETECTORS:
            raise ValueError(f"unknown guardrail detector {str(key)[:64]!r} "
                             f"(one of pii, {', '.join(DETECTORS)})")
        if policy not in POLICIES:
            raise ValueError(f"guardrail policy for {key} must be one of {', '.join(POLICIES)}")
        for name in pii.PII_KINDS if key == "pii" else (key,):
            out[name] = policy
    return out


def settings_from(value: Any) -> GuardrailSettings:
    """``[pipeline.guardrails]`` (a table, or the same as a JSON string) as settings;
    ValueError when a key or a policy is unknown."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not isinstance(value, Mapping):
        raise ValueError("pipeline.guardrails must be a table")
    values = dict(value)
    flags = {}
    for key, typ in (("answer", bool), ("passages", bool), ("overrides", bool), ("phone_region", str)):
        if key in values:
            flags[key] = values.pop(key)
            if not isinstance(flags[key], typ):
                raise ValueError(f"pipeline.guardrails.{key} must be a {typ.__name__}")
    return GuardrailSettings(policies=_policies(values, dict(DEFAULT_POLICIES)), **flags)


@dataclass(frozen=True)
class Finding:
    """What a guardrail did: detector, where (question, passage, answer), the action
    (flagged, redacted, dropped), how many values, and the passage id for a passage."""

    detector: str
    target: str
    action: str
    count: int = 1
    source_id: str = ""


class Screen:
    """One request's guardrails: screens its question, passages and answer stream and
    collects the findings for the final message."""

    def __init__(self, settings: GuardrailSettings, log_text: bool = False) -> None:
        self.settings = settings
        self.log_text = log_text
        self.findings: list[Finding] = []
        self._pii = tuple(k for k in pii.PII_KINDS if settings.policy(k) != "off")

    def _note(self, finding: Finding) -> None:
        self.findings.append(finding)
        log.debug("guardrail %s %s in the %s", finding.detector, finding.action, finding.target)

    def _block(self, detector: str, target: str) -> None:
        error = InvalidArgument if target == "question" else FailedPrecondition
        log.info("guardrail %s blocked the request (%s)", detector, target)
        raise error(
            f"the {target} was blocked by the {detector} guardrail",
            reason=REASON, metadata={"detector": detector, "target": target},
        )

    def question(self, text: str) -> str:
        """The question as it may go on (redacted where the policy says), raising
        GUARDRAIL_BLOCKED (INVALID_ARGUMENT) when a blocking detector fires."""
        policy = self.settings.policy(INJECTION)
        if policy != "off" and injection.detect(text) is not None:
            if policy == "block":
                self._block(INJECTION, "question")
            if policy == "redact":
                text = _cut(text, injection.find(text), "<REMOVED>")
            self._note(Finding(INJECTION, "question", "redacted" if policy == "redact" else "flagged"))
        return self._pii_text(text, "question")

    def _pii_text(self, text: str, target: str) -> str:
        spans = pii.find_pii(text, self._pii, self.settings.phone_region) if self._pii else []
        if not spans:
            return text
        for span in spans:
            if self.settings.policy(span.kind) == "block":
                self._block(span.kind, target)
        if self.log_text:
            log.debug("guardrail matches in the %s: %r", target, [text[s.start:s.end] for s in spans])
        redacted = [s for s in spans if self.settings.policy(s.kind) == "redact"]
        for kind in dict.fromkeys(s.kind for s in spans):
            n = sum(1 for s in spans if s.kind == kind)
            action = "redacted" if self.settings.policy(kind) == "redact" else "flagged"
            self._note(Finding(kind, target, action, n))
        return pii.redact(text, redacted)

    def passages(self, sources: Iterable[Any]) -> list[Any]:
        """The sources (anything with ``id`` and ``text``) minus those carrying injected
        instructions; each dropped one is a finding."""
        sources = list(sources)
        if not self.settings.passages or self.settings.policy(INJECTION) == "off":
            return sources
        kept = []
        for source in sources:
            family = injection.detect_passage(source.text)
            if family is None:
                kept.append(source)
            else:
                self._note(Finding(INJECTION, "passage", "dropped", source_id=source.id))
        return kept

    def answer_stream(self) -> AnswerRedactor | None:
        """A redactor for the answer's deltas, or None when no PII check runs on it."""
        if not self.settings.answer or not self._pii:
            return None
        return AnswerRedactor(self)


class AnswerRedactor:
    """PII redaction across delta boundaries: text that could still be the beginning of
    a PII value (the last unfinished word, and a run of words with digits, ``@``, ``:``
    or ``+`` or short capitals before it, e.g. ``jane.doe@exa`` | ``mple.com`` or
    ``4111 1111`` | `` 1111 1111``) is held back until it is settled or the stream ends;
    at most ``MAX_HOLD_CHARS`` are held. Ordinary prose passes with one word of delay."""

    def __init__(self, screen: Screen) -> None:
        self.screen = screen
        self.pending = ""
        self.counts: dict[str, int] = {}

    def feed(self, delta: str) -> str:
        """The text that can be sent now for ``delta`` (possibly empty)."""
        self.pending += delta
        cut = _settled(self.pending)
        if len(self.pending) - cut > MAX_HOLD_CHARS:
            cut = len(self.pending) - MAX_HOLD_CHARS
        if cut <= 0:
            return ""
        spans = self._spans(self.pending)
        for span in spans:  # a value across the cut stays whole on the held side
            if span.start < cut < span.end:
                cut = span.start
        return self._release(cut, [s for s in spans if s.end <= cut])

    def flush(self) -> str:
        """Everything still held, redacted (the end of the stream)."""
        return self._release(len(self.pending), self._spans(self.pending))

    def _spans(self, text: str) -> list[pii.Span]:
        s = self.screen
        return pii.find_pii(text, s._pii, s.settings.phone_region)

    def _release(self, cut: int, spans: list[pii.Span]) -> str:
        head, self.pending = self.pending[:cut], self.pending[cut:]
        if not spans:
            return head
        policies = self.screen.settings
        for span in spans:
            if policies.policy(span.kind) == "block":
                self.screen._block(span.kind, "answer")
            self.counts[span.kind] = self.counts.get(span.kind, 0) + 1
        return pii.redact(head, [s for s in spans if policies.policy(s.kind) == "redact"])

    def report(self) -> None:
        """Add the answer's findings to the screen (call once, after ``flush``)."""
        for kind, n in self.counts.items():
            action = "redacted" if self.screen.settings.policy(kind) == "redact" else "flagged"
            self.screen._note(Finding(kind, "answer", action, n))


def _suspect(word: str) -> bool:
    """Could this finished word be part of a PII value that goes on after it?"""
    return any(c.isdigit() or c in "@:+()" for c in word) or (
        word.isalnum() and word.isupper() and len(word) <= 4
    )


def _settled(text: str) -> int:
    """Length of the prefix of ``text`` that no PII value still being written reaches
    into: everything before the trailing run of suspect words and the unfinished one."""
    end = len(text)
    if end and not text[-1].isspace():  # the unfinished last word is always held
        end = max(text.rfind(c) for c in " \t\n") + 1
    while end > 0:
        start = max(text.rfind(c, 0, end - 1) for c in " \t\n") + 1
        word = text[start:end].strip()
        if word and not _suspect(word):
            return end
        end = start
    return 0


def _cut(text: str, ranges: list[tuple[int, int]], marker: str) -> str:
    out, at = [], 0
    for start, end in ranges:
        out.append(text[at:start])
        out.append(marker)
        at = end
    out.append(text[at:])
    return "".join(out)
