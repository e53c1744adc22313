"""What the search hop needs from a vector store, and the one place that picks it.

Two backends satisfy :class:`CollectionStore` / :class:`StoredCollection`:

* ``faiss`` (the embedded default): :class:`retrieval.manager.CollectionManager` over
  ``retrieval.collection.Collection`` (FAISS + BM25, write-ahead log, snapshots);
* ``milvus``: :class:`retrieval.milvus_store.MilvusStore`, collections in a Milvus
  server reached with pymilvus (Milvus Distributed / Standalone in production,
  milvus-lite in the tests).

Every method is blocking; the hop runs them in its reader / writer threads. Errors are
``retrieval.errors`` (NOT_FOUND / COLLECTION_NOT_FOUND for an unknown collection,
FAILED_PRECONDITION for a feature a backend does not offer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from retrieval.collection import CollectionStats
from retrieval.types import CollectionSpec, Hit, Point, SearchQuery, StoredPoint


@runtime_checkable
class StoredCollection(Protocol):
    """One collection of points: writes, reads by id, searches, statistics."""

    spec: CollectionSpec

    def upsert(self, points: Sequence[Point]) -> int:
        """Insert or replace validated points; the last point of an id wins; durable."""

    def delete(self, ids: Sequence[str]) -> int:
        """Delete points by id; returns how many existed."""

    def get(self, ids: Sequence[str], *, with_vector: bool = False) -> list[StoredPoint]:
        """Points by id in request order; unknown ids are skipped."""

    def check_filter_fields(self, conditions: Sequence[Any]) -> None:
        """INVALID_FILTER when a condition names a field no point carries."""

    def search(self, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
        """Hits per query (dense with a filter; keyword / hybrid where offered)."""

    def stats(self) -> CollectionStats:
        """Points, training state, disk usage."""

    def snapshot(self) -> bool:
        """Persist the state compactly when the backend keeps its own files."""


@runtime_checkable
class CollectionStore(Protocol):
    """The set of collections one search hop serves."""

    def load(self) -> None:
        """Open (or connect to) every collection; called once before serving."""

    def create(self, spec: CollectionSpec) -> StoredCollection:
        """Create an empty collection; ALREADY_EXISTS / COLLECTION_EXISTS when taken."""

    def get(self, name: str) -> StoredCollection:
        """The named collection; NOT_FOUND / COLLECTION_NOT_FOUND when unknown."""

    def list(self) -> list[StoredCollection]:
        """Every collection, by name."""

    def delete(self, name: str) -> None:
        """Delete a collection and its data; NOT_FOUND when unknown."""

    def snapshot_due(self, min_log_bytes: int, log_ratio: float = 1.0) -> list[Any]:
        """Collections worth a snapshot now (none for a backend without local files)."""

    def close(self, *, snapshot: bool = True) -> None:
        """Release every collection (and connection)."""


class StoreSettings(Protocol):
    """The ``[search]`` keys :func:`open_store` reads (server.config.SearchConfig)."""

    backend: str
    data_dir: str
    durable: bool
    milvus_uri: str
    milvus_token: str
    milvus_user: str
    milvus_password: str
    milvus_db_name: str
    milvus_collection_prefix: str
    milvus_timeout_s: float


def open_store(settings: StoreSettings) -> CollectionStore:
    """The configured store, not yet loaded (the caller runs ``load`` off the event loop)."""
    backend = settings.backend
    if backend == "milvus":
        from retrieval.milvus_store import MilvusStore

        return MilvusStore(
            settings.milvus_uri,
            token=settings.milvus_token,
            user=settings.milvus_user,
            password=settings.milvus_password,
            db_name=settings.milvus_db_name,
            prefix=settings.milvus_collection_prefix,
            timeout_s=settings.milvus_timeout_s,
        )
    if backend != "faiss":
        raise ValueError(f"unknown search backend {backend!r}")
    from retrieval.manager import CollectionManager

    return CollectionManager(settings.data_dir, durable=settings.durable)
