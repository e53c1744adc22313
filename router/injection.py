"""Prompt-injection detection (OWASP LLM01), direct (in the question) and indirect (in a
retrieved passage): families of patterns over normalised text.

A text is flagged when any family matches; the result names the family (never the
matched text, which callers must not echo). The families:

- ``override``: an instruction to drop earlier instructions ("ignore / disregard /
  forget / override ... previous / system / above ... instructions / rules / prompt").
- ``role``: a new identity or mode for the model ("you are now ...", "from now on you
  ...", "act as an unrestricted ...", "developer mode", DAN, jailbreak).
- ``exfiltrate``: a request for the hidden prompt or for sending data somewhere
  ("reveal your system prompt", "repeat the text above", a markdown image URL with a
  query string, "send the conversation to ...").
- ``delimiter``: chat-template or section markers smuggled into text (``<|im_start|>``,
  ``[INST]``, ``### system:``, "end of context", "new instructions:").
- ``addressed``: a passage speaking to the model instead of the reader ("AI assistants
  reading this must ...", "note to the AI", "when answering, say ...", "respond only
  with ...").

Normalisation folds case, Unicode compatibility forms and zero-width characters, and
collapses whitespace, so spacing and look-alike tricks do not split a phrase. This is a
heuristic detector: its recall and false-positive rate on a labelled set are measured
by ``perf/guardrail_eval.py``; a model-based classifier would sit behind the same
``detect`` function.
"""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from collections import OrderedDict

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))

_VERB = (r"(?:ignore|disregard|forget|skip|bypass|override|overrule|neglect|drop|discard|"
         r"abandon|set aside|throw out|stop following|do not follow|don't follow|cancel)")
_WHAT = (r"(?:instructions?|rules?|directions?|prompts?|guidelines?|directives?|guardrails?|"
         r"constraints?|restrictions?|polic(?:y|ies)|programming|orders?|commands?|context|"
         r"safety (?:rules|guidelines|filters?)|system message)")
_WHOSE = (r"(?:previous|prior|above|earlier|preceding|former|original|initial|existing|"
          r"all|any|every|your|the|these|those|system|developer|safety|old|current)")

FAMILIES: dict[str, tuple[re.Pattern[str], ...]] = {
    "override": (
        re.compile(rf"\b{_VERB}\b(?:\W+\w+){{0,3}}?\W+{_WHOSE}\b(?:\W+\w+){{0,3}}?\W+{_WHAT}\b"),
        re.compile(rf"\b{_VERB}\b\W+(?:everything|all) (?:you were|you've been|you have been|"
                   r"i|we) (?:told|said|given|instructed)"),
        re.compile(rf"\b{_WHAT} (?:above|before this|so far) (?:are|is) (?:void|cancelled|"
                   r"obsolete|no longer valid|revoked|null)"),
        re.compile(r"\b(?:new|updated|real|actual|true) (?:system )?(?:instructions?|directives?|"
                   r"rules?|orders?)\s*(?::|follow|are|apply)"),
    ),
    "role": (
        re.compile(r"\byou are now (?:a |an |in |my |no longer |free|unrestricted|dan\b|"
                   r"jailbroken|evil|unfiltered|uncensored)"),
        re.compile(r"\bfrom now on,? (?:you|your|act|respond|answer|behave|pretend)"),
        re.compile(r"\b(?:act|behave|respond|answer) as (?:if you (?:were|are) )?(?:an? )?"
                   r"(?:unrestricted|unfiltered|uncensored|evil|jailbroken|rogue|different|"
                   r"ai without|assistant without|model without|dan\b)"),
        re.compile(r"\bpretend (?:that )?(?:to be|you are|you're|you have no)\b"),
        re.compile(r"\b(?:enable|enter|activate|switch (?:on|to)|turn on|go into|you are in|"
                   r"you're in|now in)\b(?:\W+\w+){0,2}?\W+(?:developer|god|debug|admin|sudo|"
                   r"maintenance|unrestricted) mode\b"),
        re.compile(r"\b(?:jailbreak|jailbroken|do anything now)\b"),
        re.compile(r"\bwithout (?:any )?(?:restrictions|filters|censorship|limitations|"
                   r"safety guidelines|rules)\b.{0,40}\b(?:answer|respond|reply|tell|act)"),
        re.compile(r"\b(?:answer|respond|reply|act)\b.{0,40}\bwithout (?:any )?(?:restrictions|"
                   r"filters|censorship|limitations|safety guidelines)\b"),
    ),
    "exfiltrate": (
        re.compile(r"\b(?:reveal|print|show|display|repeat|output|tell me|give me|leak|dump|"
                   r"recite|write out|spell out|share|disclose)\b(?:\W+\w+){0,4}?\W+(?:system|"
                   r"initial|hidden|secret|original|full|developer|internal)\W+(?:prompt|"
                   r"instructions?|message|rules|configuration)"),
        re.compile(r"\b(?:repeat|print|output|copy|echo)\b(?:\W+\w+){0,3}?\W+(?:text|words|"
                   r"everything|content|instructions)\W+(?:above|before|preceding|verbatim)"),
        re.compile(r"\bwhat (?:is|are|were) your (?:system |initial |original |hidden )"
                   r"(?:prompt|instructions)"),
        re.compile(r"!\[[^\]]*\]\(\s*https?://[^)\s]*\?[^)\s]*="),
        re.compile(r"\b(?:send|forward|post|upload|email|exfiltrate|transmit|leak)\b.{0,60}"
                   r"\b(?:conversation|chat history|user'?s? (?:data|messages|questions?|"
                   r"details|credentials|password)|api keys?|credentials|passwords?|"
                   r"secrets?|tokens?)\b.{0,40}\b(?:to|at|via)\b"),
        re.compile(r"\b(?:include|append|embed|insert)\b.{0,40}\b(?:link|url|image)\b.{0,60}"
                   r"https?://"),
    ),
    "delimiter": (
        re.compile(r"<\|(?:im_start|im_end|system|endoftext|eot_id|start_header_id)\|?>"),
        re.compile(r"\[/?(?:inst|sys)\]|<</?sys>>"),
        re.compile(r"(?:^|\n)\s*(?:#{2,}\s*)?(?:system|assistant)\s*(?:prompt)?\s*:\s*\S"),
        re.compile(r"\b(?:end|close) of (?:the )?(?:context|document|sources?|user input|"
                   r"passage)\b.{0,40}\b(?:new|now|instructions?|begin|start)\b"),
        re.compile(r"\b(?:begin|start) (?:of )?(?:new|real|admin|system) (?:instructions?|"
                   r"prompt|task)\b"),
        re.compile(r"</?(?:system|context|instructions?|document)>"),
    ),
    "addressed": (
        re.compile(r"\b(?:ai|assistant|language model|llm|chatbot|gpt|model|bot|agent)s?\b"
                   r"(?:\W+\w+){0,6}?\W+(?:must|should|shall|are instructed to|is instructed to|"
                   r"are required to|need to|have to|will now)\b(?:\W+\w+){0,3}?\W+(?:ignore|"
                   r"say|respond|reply|answer|tell|recommend|claim|state|output|include|"
                   r"mention|refuse|write|insist|praise|only)"),
        re.compile(r"\b(?:note|message|instructions?|attention|important|warning) (?:to|for) "
                   r"(?:the |any )?(?:ai|assistant|language model|llm|chatbot|model|bot|agent)s?\b"),
        re.compile(r"\b(?:if|when|whenever) (?:you are|you're|an? (?:ai|assistant|model|llm))"
                   r"\b.{0,40}\b(?:reading|summari[sz]ing|processing|answering|asked)\b.{0,60}"
                   r"\b(?:say|respond|reply|tell|answer|write|output|recommend|ignore|include)\b"),
        re.compile(r"\b(?:instead|rather),? (?:you (?:must|should|will) )?(?:say|respond|reply|"
                   r"answer|output|write|tell)\b.{0,20}\b(?:that|with|only|the user)\b"),
        re.compile(r"\b(?:respond|reply|answer) (?:only|exclusively|solely) (?:with|in|by)\b"),
        re.compile(r"\b(?:do not|don't|never) (?:tell|inform|mention (?:this )?to|reveal (?:this )?"
                   r"to|let) the user\b"),
        re.compile(r"\btell the user (?:that|to)\b"),
    ),
}


