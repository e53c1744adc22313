"""Milvus as the search hop's vector store (``[search] backend = "milvus"``).

Each backbone collection is one Milvus collection named ``<prefix><name>`` (``_`` and
``-`` encoded so that distinct names stay distinct: Milvus names take no ``-``) with the
fields ``id`` (VARCHAR primary key), ``vector`` (FLOAT_VECTOR), ``text`` (VARCHAR),
``meta`` (JSON: the metadata as given) and ``filt`` (JSON: the typed filter document of
``retrieval.milvus_expr``). The backbone's ``CollectionSpec`` travels in a property of the
Milvus collection (``backbone.spec``), so any replica of the search hop (or a restarted one) reads
it back; there is no local state besides a cache of collection handles.

pymilvus talks gRPC to Milvus Standalone / Distributed (and to milvus-lite's server,
which the tests start); calls are blocking and run in the hop's threads.

What this backend does not offer (answered FAILED_PRECONDITION with the reason):

* keyword and hybrid search (BM25 lives in the FAISS backend's collections);
* index kinds ivf_flat and ivf_pq (the backbone's IVF training contract, ``trained``,
  ``nlist`` / ``nprobe``, is FAISS's; flat and hnsw map to Milvus FLAT and HNSW);
* payload text over 65,535 bytes (Milvus' VARCHAR limit; FAISS takes 65,536).

Semantics that differ slightly: ``disk_bytes`` is 0 (Milvus does not report it per
collection) and a filter field is "known" while a live point carries it (FAISS also
remembers fields of deleted points).
"""

from __future__ import annotations

import secrets

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from retrieval.collection import CollectionStats
from retrieval.errors import AlreadyExists, FailedPrecondition, InvalidArgument, RetrievalError
from retrieval.manager import collection_not_found
from retrieval.milvus_expr import (
    MATCH_ALL,
    filter_document,
    filter_expr,
    ids_expr,
    known_field_expr,
)
from retrieval.types import (
    DEFAULT_EF_SEARCH,
    CollectionSpec,
    Hit,
    IndexKind,
    Metric,
    Payload,
    Point,
    SearchMode,
    SearchQuery,
    StoredPoint,
    normalize_rows,
)

MAX_TEXT_BYTES = 65535
# Flush a collection once writes paused this long, or this many rows are unflushed.
FLUSH_IDLE_S = 2.0
FLUSH_ROWS = 50_000
# The collection property holding the backbone CollectionSpec (JSON).
SPEC_PROPERTY = "backbone.spec"
_METRICS = {Metric.COSINE: "COSINE", Metric.INNER_PRODUCT: "IP", Metric.L2: "L2"}
_KINDS = {IndexKind.FLAT: "FLAT", IndexKind.HNSW: "HNSW"}
_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Milvus answers these codes for a collection that does not exist.
_NOT_FOUND_CODES = {4, 100}
_NOT_FOUND_TEXT = ("collection not found", "can't find collection", "does not exist")


class StoreUnavailable(RetrievalError):
    """The Milvus server cannot be reached (or refuses the connection)."""

    status = "UNAVAILABLE"
    reason = "UNAVAILABLE"


def milvus_name(prefix: str, name: str) -> str:
    """The Milvus collection of backbone collection ``name`` (injective in ``name``)."""
    return prefix + name.replace("_", "__").replace("-", "_d")


def unsupported(what: str) -> FailedPrecondition:
    """FAILED_PRECONDITION for a feature the Milvus backend does not offer."""
    return FailedPrecondition(
        f"{what} is not offered by the milvus search backend; "
        'use search.backend = "faiss" for it',
        metadata={"backend": "milvus"},
    )


def check_spec(spec: CollectionSpec) -> None:
    """FAILED_PRECONDITION for index kinds this backend does not map."""
    if spec.kind not in _KINDS:
        raise unsupported(f"index kind {spec.kind.value}")


