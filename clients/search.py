"""Typed calls to ``backbone.v1.VectorSearchService``, sync and async.

Requests are built and responses parsed by the functions of ``clients.search_messages``
(shared by both classes); the classes only add the call: deadline and token
(``call_kwargs``) and typed errors (``translated_errors``). ``search`` and
``search_batch`` queries take any field of :class:`~clients.search_messages.Query`::

    with Client() as client:
        client.search.create_collection("docs", 384)
        client.search.upsert_batch("docs", [Point("a", vector, text="hello")])
        hits = client.search.search("docs", text="greeting", top_k=3, with_payload=True).hits
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc

from clients.channel import ClientOptions, call_kwargs
from clients.errors import translated_errors
from clients.search_messages import (
    CollectionInfo,
    Document,
    IndexParams,
    IngestResult,
    Point,
    Query,
    SearchBatchResult,
    SearchResult,
    UpsertResult,
    build_create_request,
    build_ingest_messages,
    build_points,
    build_search_request,
    build_upsert_messages,
    parse_collection,
    parse_ingest_response,
    parse_point,
    parse_search_batch_response,
    parse_search_response,
    parse_upsert_response,
)

T = TypeVar("T")


def search_query(
    collection: str, vector: Any, text: str | None, options: dict[str, Any]
) -> pb.SearchRequest:
    """The SearchRequest of a ``search(...)`` call's arguments."""
    return build_search_request(Query(collection, vector=vector, text=text, **options))


async def _aflat(batches: AsyncIterable[T] | Iterable[T]) -> AsyncIterator[T]:
    if isinstance(batches, AsyncIterable):
        async for item in batches:
            yield item
    else:
        for item in batches:
            yield item


