"""Document ingestion: chunk in token windows, embed in batches, upsert durably.

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
        """Chunk, embed and upsert ``documents``; returns once their chunks are durable."""
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
        self.stats.documents += len(documents)
        self.stats.chunks += len(points)

    def _chunk_all(self, documents: list[Document]) -> list[tuple[str, str, dict[str, Any]]]:
        out = []
        for doc in documents:
            doc_id = document_id(doc)
            for n, text in enumerate(self.chunker.chunk(doc.text, self.settings)):
                out.append((chunk_id(doc_id, n), text, doc.metadata))
        return out
