"""The ``Reranker`` protocol and the pure helpers every rerank engine shares.

A rerank request goes through three steps, the middle one batched across requests:

1. ``prepare`` (blocking, cheap): tokenize the query and documents, apply the truncation
   policy, and turn the request into batcher items with their token costs;
2. ``run_batch`` (blocking, the model): handed to the one ``router.batcher.DynamicBatcher``,
   which packs items of concurrent requests into batches under a token budget;
3. ``finish`` (blocking, cheap): turn one request's item outputs into one score per document.

Invariant every engine keeps: a document's score is a function of (query, document) alone.
It never depends on the other items that shared a batch (padding is masked, nothing is
normalised across a batch or a request), so a score through the server equals the score
of the same pair computed alone in-process, up to float rounding.

Truncation policy (one for every engine): a pair is the query, the document and the
special tokens of a pair. When it is longer than the engine's window, the query keeps at
most half of the window's content tokens and the document is cut to fill the rest.

No grpc imports: this module is policy, unit-tested without a network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from router.errors import MAX_MODEL_NAME_CHARS, check_name_length
from server.errors import InvalidArgument, NotFound

#: Truncation policies, as in the proto's TruncationPolicy (UNSPECIFIED means TRUNCATE).
TRUNCATE = "truncate"
REJECT = "reject"


def apply_torch_threads(threads: int) -> None:
    """``rerank.threads``: torch's intra-op threads for this process (0 leaves torch's
    default)."""
    if threads < 0:
        from server.config import ConfigError

        raise ConfigError(f"rerank.threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


@dataclass(frozen=True)
class RerankLimits:
    """Input limits of one rerank request, checked before any work."""

    max_documents: int = 1000
    max_text_chars: int = 8192


@dataclass(frozen=True)
class PairPlan:
    """How many content tokens of a query and of a document a pair keeps."""

    query_keep: int
    doc_keep: int
    #: True when either side lost tokens.
    truncated: bool


def plan_pair(query_tokens: int, doc_tokens: int, window: int, special_tokens: int) -> PairPlan:
    """Fit a pair into ``window`` tokens by the stated policy.

    ``query_tokens``/``doc_tokens`` count content tokens (no special tokens);
    ``special_tokens`` is what the model adds around a pair. The query keeps at most half
    of the content budget; the document fills what the query left.
    """
    budget = window - special_tokens
    if budget < 2:
        raise ValueError(f"window {window} leaves no room for a pair")
    query_keep = min(query_tokens, budget // 2)
    doc_keep = min(doc_tokens, budget - query_keep)
    return PairPlan(
        query_keep=query_keep,
        doc_keep=doc_keep,
        truncated=query_keep < query_tokens or doc_keep < doc_tokens,
    )


def cut_encoding(encoding: Any, keep: int) -> Any:
    """A tokenizers ``Encoding`` cut to its first ``keep`` tokens (the input is untouched)."""
    if keep >= len(encoding.ids):
        return encoding
    cut = encoding.merge([encoding])  # a copy: truncate works in place
    cut.truncate(keep)
    return cut


@dataclass
class Prepared:
    """One request, tokenized and truncated, ready for the batcher.

    ``items`` and ``costs`` go to ``DynamicBatcher.submit``; ``finish`` gets this object
    back with the outputs. ``state`` is the engine's own (e.g. cached document vectors).
    """

    items: list[Any]
    costs: list[int]
    #: Per document: was its pair truncated.
    truncated: list[bool]
    #: Per document: tokens of the pair as scored (query + document + special tokens).
    pair_tokens: list[int]
    state: Any = None

    @property
    def truncated_pairs(self) -> int:
        """Number of documents whose pair was truncated."""
        return sum(self.truncated)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of every scored pair, summed (the proto's Usage.prompt_tokens)."""
        return sum(self.pair_tokens)


@runtime_checkable
class Reranker(Protocol):
    """A rerank engine: scores (query, document) pairs, batch-invariantly.

    ``prepare`` and ``finish`` may run concurrently in several threads; ``run_batch`` runs
    in the batcher's single worker thread.
    """

    #: The reranker's name, reported in RerankResponse.model.
    name: str
    #: Longest pair in tokens, special tokens included.
    window: int

    def prepare(self, query: str, documents: Sequence[str]) -> Prepared:
        """Tokenize and truncate one request into batcher items (blocking)."""

    def run_batch(self, payloads: list[Any]) -> list[Any]:
        """Run one batch of items through the model (blocking); one output per item."""

    def finish(self, prepared: Prepared, outputs: list[Any]) -> list[float]:
        """One score per document of ``prepared`` from its items' outputs (blocking)."""

    def close(self) -> None:
        """Release the model."""


