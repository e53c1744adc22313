"""Document ingestion: chunk in token windows, embed in batches, upsert durably.

Re-ingesting a document replaces it: its chunks ``<id>#0..#n-1`` are upserted, then any
older chunks ``<id>#n`` onwards (a previous version had more) are deleted. Invariant: a
document's chunks are always ``#0`` up to a contiguous end, so the stale ones are found
by probing ids from ``#n`` until the first missing one.

Transport-free: the caller supplies the embedding function (in-process hop or a gRPC
client) and the function that runs blocking work off the event loop.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.chunking import ChunkSettings, TokenChunker
from retrieval.collection import Collection
from retrieval.types import Payload, Point

#: Embeds texts: (n, dimension) float32.
EmbedFn = Callable[[list[str]], Awaitable[np.ndarray]]
#: Runs a blocking callable in a worker thread.
RunFn = Callable[..., Awaitable[Any]]
# Chunk ids probed per Get while looking for a document's stale chunks.
PROBE_BATCH = 64


@dataclass(frozen=True)
class Document:
    """A document to ingest."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def document_id(doc: Document) -> str:
    """The caller's id, or one derived from the text's SHA-256 when empty."""
    return doc.id or hashlib.sha256(doc.text.encode("utf-8")).hexdigest()[:32]


def chunk_id(doc_id: str, n: int) -> str:
    """Id of chunk ``n`` of a document: ``<doc_id>#<n>``."""
    return f"{doc_id}#{n}"


@dataclass
class IngestStats:
    """Counters and time spent, for the response and the progress summary."""

    documents: int = 0
    chunks: int = 0
    embed_s: float = 0.0
    write_s: float = 0.0


class Ingestor:
    """Turns batches of documents into durable chunks of one collection."""

    def __init__(
        self,
        collection: Collection,
        chunker: TokenChunker,
        settings: ChunkSettings,
        embed: EmbedFn,
        run: RunFn,
        batch_size: int = 64,
    ) -> None:
        """``batch_size`` chunks are embedded and upserted together."""
        self.collection = collection
        self.chunker = chunker
        self.settings = settings
        self._embed = embed
        self._run = run
        self.batch_size = max(1, batch_size)
        self.stats = IngestStats()

    async def add(self, documents: Sequence[Document]) -> None:
        """Chunk, embed and upsert ``documents``; returns once their chunks are durable.

        Chunks left over from a longer earlier version of a document are deleted after
        its new chunks are written (durably, before this returns).
        """
        points = await self._run(self._chunk_all, list(documents))
        for start in range(0, len(points), self.batch_size):
            batch = points[start : start + self.batch_size]
            began = time.perf_counter()
            vectors = await self._embed([p[1] for p in batch])
            embedded = time.perf_counter()
            upsert = [
                Point(pid, vectors[i], Payload(text, meta))
                for i, (pid, text, meta) in enumerate(batch)
            ]
            await self._run(self.collection.upsert, upsert)
            self.stats.embed_s += embedded - began
            self.stats.write_s += time.perf_counter() - embedded
        counts: dict[str, int] = {}
        for pid, _, _ in points:
            doc_id = pid.rsplit("#", 1)[0]
            counts[doc_id] = counts.get(doc_id, 0) + 1
        await self._run(self._delete_stale, counts)
        self.stats.documents += len(documents)
        self.stats.chunks += len(points)

    def _delete_stale(self, counts: dict[str, int]) -> int:
        """Delete chunks ``#n`` onwards of each document that now has ``n`` chunks."""
        stale = []
        for doc_id, n in counts.items():
            while True:
                probe = [chunk_id(doc_id, m) for m in range(n, n + PROBE_BATCH)]
                found = {p.id for p in self.collection.get(probe)}
                run = 0
                while run < len(probe) and probe[run] in found:
                    run += 1
                stale.extend(probe[:run])
                if run < len(probe):
                    break
                n += PROBE_BATCH
        return self.collection.delete(stale) if stale else 0

    def _chunk_all(self, documents: list[Document]) -> list[tuple[str, str, dict[str, Any]]]:
        out = []
        for doc in documents:
            doc_id = document_id(doc)
            for n, text in enumerate(self.chunker.chunk(doc.text, self.settings)):
                out.append((chunk_id(doc_id, n), text, doc.metadata))
        return out
