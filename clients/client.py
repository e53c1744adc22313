"""The typed backbone client: ``Client`` (sync) and ``AsyncClient`` (asyncio).

Both own one channel (retries, TLS and limits; see ``clients.channel``) and expose one
sub-client per service as a plain attribute::

    with Client(address="127.0.0.1:50051", token="...") as client:
        vectors = client.embedding.embed(["hello"]).vectors      # (1, 384) float32
        hits = client.search.search("docs", text="hello", top_k=3).hits
        for event in client.generation.generate("Hi", max_tokens=8): ...

    async with AsyncClient() as client:
        status = await client.health.check()

Adding a service: write ``clients/<service>.py`` with
request builders / response parsers as functions plus two thin classes,
``XClient(channel, options)`` and ``AsyncXClient(channel, options)``, whose methods build
the request, call the stub with ``**call_kwargs(options, timeout[, stream=True])`` inside
``translated_errors()`` (streams: iterate with ``iterate`` / ``aiterate``) and parse the
response; then add one line to each ``__init__`` below (``self.search = SearchClient(...)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clients.channel import ClientOptions, open_aio_channel, open_channel
from clients.embedding import AsyncEmbeddingClient, EmbeddingClient
from clients.generation import AsyncGenerationClient, GenerationClient
from clients.health import AsyncHealthClient, HealthClient
from clients.pipeline import AsyncPipelineClient, PipelineClient
from clients.rerank import AsyncRerankClient, RerankClient
from clients.search import AsyncSearchClient, SearchClient


def _options(options: ClientOptions | None, overrides: dict[str, Any]) -> ClientOptions:
    return dataclasses.replace(options or ClientOptions(), **overrides)


class Client:
    """Sync client; ``Client(options)`` or ``Client(address=..., token=..., ...)``.

    Keyword arguments override fields of ``options``. Use as a context manager, or
    call ``close()``.
    """

    def __init__(self, options: ClientOptions | None = None, **overrides: Any) -> None:
        self.options = _options(options, overrides)
        self.channel = open_channel(self.options)
        self.embedding = EmbeddingClient(self.channel, self.options)
        self.search = SearchClient(self.channel, self.options)
        self.rerank = RerankClient(self.channel, self.options)
        self.generation = GenerationClient(self.channel, self.options)
        self.health = HealthClient(self.channel, self.options)
        self.pipeline = PipelineClient(self.channel, self.options)

    def close(self) -> None:
        """Closes the channel, cancelling calls in flight."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """Asyncio client; create it inside the event loop that uses it.

    ``AsyncClient(options)`` or ``AsyncClient(address=..., ...)``; use ``async with`` or
    ``await close()``.
    """

    def __init__(self, options: ClientOptions | None = None, **overrides: Any) -> None:
        self.options = _options(options, overrides)
        self.channel = open_aio_channel(self.options)
        self.embedding = AsyncEmbeddingClient(self.channel, self.options)
        self.search = AsyncSearchClient(self.channel, self.options)
        self.rerank = AsyncRerankClient(self.channel, self.options)
        self.generation = AsyncGenerationClient(self.channel, self.options)
        self.health = AsyncHealthClient(self.channel, self.options)
        self.pipeline = AsyncPipelineClient(self.channel, self.options)

    async def close(self, grace: float | None = None) -> None:
        """Closes the channel; calls in flight get ``grace`` seconds (None: cancelled)."""
        await self.channel.close(grace)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
