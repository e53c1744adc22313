"""PII recognizers: a pattern finds candidates, a validator keeps only real ones.

Kinds: ``email``, ``phone`` (Google's libphonenumber rules through ``phonenumbers``: a
valid number for its region, international with ``+`` or national for the default
region), ``credit_card`` (13-19 digits, a known issuer prefix, Luhn), ``iban`` (the
country's length and the ISO 13616 mod-97 checksum, ``python-stdnum``), ``ip_address``
(IPv4 and IPv6, parsed by ``ipaddress``), ``us_ssn`` (area not 000/666/9xx, group not
00, serial not 0000, ``python-stdnum``; written with separators, or bare next to the
words "SSN"/"social security").

Presidio was tried first: it installs from PyPI, but its analyzer needs a spaCy model
(``en_core_web_lg``) that it downloads at start-up and that no registry carries from its
publisher, so it cannot run offline here. These recognizers cover the same pattern
entities (Presidio's own recognizers for them are also regex + checksum).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import phonenumbers
from stdnum import iban as std_iban
from stdnum import luhn
from stdnum.us import ssn as std_ssn

PII_KINDS = ("email", "phone", "credit_card", "iban", "ip_address", "us_ssn")
#: When two candidates overlap, the earlier kind here wins (a card number is not a phone).
PRIORITY = ("email", "iban", "credit_card", "us_ssn", "ip_address", "phone")


@dataclass(frozen=True)
class Span:
    """One detected PII value: its kind and ``text[start:end]``."""

    kind: str
    start: int
    end: int


_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3[068]|35|6011|64[4-9]|65|62)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ ]?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]|\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?(?![0-9A-Fa-f:])")
_SSN = re.compile(r"(?<![\d-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\d-])")
_SSN_BARE = re.compile(r"(?<!\d)\d{9}(?!\d)")
_SSN_CONTEXT = re.compile(r"\b(?:ssn|social security|ss#|ss no)\b", re.IGNORECASE)


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _emails(text: str) -> list[Span]:
    return [Span("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]


def _cards(text: str) -> list[Span]:
    out = []
    for m in _CARD.finditer(text):
        digits = _digits(m.group())
        # Mixed separators ("1234-5678 9012") are not how cards are written.
        seps = {c for c in m.group() if not c.isdigit()}
        if len(seps) <= 1 and _CARD_PREFIX.match(digits) and luhn.is_valid(digits):
            out.append(Span("credit_card", m.start(), m.end()))
    return out


def _ibans(text: str) -> list[Span]:
    out = []
    for m in _IBAN.finditer(text):
        value = m.group()
        # Back off trailing groups until a valid IBAN remains (the pattern is greedy and
        # may swallow a following word).
        for end in range(len(value), 14, -1):
            candidate = value[:end].rstrip()
            if std_iban.is_valid(candidate.upper()):
                out.append(Span("iban", m.start(), m.start() + len(candidate)))
                break
    return out


def _ips(text: str) -> list[Span]:
    out = []
    for m in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        out.append(Span("ip_address", m.start(), m.end()))
    for m in _IPV6.finditer(text):
        value = m.group()
        groups = [g for g in value.split("%")[0].split(":") if g]
        # "a::b"-like scraps and clock times are not addresses worth a redaction.
        if len(groups) < 3 and "::" not in value or len(groups) < 2:
            continue
        try:
            ipaddress.IPv6Address(value.split("%")[0])
        except ValueError:
            continue
        out.append(Span("ip_address", m.start(), m.end()))
    return out


def _ssn_valid(digits: str) -> bool:
    return std_ssn.is_valid(digits)


def _ssns(text: str) -> list[Span]:
    out = [
        Span("us_ssn", m.start(), m.end())
        for m in _SSN.finditer(text) if _ssn_valid(m.group(1) + m.group(3) + m.group(4))
    ]
    if _SSN_CONTEXT.search(text):
        out += [
            Span("us_ssn", m.start(), m.end())
            for m in _SSN_BARE.finditer(text) if _ssn_valid(m.group())
        ]
    return out


_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{1,4}){1,5}(?![\w-])"
)


def _phones(text: str, region: str) -> list[Span]:
    # Candidates by pattern, each validated by libphonenumber (its own text matcher gives
    # up on a number followed by a citation like "[1]").
    out = []
    for m in _PHONE.finditer(text):
        digits = _digits(m.group())
        if not 7 <= len(digits) <= 15:
            continue
        try:
            number = phonenumbers.parse(m.group(), region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            out.append(Span("phone", m.start(), m.end()))
    return out


_FINDERS = {
    "email": lambda text, region: _emails(text),
    "credit_card": lambda text, region: _cards(text),
    "iban": lambda text, region: _ibans(text),
    "ip_address": lambda text, region: _ips(text),
    "us_ssn": lambda text, region: _ssns(text),
    "phone": _phones,
}


def find_pii(text: str, kinds: tuple[str, ...] = PII_KINDS, region: str = "US") -> list[Span]:
    """Every PII value of ``kinds`` in ``text``, in text order, without overlaps (the
    kind earlier in ``PRIORITY`` wins an overlap)."""
    candidates = [
        span for kind in PRIORITY if kind in kinds for span in _FINDERS[kind](text, region)
    ]
    taken: list[Span] = []
    for span in candidates:  # priority order: keep a span unless a kept one overlaps it
        if all(span.end <= t.start or span.start >= t.end for t in taken):
            taken.append(span)
    return sorted(taken, key=lambda s: s.start)


def placeholder(kind: str) -> str:
    """What a redacted value of ``kind`` is replaced with, e.g. ``<EMAIL>``."""
    return f"<{kind.upper()}>"


def redact(text: str, spans: list[Span]) -> str:
    """``text`` with every span (sorted, non-overlapping) replaced by its placeholder."""
    out, at = [], 0
    for span in spans:
        out.append(text[at : span.start])
        out.append(placeholder(span.kind))
        at = span.end
    out.append(text[at:])
    return "".join(out)