class SearchClient:
    """Sync calls to VectorSearchService; get one as ``Client(...).search``."""

    def __init__(self, channel: grpc.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.VectorSearchServiceStub(channel)
        self._options = options

    def _call(self, rpc: Any, request: Any, timeout: float | None, stream: bool = False):
        with translated_errors():
            return rpc(
                request, **call_kwargs(self._options, timeout, stream=stream)
            )

    def create_collection(
        self, name: str, dimension: int, *, metric: str | None = None,
        index_kind: str | None = None, index_params: IndexParams | None = None,
        timeout: float | None = None,
    ) -> CollectionInfo:
        """Create a collection (metric and index kind default on the server)."""
        request = build_create_request(name, dimension, metric, index_kind, index_params)
        return parse_collection(self._call(self._stub.CreateCollection, request, timeout).collection)

    def list_collections(self, *, timeout: float | None = None) -> tuple[CollectionInfo, ...]:
        """Every collection of the process."""
        response = self._call(self._stub.ListCollections, pb.ListCollectionsRequest(), timeout)
        return tuple(parse_collection(c) for c in response.collections)

    def describe_collection(self, name: str, *, timeout: float | None = None) -> CollectionInfo:
        """One collection's settings and size."""
        request = pb.DescribeCollectionRequest(name=name)
        return parse_collection(self._call(self._stub.DescribeCollection, request, timeout).collection)

    def delete_collection(self, name: str, *, timeout: float | None = None) -> None:
        """Delete a collection and its files."""
        self._call(self._stub.DeleteCollection, pb.DeleteCollectionRequest(name=name), timeout)

    def upsert_batch(
        self, collection: str, points: Iterable[Point], *, timeout: float | None = None
    ) -> UpsertResult:
        """Insert or replace points in one durable call (never retried)."""
        request = pb.UpsertBatchRequest(collection=collection, points=build_points(points))
        return parse_upsert_response(self._call(self._stub.UpsertBatch, request, timeout))

    def upsert(
        self, collection: str, batches: Iterable[Sequence[Point]], *,
        timeout: float | None = None,
    ) -> UpsertResult:
        """Streaming upsert: one message per batch of points, one answer at the end."""
        messages = build_upsert_messages(collection, batches)
        return parse_upsert_response(self._call(self._stub.Upsert, messages, timeout, stream=True))

    def get(
        self, collection: str, ids: Sequence[str], *, with_vector: bool = False,
        timeout: float | None = None,
    ) -> tuple[Point, ...]:
        """The stored points with these ids (unknown ids are left out)."""
        request = pb.GetRequest(collection=collection, ids=list(ids), with_vector=with_vector)
        return tuple(parse_point(p) for p in self._call(self._stub.Get, request, timeout).points)

    def delete(
        self, collection: str, ids: Sequence[str], *, timeout: float | None = None
    ) -> int:
        """Delete points by id; returns how many existed."""
        request = pb.DeleteRequest(collection=collection, ids=list(ids))
        return self._call(self._stub.Delete, request, timeout).deleted

    def search(
        self, collection: str, vector: Any = None, *, text: str | None = None,
        timeout: float | None = None, **options: Any,
    ) -> SearchResult:
        """Search by vector or by text; ``options``: any other ``Query`` field."""
        request = search_query(collection, vector, text, options)
        return parse_search_response(self._call(self._stub.Search, request, timeout))

    def search_batch(
        self, queries: Sequence[Query], *, timeout: float | None = None
    ) -> SearchBatchResult:
        """Several queries in one call; a result per query, in order."""
        request = pb.SearchBatchRequest(searches=[build_search_request(q) for q in queries])
        return parse_search_batch_response(self._call(self._stub.SearchBatch, request, timeout))

    def ingest(
        self, collection: str, documents: Iterable[Document], *, chunk_tokens: int = 0,
        overlap_tokens: int = 0, timeout: float | None = None,
    ) -> IngestResult:
        """Chunk, embed and store documents in one streamed call (0: server defaults)."""
        messages = build_ingest_messages(collection, documents, chunk_tokens, overlap_tokens)
        return parse_ingest_response(self._call(self._stub.Ingest, messages, timeout, stream=True))


class AsyncSearchClient:
    """Async calls to VectorSearchService; get one as ``AsyncClient(...).search``."""

    def __init__(self, channel: grpc.aio.Channel, options: ClientOptions) -> None:
        self._stub = pb_grpc.VectorSearchServiceStub(channel)
        self._options = options

    async def _call(self, rpc: Any, request: Any, timeout: float | None, stream: bool = False):
        with translated_errors():
            return await rpc(
                request, **call_kwargs(self._options, timeout, stream=stream)
            )

    async def create_collection(
        self, name: str, dimension: int, *, metric: str | None = None,
        index_kind: str | None = None, index_params: IndexParams | None = None,
        timeout: float | None = None,
    ) -> CollectionInfo:
        """Create a collection (metric and index kind default on the server)."""
        request = build_create_request(name, dimension, metric, index_kind, index_params)
        response = await self._call(self._stub.CreateCollection, request, timeout)
        return parse_collection(response.collection)

    async def list_collections(
        self, *, timeout: float | None = None
    ) -> tuple[CollectionInfo, ...]:
        """Every collection of the process."""
        response = await self._call(self._stub.ListCollections, pb.ListCollectionsRequest(), timeout)
        return tuple(parse_collection(c) for c in response.collections)

    async def describe_collection(
        self, name: str, *, timeout: float | None = None
    ) -> CollectionInfo:
        """One collection's settings and size."""
        request = pb.DescribeCollectionRequest(name=name)
        response = await self._call(self._stub.DescribeCollection, request, timeout)
        return parse_collection(response.collection)

    async def delete_collection(self, name: str, *, timeout: float | None = None) -> None:
        """Delete a collection and its files."""
        await self._call(self._stub.DeleteCollection, pb.DeleteCollectionRequest(name=name), timeout)

    async def upsert_batch(
        self, collection: str, points: Iterable[Point], *, timeout: float | None = None
    ) -> UpsertResult:
        """Insert or replace points in one durable call (never retried)."""
        request = pb.UpsertBatchRequest(collection=collection, points=build_points(points))
        return parse_upsert_response(await self._call(self._stub.UpsertBatch, request, timeout))

    async def upsert(
        self, collection: str,
        batches: Iterable[Sequence[Point]] | AsyncIterable[Sequence[Point]], *,
        timeout: float | None = None,
    ) -> UpsertResult:
        """Streaming upsert: one message per batch (sync or async), one answer at the end."""

        async def messages() -> AsyncIterator[pb.UpsertRequest]:
            async for batch in _aflat(batches):
                for message in build_upsert_messages(collection, [batch]):
                    yield message

        response = await self._call(self._stub.Upsert, messages(), timeout, stream=True)
        return parse_upsert_response(response)

    async def get(
        self, collection: str, ids: Sequence[str], *, with_vector: bool = False,
        timeout: float | None = None,
    ) -> tuple[Point, ...]:
        """The stored points with these ids (unknown ids are left out)."""
        request = pb.GetRequest(collection=collection, ids=list(ids), with_vector=with_vector)
        return tuple(parse_point(p) for p in (await self._call(self._stub.Get, request, timeout)).points)

    async def delete(
        self, collection: str, ids: Sequence[str], *, timeout: float | None = None
    ) -> int:
        """Delete points by id; returns how many existed."""
        request = pb.DeleteRequest(collection=collection, ids=list(ids))
        return (await self._call(self._stub.Delete, request, timeout)).deleted

    async def search(
        self, collection: str, vector: Any = None, *, text: str | None = None,
        timeout: float | None = None, **options: Any,
    ) -> SearchResult:
        """Search by vector or by text; ``options``: any other ``Query`` field."""
        request = search_query(collection, vector, text, options)
        return parse_search_response(await self._call(self._stub.Search, request, timeout))

    async def search_batch(
        self, queries: Sequence[Query], *, timeout: float | None = None
    ) -> SearchBatchResult:
        """Several queries in one call; a result per query, in order."""
        request = pb.SearchBatchRequest(searches=[build_search_request(q) for q in queries])
        return parse_search_batch_response(await self._call(self._stub.SearchBatch, request, timeout))

    async def ingest(
        self, collection: str, documents: Iterable[Document], *, chunk_tokens: int = 0,
        overlap_tokens: int = 0, timeout: float | None = None,
    ) -> IngestResult:
        """Chunk, embed and store documents in one streamed call (0: server defaults)."""
        messages = build_ingest_messages(collection, documents, chunk_tokens, overlap_tokens)
        response = await self._call(self._stub.Ingest, messages, timeout, stream=True)
        return parse_ingest_response(response)
