"""Which RPCs the router may send twice (retry or hedge), from the proto comments.

Reads are idempotent. Writes that replace by id are too: UpsertBatch ("insert-or-replace
one small batch by id") and Delete ("deletes points by id; unknown ids are ignored"),
since running them twice leaves the same state. CreateCollection / DeleteCollection
answer differently the second time (ALREADY_EXISTS / NOT_FOUND), Abort too, and streams
are never replayed: the router does not buffer a caller's request stream. Generate is a
server stream: it may be retried or hedged only until its first message has been sent to
the caller (``STREAM_UNTIL_FIRST_MESSAGE``); never after.
"""

from __future__ import annotations

IDEMPOTENT: frozenset[tuple[str, str]] = frozenset({
    ("backbone.v1.EmbeddingService", "Embed"),
    ("backbone.v1.VectorSearchService", "Search"),
    ("backbone.v1.VectorSearchService", "SearchBatch"),
    ("backbone.v1.VectorSearchService", "Get"),
    ("backbone.v1.VectorSearchService", "DescribeCollection"),
    ("backbone.v1.VectorSearchService", "ListCollections"),
    ("backbone.v1.VectorSearchService", "UpsertBatch"),
    ("backbone.v1.VectorSearchService", "Delete"),
    ("backbone.v1.RerankService", "Rerank"),
    ("backbone.v1.GenerationService", "ListModels"),
    ("backbone.v1.GenerationService", "CountTokens"),
})

#: Server-streaming methods that may be retried or hedged before their first message.
STREAM_UNTIL_FIRST_MESSAGE: frozenset[tuple[str, str]] = frozenset({
    ("backbone.v1.GenerationService", "Generate"),
})

#: Reads among IDEMPOTENT: the only ones hedged (a hedged write doubles the write load
#: for nothing; a retried one after a failure is fine).
HEDGEABLE: frozenset[tuple[str, str]] = IDEMPOTENT - {
    ("backbone.v1.VectorSearchService", "UpsertBatch"),
    ("backbone.v1.VectorSearchService", "Delete"),
}


def is_idempotent(service: str, method: str) -> bool:
    """True when the unary ``service/method`` may run twice."""
    return (service, method) in IDEMPOTENT


def may_replay_before_first_message(service: str, method: str) -> bool:
    """True when a server stream may be restarted elsewhere until it has yielded."""
    return (service, method) in STREAM_UNTIL_FIRST_MESSAGE


def is_hedgeable(service: str, method: str) -> bool:
    """True when a slow first attempt may be raced by a second one."""
    return (service, method) in HEDGEABLE or (service, method) in STREAM_UNTIL_FIRST_MESSAGE