class MilvusStore:
    """The collections of one Milvus database whose names start with ``prefix``."""

    def __init__(
        self,
        uri: str,
        *,
        token: str = "",
        user: str = "",
        password: str = "",
        db_name: str = "",
        prefix: str = "backbone_",
        timeout_s: float = 10.0,
    ) -> None:
        """Nothing connects until :meth:`load`."""
        if not _PREFIX.match(prefix):
            raise ValueError("milvus collection prefix must be a Milvus name ([A-Za-z0-9_])")
        self.uri = uri
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._auth = {"token": token, "user": user, "password": password, "db_name": db_name}
        self._client: Any = None
        self._collections: dict[str, MilvusCollection] = {}
        self._lock = threading.Lock()

    # -- connection and calls ------------------------------------------------------

    def call(self, method: str, *args: Any, name: str = "", **kwargs: Any) -> Any:
        """``MilvusClient.<method>`` with the timeout, its errors as retrieval errors
        (``name``: the backbone collection an unknown-collection error is about)."""
        from pymilvus.exceptions import MilvusException

        if self._client is None:
            raise StoreUnavailable("the milvus store is not connected")
        fn: Callable[..., Any] = getattr(self._client, method)
        try:
            return fn(*args, timeout=self.timeout_s, **kwargs)
        except MilvusException as exc:
            text = str(getattr(exc, "message", exc)).lower()
            if exc.code in _NOT_FOUND_CODES or any(t in text for t in _NOT_FOUND_TEXT):
                raise collection_not_found(name) from None
            if exc.code in (1, 2) or "connect" in text or "unavailable" in text:
                raise StoreUnavailable(f"milvus at the configured uri failed: {exc.message}") from None
            raise

    def load(self) -> None:
        """Connect and open every collection of this prefix (specs from their property)."""
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        kwargs = {k: v for k, v in self._auth.items() if v}
        try:
            self._client = MilvusClient(uri=self.uri, timeout=self.timeout_s, **kwargs)
        except MilvusException as exc:
            raise StoreUnavailable(f"cannot connect to milvus: {exc.message}") from None
        self.list()

    def _open(self, mname: str) -> MilvusCollection | None:
        """A handle on an existing Milvus collection of ours; None when it is not one."""
        info = self.call("describe_collection", mname, name=mname)
        try:
            properties = info.get("properties") or {}
            spec = CollectionSpec.from_dict(json.loads(properties[SPEC_PROPERTY]))
        except (ValueError, KeyError, TypeError):
            return None  # a collection of the prefix that this hop did not create
        self.call("load_collection", mname)
        return MilvusCollection(self, mname, spec)

    # -- the CollectionStore protocol ----------------------------------------------

    def create(self, spec: CollectionSpec) -> MilvusCollection:
        """Create and load an empty collection; ALREADY_EXISTS when the name is taken."""
        from pymilvus import DataType

        check_spec(spec)
        mname = milvus_name(self.prefix, spec.name)
        with self._lock:
            if spec.name in self._collections or self.call("has_collection", mname):
                raise AlreadyExists(
                    f"collection {spec.name!r} already exists",
                    reason="COLLECTION_EXISTS",
                    metadata={"collection": spec.name},
                )
            schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=spec.dimension)
            schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
            schema.add_field("meta", DataType.JSON)
            schema.add_field("filt", DataType.JSON)
            index = self._client.prepare_index_params()
            params = (
                {"M": spec.hnsw_m, "efConstruction": spec.ef_construction}
                if spec.kind is IndexKind.HNSW else {}
            )
            index.add_index(
                "vector", index_type=_KINDS[spec.kind], metric_type=_METRICS[spec.metric],
                params=params,
            )
            self.call(
                "create_collection", mname, schema=schema, index_params=index,
                properties={SPEC_PROPERTY: json.dumps(spec.to_dict())},
            )
            self.call("load_collection", mname)
            collection = MilvusCollection(self, mname, spec)
            self._collections[spec.name] = collection
            return collection

    def get(self, name: str) -> MilvusCollection:
        """The named collection (looked up in Milvus when another replica created it)."""
        collection = self._collections.get(name)
        if collection is not None:
            return collection
        mname = milvus_name(self.prefix, name)
        if self._client is not None and self.call("has_collection", mname):
            opened = self._open(mname)
            if opened is not None and opened.spec.name == name:
                with self._lock:
                    return self._collections.setdefault(name, opened)
        raise collection_not_found(name)

    def list(self) -> list[MilvusCollection]:
        """Every collection of the prefix in Milvus now, by name."""
        found: dict[str, MilvusCollection] = {}
        for mname in self.call("list_collections"):
            if not mname.startswith(self.prefix):
                continue
            known = next((c for c in self._collections.values() if c.mname == mname), None)
            opened = known or self._open(mname)
            if opened is not None:
                found[opened.spec.name] = opened
        with self._lock:
            self._collections = found
        return [found[name] for name in sorted(found)]

    def delete(self, name: str) -> None:
        """Drop the collection; NOT_FOUND when unknown."""
        collection = self.get(name)
        self.call("drop_collection", collection.mname, name=name)
        with self._lock:
            self._collections.pop(name, None)

    def snapshot_due(self, min_log_bytes: int, log_ratio: float = 1.0) -> list[Any]:
        """Collections with writes not yet flushed after a pause (or many of them).

        Milvus persists on its own; a flush seals the growing segment so that it is
        indexed (milvus-lite searches unsealed rows by brute force, ~10x slower at 5k
        x 384). The hop's snapshot loop calls ``snapshot`` (= flush) on these.
        """
        now = time.monotonic()
        return [c for c in list(self._collections.values()) if c.flush_due(now)]

    def close(self, *, snapshot: bool = True) -> None:
        """Close the connection (Milvus keeps the data)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._collections = {}


class MilvusCollection:
    """One backbone collection stored in one Milvus collection."""

    def __init__(self, store: MilvusStore, mname: str, spec: CollectionSpec) -> None:
        """A handle; the Milvus collection exists and is loaded."""
        self.store = store
        self.mname = mname
        self.spec = spec
        # Filter fields seen on some point (checked in Milvus once, then remembered).
        self._known: set[str] = set()
        # Rows written since the last flush, and when the last write happened.
        self._unflushed = 0
        # Changes on every write through this hop (caches key on it); a random base per
        # opened instance, so a collection created again never repeats a version.
        self._version = secrets.randbits(31) << 32
        self._last_write = 0.0

    def _vectors(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        return normalize_rows(vectors) if self.spec.metric is Metric.COSINE else vectors

    @property
    def version(self) -> int:
        """Changes on every write (upsert, delete) made through this hop."""
        return self._version

    def upsert(self, points: Sequence[Point]) -> int:
        """Insert or replace points; the last point of an id in the call wins."""
        if not points:
            return 0
        last: dict[str, Point] = {}
        for point in points:
            last.pop(point.id, None)
            last[point.id] = point
        unique = list(last.values())
        for point in unique:
            if len(point.payload.text.encode("utf-8")) > MAX_TEXT_BYTES:
                raise InvalidArgument(
                    f"payload text exceeds {MAX_TEXT_BYTES} bytes (the milvus backend's limit)",
                    reason="INPUT_TOO_LARGE", metadata={"limit": MAX_TEXT_BYTES},
                )
        vectors = self._vectors(np.stack([p.vector for p in unique]))
        rows = [
            {
                "id": p.id,
                "vector": vectors[i].tolist(),
                "text": p.payload.text,
                "meta": p.payload.metadata,
                "filt": filter_document(p.payload.metadata),
            }
            for i, p in enumerate(unique)
        ]
        self.store.call("upsert", self.mname, rows, name=self.spec.name)
        self._unflushed += len(rows)
        self._last_write = time.monotonic()
        self._known.update(k for p in unique for k in p.payload.metadata)
        return len(unique)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete points by id; returns how many existed."""
        self._version += 1
        unique = list(dict.fromkeys(ids))
        found = self.store.call(
            "query", self.mname, filter=ids_expr(unique), output_fields=["id"],
            name=self.spec.name,
        )
        existing = [row["id"] for row in found]
        if existing:
            self.store.call("delete", self.mname, ids=existing, name=self.spec.name)
        return len(existing)

    def get(self, ids: Sequence[str], *, with_vector: bool = False) -> list[StoredPoint]:
        """Points by id in request order; unknown ids are skipped."""
        fields = ["id", "text", "meta"] + (["vector"] if with_vector else [])
        rows = self.store.call(
            "get", self.mname, ids=list(dict.fromkeys(ids)), output_fields=fields,
            name=self.spec.name,
        )
        by_id = {row["id"]: row for row in rows}
        out = []
        for point_id in ids:
            row = by_id.get(point_id)
            if row is None:
                continue
            vector = np.asarray(row["vector"], dtype=np.float32) if with_vector else None
            out.append(StoredPoint(point_id, Payload(row["text"], row["meta"] or {}), vector))
        return out

    def check_filter_fields(self, conditions: Sequence[Any]) -> None:
        """INVALID_FILTER when no point carries a condition's field."""
        for cond in conditions:
            if cond.field in self._known:
                continue
            rows = self.store.call(
                "query", self.mname, filter=known_field_expr(cond.field),
                output_fields=["id"], limit=1, name=self.spec.name,
            )
            if not rows:
                raise InvalidArgument(
                    f"filter field {cond.field!r} is unknown in this collection",
                    reason="INVALID_FILTER",
                    metadata={"field": cond.field},
                )
            self._known.add(cond.field)

    def search(self, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
        """Dense searches; queries sharing a filter, k and ef go in one Milvus call."""
        for query in queries:
            if query.mode is not SearchMode.DENSE:
                raise unsupported(f"{query.mode.value} search")
            self.check_filter_fields(query.conditions)
        groups: dict[Any, list[int]] = {}
        for i, query in enumerate(queries):
            # repr: Equals(f, True) == Equals(f, 1.0) in Python, yet they differ here.
            key = (repr(query.conditions), query.k, query.params.ef_search)
            groups.setdefault(key, []).append(i)
        results: list[list[Hit]] = [[] for _ in queries]
        for (_, k, ef), members in groups.items():
            conditions = queries[members[0]].conditions
            vectors = self._vectors(np.stack([queries[i].vector for i in members]))
            fields = ["id"]
            if any(queries[i].with_payload for i in members):
                fields += ["text", "meta"]
            if any(queries[i].with_vector for i in members):
                fields.append("vector")
            params: dict[str, Any] = {"metric_type": _METRICS[self.spec.metric], "params": {}}
            if self.spec.kind is IndexKind.HNSW:
                params["params"]["ef"] = max(ef or DEFAULT_EF_SEARCH, k)
            found = self.store.call(
                "search", self.mname, data=vectors.tolist(), limit=k,
                filter=filter_expr(conditions), output_fields=fields, search_params=params,
                name=self.spec.name,
            )
            for i, hits in zip(members, found, strict=True):
                results[i] = [self._hit(queries[i], hit) for hit in hits]
        return results

    @staticmethod
    def _hit(query: SearchQuery, hit: dict[str, Any]) -> Hit:
        entity = hit.get("entity") or {}
        payload = (
            Payload(entity.get("text", ""), entity.get("meta") or {})
            if query.with_payload else None
        )
        vector = (
            np.asarray(entity["vector"], dtype=np.float32) if query.with_vector else None
        )
        return Hit(id=str(hit["id"]), score=float(hit["distance"]), payload=payload, vector=vector)

    def stats(self) -> CollectionStats:
        """Live point count from Milvus; always trained; disk usage unknown (0)."""
        rows = self.store.call(
            "query", self.mname, filter=MATCH_ALL, output_fields=["count(*)"],
            name=self.spec.name,
        )
        points = int(rows[0]["count(*)"]) if rows else 0
        return CollectionStats(self.spec, points, True, 0, 0)

    def flush_due(self, now: float) -> bool:
        """True when unflushed rows exist and writes paused, or they are many."""
        return self._unflushed > 0 and (
            now - self._last_write >= FLUSH_IDLE_S or self._unflushed >= FLUSH_ROWS
        )

    def snapshot(self) -> bool:
        """Flush (seal and index the written rows); False when nothing was written."""
        if self._unflushed == 0:
            return False
        pending, self._unflushed = self._unflushed, 0
        try:
            self.store.call("flush", self.mname, name=self.spec.name)
        except Exception:
            self._unflushed += pending
            raise
        return True
