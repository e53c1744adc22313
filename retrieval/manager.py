"""The set of collections under one data directory: create, open, list, delete.

Creation is atomic: the spec is written into a hidden temporary directory which is
renamed into place, so a collection directory either has its spec or does not exist.
Deletion is atomic too: the collection leaves the table and its directory is renamed to
a hidden tombstone (``.<name>.deleting-<uuid>``, the rename fsynced) before anything is
removed, so a crash at any point leaves either the whole collection or none of it; hidden
leftovers (tombstones, half-made creations) are removed when the manager loads.

Concurrency: ``create`` and ``delete`` are serialised by ``_lock`` (and, in the server, by
the search hop's one writer thread, which also runs every write). A delete therefore waits
for the writes submitted before it (they finish and are acknowledged first); writes after
it, or still streaming into the deleted collection, raise ``CollectionClosed`` (mapped to
NOT_FOUND). Reads that already hold the collection object finish on its in-memory state;
``stats`` tolerates the vanished directory. ``get``/``list`` never block on the lock.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from pathlib import Path

import msgpack

from retrieval.collection import SPEC_FILE, Collection
from retrieval.types import CollectionSpec
from retrieval.wal import fsync_dir
from retrieval.errors import AlreadyExists, InvalidArgument, NotFound
from retrieval.types import MAX_NAME_CHARS

log = logging.getLogger(__name__)


def collection_not_found(name: str) -> NotFound:
    """The NOT_FOUND / COLLECTION_NOT_FOUND error for ``name`` (named once, in the
    metadata; the server bounds every metadata value it sends)."""
    return NotFound(
        "the collection does not exist",
        reason="COLLECTION_NOT_FOUND",
        metadata={"collection": name},
    )


def check_collection_name(name: str) -> None:
    """INVALID_ARGUMENT for a name longer than any collection's, before any lookup."""
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"a collection name has at most {MAX_NAME_CHARS} characters",
            metadata={"field": "collection", "limit": MAX_NAME_CHARS},
        )


class CollectionManager:
    """Owns every collection of a data directory."""

    def __init__(self, data_dir: str | Path, *, durable: bool = True) -> None:
        """Nothing is read until :meth:`load`."""
        self.data_dir = Path(data_dir)
        self.durable = durable
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        """Open every collection (snapshot + log replay) and clear leftovers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.data_dir.iterdir()):
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)
                continue
            if not (path / SPEC_FILE).exists():
                continue
            self._collections[path.name] = Collection.open(path, durable=self.durable)
            log.info("opened collection %s (%d points)", path.name,
                     self._collections[path.name].stats().points)

    def create(self, spec: CollectionSpec) -> Collection:
        """Create an empty collection; ALREADY_EXISTS / COLLECTION_EXISTS when taken."""
        with self._lock:
            final = self.data_dir / spec.name
            if spec.name in self._collections or final.exists():
                raise AlreadyExists(
                    "the collection already exists",
                    reason="COLLECTION_EXISTS",
                    metadata={"collection": spec.name},
                )
            tmp = self.data_dir / f".{spec.name}.creating-{uuid.uuid4().hex}"
            tmp.mkdir(parents=True)
            with open(tmp / SPEC_FILE, "wb") as fh:
                fh.write(msgpack.packb(spec.to_dict(), use_bin_type=True))
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(self.data_dir)
            collection = Collection.open(final, durable=self.durable)
            self._collections[spec.name] = collection
            return collection

    def get(self, name: str) -> Collection:
        """The named collection; NOT_FOUND / COLLECTION_NOT_FOUND when unknown,
        INVALID_ARGUMENT when longer than any name can be."""
        check_collection_name(name)
        collection = self._collections.get(name)
        if collection is None:
            raise collection_not_found(name)
        return collection

    def list(self) -> list[Collection]:
        """Every collection, by name."""
        # A copy taken at once (atomic under the GIL): a concurrent create or delete in
        # the writer thread cannot change the dict while it is iterated.
        current = dict(self._collections)
        return [current[name] for name in sorted(current)]

    def delete(self, name: str) -> None:
        """Delete a collection and its files; NOT_FOUND when unknown."""
        check_collection_name(name)
        with self._lock:
            collection = self._collections.pop(name, None)
            if collection is None:
                raise collection_not_found(name)
            collection.close()
            doomed = self.data_dir / f".{name}.deleting-{uuid.uuid4().hex}"
            os.rename(collection.directory, doomed)
            fsync_dir(self.data_dir)
        shutil.rmtree(doomed, ignore_errors=True)

    def snapshot_due(self, min_log_bytes: int, log_ratio: float = 1.0) -> list[Collection]:
        """Collections whose log has grown enough to be worth a snapshot."""
        return [
            c for c in list(self._collections.values())
            if c.needs_snapshot(min_log_bytes, log_ratio)
        ]

    def close(self, *, snapshot: bool = True) -> None:
        """Close every collection, snapshotting those with unsnapshotted writes."""
        with self._lock:
            for collection in self._collections.values():
                try:
                    collection.close(snapshot=snapshot)
                except Exception:  # one bad collection must not keep the others open
                    log.exception("closing collection %s failed", collection.spec.name)
            self._collections.clear()