class RerankerBase:
    """The registry's class-level calls with their defaults; rerank engines subclass it
    (and build themselves with ``from_config(RerankConfig)``)."""

    @classmethod
    def unavailable_reason(cls, settings: Any) -> str | None:
        """Default: the engine runs anywhere its module imports."""
        return None

    def close(self) -> None:
        """Default: nothing to release."""


@dataclass(frozen=True)
class RankedDocument:
    """One document of a rerank answer."""

    #: Position in the request's documents.
    index: int
    score: float
    truncated: bool


@dataclass(frozen=True)
class RerankOutcome:
    """A rerank answer in domain terms (the servicer turns it into a RerankResponse)."""

    results: list[RankedDocument]
    model: str
    truncated_pairs: int
    prompt_tokens: int
    # Timings, seconds.
    queue_s: float = 0.0
    compute_s: float = 0.0
    total_s: float = 0.0
    batch_size: int = 1


def validate_request(
    query: str,
    documents: Sequence[str],
    top_n: int,
    limits: RerankLimits,
    *,
    model: str = "",
    served_model: str = "",
) -> None:
    """Reject a bad request before any work, with the contract's reason.

    Counts are checked before anything is iterated, so 100,000 documents cost nothing.
    """
    if model and model != served_model:
        check_name_length(model, "model", MAX_MODEL_NAME_CHARS)
        raise NotFound(
            "the reranker is not served here",
            reason="MODEL_NOT_FOUND",
            metadata={"model": model, "served": served_model},
        )
    if not query or not query.strip():
        raise InvalidArgument("query is empty", reason="EMPTY_INPUT", metadata={"field": "query"})
    if len(documents) == 0:
        raise InvalidArgument(
            "no documents to rerank", reason="EMPTY_INPUT", metadata={"field": "documents"}
        )
    if len(documents) > limits.max_documents:
        raise InvalidArgument(
            f"{len(documents)} documents, at most {limits.max_documents} allowed",
            reason="TOO_MANY_INPUTS",
            metadata={"documents": len(documents), "max_documents": limits.max_documents},
        )
    if top_n < 0 or top_n > len(documents):
        raise InvalidArgument(
            f"top_n {top_n} is larger than the {len(documents)} documents",
            reason="INVALID_TOP_K",
            metadata={"top_n": top_n, "documents": len(documents)},
        )
    if len(query) > limits.max_text_chars:
        raise InvalidArgument(
            f"query has {len(query)} characters, at most {limits.max_text_chars} allowed",
            reason="INPUT_TOO_LARGE",
            metadata={"field": "query", "max_text_chars": limits.max_text_chars},
        )
    for i, doc in enumerate(documents):
        if len(doc) > limits.max_text_chars:
            raise InvalidArgument(
                f"document {i} has {len(doc)} characters, at most {limits.max_text_chars} allowed",
                reason="INPUT_TOO_LARGE",
                metadata={"field": "documents", "index": i, "max_text_chars": limits.max_text_chars},
            )


def enforce_truncation_policy(prepared: Prepared, policy: str, window: int) -> None:
    """Under the REJECT policy, refuse a request with any truncated pair (before compute)."""
    if policy != REJECT or not prepared.truncated_pairs:
        return
    first = prepared.truncated.index(True)
    raise InvalidArgument(
        f"query and document {first} do not fit the reranker's {window}-token window",
        reason="INPUT_TOO_LARGE",
        metadata={"index": first, "window": window, "truncated_pairs": prepared.truncated_pairs},
    )


def rank(scores: Sequence[float], truncated: Sequence[bool], top_n: int) -> list[RankedDocument]:
    """Documents best first (ties keep input order); the first ``top_n`` (0: all).

    A NaN score (a broken model) sorts last rather than poisoning the order.
    """
    if len(scores) != len(truncated):
        raise ValueError("one score per document")
    key = [(-s if not math.isnan(s) else math.inf) for s in scores]
    order = sorted(range(len(scores)), key=key.__getitem__)  # stable: ties keep input order
    if top_n:
        order = order[:top_n]
    return [RankedDocument(index=i, score=float(scores[i]), truncated=bool(truncated[i])) for i in order]


def score_in_process(
    engine: Reranker, query: str, documents: Sequence[str], batch_size: int = 1
) -> list[float]:
    """Score without the batcher: items through ``run_batch`` ``batch_size`` at a time.

    The reference the batching tests and the benchmark compare the server with.
    """
    prepared = engine.prepare(query, documents)
    outputs: list[Any] = []
    for start in range(0, len(prepared.items), batch_size):
        outputs.extend(engine.run_batch(prepared.items[start : start + batch_size]))
    return engine.finish(prepared, outputs)