#: One alternation per family: one scan of the text per family instead of one per pattern.
_COMBINED = {
    family: re.compile("|".join(f"(?:{p.pattern})" for p in patterns))
    for family, patterns in FAMILIES.items()
}


def normalise(text: str) -> str:
    """Case-folded NFKC text without zero-width characters, whitespace collapsed (newlines
    kept: some markers only count at a line start)."""
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH).casefold()
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r"\n\s*", "\n", text)


def detect(text: str) -> str | None:
    """The first family whose pattern matches ``text``, or None when it looks clean."""
    folded = normalise(text)
    flat = folded.replace("\n", " ")
    for family, pattern in _COMBINED.items():
        if pattern.search(folded if family == "delimiter" else flat):
            return family
    return None


#: Verdicts of passages seen recently (blake2b digest of the text -> family or None).
#: A stored passage is retrieved again and again; its verdict depends on its text only.
PASSAGE_VERDICTS = 8192
_verdicts: OrderedDict[bytes, str | None] = OrderedDict()
_verdicts_lock = threading.Lock()


def detect_passage(text: str) -> str | None:
    """``detect`` for a retrieved passage, remembered per text (a bounded LRU of digests:
    ~0.2 ms of pattern scans per passage become ~2 us for one seen before)."""
    key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    with _verdicts_lock:
        if key in _verdicts:
            _verdicts.move_to_end(key)
            return _verdicts[key]
    verdict = detect(text)
    with _verdicts_lock:
        _verdicts[key] = verdict
        if len(_verdicts) > PASSAGE_VERDICTS:
            _verdicts.popitem(last=False)
    return verdict


def find(text: str) -> list[tuple[int, int]]:
    """Character ranges of ``text`` that matched (for redaction). Matching runs on the
    normalised text; when normalisation changed the length the whole text is the range."""
    folded = normalise(text)
    if len(folded) != len(text):
        return [(0, len(text))] if detect(text) else []
    flat = folded.replace("\n", " ")
    ranges = []
    for family, patterns in FAMILIES.items():
        for pattern in patterns:
            for m in pattern.finditer(folded if family == "delimiter" else flat):
                ranges.append((m.start(), m.end()))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged
