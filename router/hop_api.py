"""What a hop that calls other hops sees of them: domain types and the ``Upstream`` protocol.

The pipeline (and the search hop, for text queries) calls the embedding, search, rerank
and generation hops through one interface. ``server.upstream`` implements it twice: in
process (the embedded default: direct calls into the hop objects) and over gRPC (split
deployment, typed stubs with the process's TLS and token). Both raise
``router.errors`` with the upstream's status kept (an upstream RESOURCE_EXHAUSTED stays
RESOURCE_EXHAUSTED with its pushback; only a transport failure becomes UNAVAILABLE).

No grpc imports. Wire-level values the policy only passes through (a search filter, the
sampling parameters) travel as opaque objects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

DENSE, KEYWORD, HYBRID = "dense", "keyword", "hybrid"


@dataclass(frozen=True)
class HopTime:
    """One hop's timing in seconds (the wire's ``HopTiming`` carries microseconds)."""

    hop: str
    queue_s: float = 0.0
    compute_s: float = 0.0
    total_s: float = 0.0
    batch_size: int = 0


@dataclass(frozen=True)
class Embedded:
    """Vectors (an (n, dimension) float32 array) for the texts, and the "embed" timing."""

    vectors: Any
    timing: HopTime


@dataclass(frozen=True)
class SearchCall:
    """One search: by ``vector`` when given (dense), else by ``text``."""

    collection: str
    top_k: int
    mode: str = DENSE
    text: str = ""
    vector: Any = None
    #: The wire filter, passed through untouched (None: no filter).
    filter: Any = None
    #: Search tunables (candidates ...) passed through untouched (None: defaults).
    params: Any = None


@dataclass(frozen=True)
class Found:
    """A search hit with its payload."""

    id: str
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Searched:
    """Hits best first, and the search hop's timings (its own "embed" too, for text)."""

    hits: list[Found]
    timings: list[HopTime]


@dataclass(frozen=True)
class Ranked:
    """A reranked document: its index in the request and its score."""

    index: int
    score: float


@dataclass(frozen=True)
class Reranked:
    """Results best first and the "rerank" timing."""

    results: list[Ranked]
    timing: HopTime


@dataclass(frozen=True)
class GenerateCall:
    """A chat generation: ``messages`` as (role, content) pairs."""

    model: str
    messages: tuple[tuple[str, str], ...]
    #: The wire sampling parameters, passed through untouched (None: defaults).
    sampling: Any = None
    request_id: str = ""
    #: At most this many output tokens whatever ``sampling`` asks (0: no cap); the
    #: smaller tier's cap when the deadline budget picked it.
    max_tokens_cap: int = 0


@dataclass(frozen=True)
class Delta:
    """Generated text since the previous event."""

    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of a generation: why, token counts, the model that ran, its timing."""

    finish_reason: str  # "stop", "length", "abort"
    prompt_tokens: int
    completion_tokens: int
    model: str
    timing: HopTime
    ttft_s: float = 0.0


@dataclass(frozen=True)
class TokenCount:
    """Prompt tokens after the chat template, and the model's context size."""

    tokens: int
    max_context_tokens: int


class Upstream(Protocol):
    """The four hops as a caller sees them. ``deadline`` is a ``time.monotonic()``
    instant (None: the upstream layer's default timeout)."""

    async def embed(self, texts: Sequence[str], *, deadline: float | None) -> Embedded:
        """Vectors for ``texts`` (not normalised, as the search hop embeds queries)."""

    async def search(self, call: SearchCall, *, deadline: float | None) -> Searched:
        """One search with payloads."""

    async def collection_version(self, name: str, *, deadline: float | None) -> int:
        """The collection's version (changes on every write to it)."""

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int, *, deadline: float | None
    ) -> Reranked:
        """Documents reordered for the query, best first, the first ``top_n`` (0: all)."""

    def generate(
        self, call: GenerateCall, *, deadline: float | None
    ) -> AsyncIterator[Delta | Finished]:
        """Stream deltas, then one ``Finished``; closing the iterator cancels the call."""

    async def count_tokens(
        self, model: str, messages: Sequence[tuple[str, str]], *, deadline: float | None
    ) -> TokenCount:
        """Tokens of ``messages`` under ``model``'s chat template."""
