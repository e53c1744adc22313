"""The pipeline's semantic answer cache: exact match, then cosine over the query embedding,
guarded against near-miss paraphrases.

Entries live in partitions: one partition per (collection, collection version, filter,
model, system prompt, sampling, retrieval settings, history) — the caller builds the key
(``partition_key``). A write to the collection changes its version, so every entry made
before it is unreachable (and ages out by LRU/TTL). Within a partition a lookup tries the
normalised question exactly, then the entry whose query vector has the highest cosine
with the new one, accepted only when it is >= the threshold AND ``lexically_compatible``
says the two questions do not differ in a number, a negation or a substituted content
word (the "capital of France" / "capital of Germany" case, which embeddings put close).

Bounded by entries and bytes (least recently used evicted first) and by age (TTL).
Only complete answers are stored (the pipeline's rule). Counters: hits (exact,
semantic), misses, guard rejections, evictions. No grpc imports; injectable clock.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NEGATIONS = frozenset({
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "cannot",
    "without", "isn't", "aren't", "wasn't", "weren't", "don't", "doesn't", "didn't",
    "can't", "won't", "shouldn't", "wouldn't", "couldn't", "hasn't", "haven't", "unsafe",
})
NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
    "eighty ninety hundred thousand million billion first second third fourth fifth half "
    "double twice once".split()
)
STOPWORDS = frozenset(
    "a an the is are was were be been being am do does did of in on at to for from by "
    "with about as into over under and or but if then so than that this these those it "
    "its it's what what's whats which who whom whose when where why how i me my we our you "
    "your he she they them their his her there here can could should would will shall may "
    "might must please tell explain describe give list s much many some any all exactly "
    "really actually".split()
)
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass(frozen=True)
class CacheSettings:
    """Bounds and matching of the cache."""

    enabled: bool = True
    max_entries: int = 1024
    max_bytes: int = 32 * 1024 * 1024
    ttl_s: float = 3600.0
    #: Cosine between query embeddings at or above which a paraphrase may hit.
    threshold: float = 0.8


@dataclass
class CacheStats:
    """Counters (exported as metrics by the server layer)."""

    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    guard_rejections: int = 0
    evictions: int = 0


@dataclass
class Entry:
    """One cached answer: what to replay, and what it was stored for."""

    partition: str
    question: str
    vector: np.ndarray | None
    value: Any
    size: int
    stored_at: float
    key: tuple[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.partition, normalise(self.question))


def normalise(question: str) -> str:
    """The form exact matching compares: lower case, single spaces, no end punctuation."""
    return " ".join(question.lower().split()).strip(" ?!.")


def partition_key(*parts: object) -> str:
    """A stable key for the parts a hit must share (collection, version, filter, ...)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def _stem(word: str) -> str:
    for suffix in ("'s", "ies", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def _features(text: str) -> tuple[frozenset[str], bool, frozenset[str]]:
    """(numbers, negated, content words) of a question."""
    words = [w.lower() for w in _TOKEN.findall(text)]
    numbers = frozenset(w for w in words if w[0].isdigit() or w in NUMBER_WORDS)
    negated = any(w in NEGATIONS or w.endswith("n't") for w in words)
    content = frozenset(
        _stem(w) for w in words
        if w not in STOPWORDS and w not in NEGATIONS and w not in numbers and len(w) > 1
    )
    return numbers, negated, content


def lexically_compatible(a: str, b: str) -> bool:
    """False when ``a`` and ``b`` differ in a number, in negation, or by a substituted
    content word (each has a content word the other lacks). Adding or dropping words on
    one side only ("capital" / "capital city") stays compatible."""
    num_a, neg_a, words_a = _features(a)
    num_b, neg_b, words_b = _features(b)
    if num_a != num_b or neg_a != neg_b:
        return False
    return not (words_a - words_b and words_b - words_a)


class SemanticCache:
    """See the module doc."""

    def __init__(
        self, settings: CacheSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or CacheSettings()
        self.stats = CacheStats()
        self._clock = clock
        self._lru: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def bytes(self) -> int:
        """Bytes held (as the entries' sizes were given)."""
        return self._bytes

    def _fresh(self, entry: Entry) -> bool:
        if self._clock() - entry.stored_at <= self.settings.ttl_s:
            return True
        self._drop(entry.key)
        return False

    def lookup_exact(self, partition: str, question: str) -> Entry | None:
        """The entry of this exact (normalised) question, or None (not counted as a miss:
        a semantic lookup may follow)."""
        entry = self._lru.get((partition, normalise(question)))
        if entry is None or not self._fresh(entry):
            return None
        self._lru.move_to_end(entry.key)
        self.stats.exact_hits += 1
        return entry

    def lookup_semantic(self, partition: str, question: str, vector: np.ndarray) -> Entry | None:
        """The closest entry of the partition when it passes threshold and guard."""
        query = _unit(vector)
        best, best_score = None, -1.0
        for entry in list(self._lru.values()):
            if entry.partition != partition or entry.vector is None or not self._fresh(entry):
                continue
            score = float(np.dot(entry.vector, query))
            if score > best_score:
                best, best_score = entry, score
        if best is None or best_score < self.settings.threshold:
            self.stats.misses += 1
            return None
        if not lexically_compatible(best.question, question):
            self.stats.guard_rejections += 1
            self.stats.misses += 1
            return None
        self._lru.move_to_end(best.key)
        self.stats.semantic_hits += 1
        return best

    def store(
        self, partition: str, question: str, vector: np.ndarray | None, value: Any, size: int
    ) -> None:
        """Keep ``value`` (``size`` bytes) for this question; evict to stay in bounds."""
        if size > self.settings.max_bytes or self.settings.max_entries <= 0:
            return
        entry = Entry(partition, question, None if vector is None else _unit(vector), value,
                      size, self._clock())
        self._drop(entry.key)
        self._lru[entry.key] = entry
        self._bytes += size
        while len(self._lru) > self.settings.max_entries or self._bytes > self.settings.max_bytes:
            oldest = next(iter(self._lru))
            self._drop(oldest)
            self.stats.evictions += 1

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._lru.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size


def _unit(vector: Any) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).ravel()
    return v / max(float(np.linalg.norm(v)), 1e-12)
