"""The search hop: ``VectorSearchService`` over ``retrieval`` collections.

The servicer is protobuf <-> domain only: each request is converted in one pass
(``search_convert``: validation of limits before any model or index work), then one call
goes into the hop core (``search_hop.SearchCore``) or a ``retrieval`` collection, and the
domain result is converted back. ``SearchHop`` is the core plus this servicer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc

from backbone.v1 import (
    common_pb2,
    vector_search_service_pb2 as pb,
    vector_search_service_pb2_grpc as pb_grpc,
)
from retrieval.collection import Collection
from retrieval.ingest import Ingestor
from retrieval.types import SearchQuery
from server.calls import deadline_of, hop_timing
from server.errors import InvalidArgument, Unavailable
from server.servicers.search_convert import (
    MAX_SEARCHES_PER_BATCH,
    check_ids,
    documents_from_proto,
    info_to_proto,
    payload_to_proto,
    points_from_proto,
    query_from_proto,
    response_from_hits,
    spec_from_proto,
)
from server.servicers.search_hop import SearchCore


class SearchHop(SearchCore):
    """Serves VectorSearchService from the collections under ``search.data_dir``."""

    name = "search"
    service_names = ("backbone.v1.VectorSearchService",)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register VectorSearchService."""
        pb_grpc.add_VectorSearchServiceServicer_to_server(VectorSearchServicer(self), server)

    def prepare(self, request: pb.SearchRequest) -> tuple[Collection, SearchQuery]:
        """The request's collection and its validated domain query."""
        collection = self.collection(request.collection)
        query = query_from_proto(
            request, collection.spec, self.cfg.max_top_k, self.max_text_chars,
            self.cfg.fusion_defaults(),
        )
        return collection, query

    async def search(
        self, requests: Sequence[pb.SearchRequest], deadline: float | None = None
    ) -> tuple[list[pb.SearchResponse], list[common_pb2.HopTiming]]:
        """Wire searches in, wire responses out (the in-process API for the pipeline)."""
        prepared = [self.prepare(r) for r in requests]
        results, timings = await self.search_queries(prepared, deadline)
        return [response_from_hits(hits) for hits in results], timings


# ------------------------------------------------------------------ the servicer


class VectorSearchServicer(pb_grpc.VectorSearchServiceServicer):
    """Thin servicer: protobuf in, ``SearchHop``/``retrieval`` core, protobuf out."""

    def __init__(self, hop: SearchHop) -> None:
        self._hop = hop

    async def CreateCollection(self, request, context):  # noqa: N802 - gRPC method name
        """Create a collection (defaults filled in)."""
        spec = spec_from_proto(request)
        hop = self._hop
        if hop.manager is None:
            raise Unavailable("search hop is not started")
        collection = await hop.write(hop.manager.create, spec)
        return pb.CreateCollectionResponse(collection=await hop.read(info_to_proto, collection))

    async def ListCollections(self, request, context):  # noqa: N802
        """Every collection with its stats."""
        hop = self._hop
        if hop.manager is None:
            raise Unavailable("search hop is not started")
        collections = hop.manager.list()
        infos = await hop.read(lambda: [info_to_proto(c) for c in collections])
        return pb.ListCollectionsResponse(collections=infos)

    async def DescribeCollection(self, request, context):  # noqa: N802
        """One collection's config and stats."""
        collection = self._hop.collection(request.name)
        info = await self._hop.read(info_to_proto, collection)
        return pb.DescribeCollectionResponse(collection=info)

    async def DeleteCollection(self, request, context):  # noqa: N802
        """Delete a collection and its files."""
        hop = self._hop
        hop.collection(request.name)  # NOT_FOUND before touching anything
        await hop.write(hop.manager.delete, request.name)
        return pb.DeleteCollectionResponse()

    async def Upsert(self, request_iterator, context):  # noqa: N802
        """Client-streaming upsert; each message is validated whole, then made durable."""
        hop = self._hop
        began = time.perf_counter()
        name: str | None = None
        collection: Collection | None = None
        upserted = 0
        compute = 0.0
        async for message in request_iterator:
            if name is None:
                name = message.collection
                collection = hop.collection(name)
            elif message.collection != name:
                raise InvalidArgument(
                    "every message of an Upsert stream must name the same collection",
                    metadata={"field": "collection"},
                )
            assert collection is not None
            points = points_from_proto(
                message.points, collection.spec.dimension, hop.cfg.max_points_per_request
            )
            started = time.perf_counter()
            upserted += await hop.write(collection.upsert, points)
            compute += time.perf_counter() - started
        if name is None:  # the rule for every client stream (also applied by the guard)
            raise InvalidArgument(
                "an Upsert stream needs at least one message", reason="EMPTY_INPUT"
            )
        total = time.perf_counter() - began
        return pb.UpsertResponse(
            upserted=upserted, timings=[hop_timing("search", queue_s=0, compute_s=compute, total_s=total, batch_size=upserted)]
        )

    async def UpsertBatch(self, request, context):  # noqa: N802
        """Unary upsert of 1-1024 points, durable when it returns."""
        hop = self._hop
        began = time.perf_counter()
        collection = hop.collection(request.collection)
        if not request.points:
            raise InvalidArgument("points must not be empty", reason="EMPTY_INPUT")
        points = points_from_proto(
            request.points, collection.spec.dimension, hop.cfg.max_points_per_request
        )
        started = time.perf_counter()
        upserted = await hop.write(collection.upsert, points)
        now = time.perf_counter()
        return pb.UpsertBatchResponse(
            upserted=upserted,
            timings=[hop_timing(
                "search", compute_s=now - started, total_s=now - began, batch_size=len(points)
            )],
        )

    async def Delete(self, request, context):  # noqa: N802
        """Delete points by id (durably)."""
        collection = self._hop.collection(request.collection)
        ids = check_ids(request.ids)
        return pb.DeleteResponse(deleted=await self._hop.write(collection.delete, ids))

    async def Get(self, request, context):  # noqa: N802
        """Fetch points by id."""
        collection = self._hop.collection(request.collection)
        ids = check_ids(request.ids)
        found = await self._hop.read(
            lambda: collection.get(ids, with_vector=request.with_vector)
        )
        points = []
        for point in found:
            out = pb.Point(id=point.id, payload=payload_to_proto(point.payload))
            if point.vector is not None:
                out.vector.values.extend(point.vector.tolist())
            points.append(out)
        return pb.GetResponse(points=points)

    async def Search(self, request, context):  # noqa: N802
        """One search."""
        began = time.perf_counter()
        responses, timings = await self._hop.search([request], deadline_of(context))
        response = responses[0]
        _finish_timings(timings, began)
        response.timings.extend(timings)
        return response

    async def SearchBatch(self, request, context):  # noqa: N802
        """Many searches, embedded and searched in batches."""
        began = time.perf_counter()
        searches = list(request.searches)
        if not searches:
            raise InvalidArgument("searches must not be empty", reason="EMPTY_INPUT")
        if len(searches) > MAX_SEARCHES_PER_BATCH:
            raise InvalidArgument(
                f"at most {MAX_SEARCHES_PER_BATCH} searches", reason="TOO_MANY_INPUTS",
                metadata={"limit": MAX_SEARCHES_PER_BATCH},
            )
        responses, timings = await self._hop.search(searches, deadline_of(context))
        _finish_timings(timings, began)
        return pb.SearchBatchResponse(results=responses, timings=timings)

    async def Ingest(self, request_iterator, context):  # noqa: N802
        """Documents in; chunked, embedded and upserted; durable when it returns."""
        began = time.perf_counter()
        ingestor: Ingestor | None = None
        name = ""
        async for message in request_iterator:
            if ingestor is None:
                name = message.collection
                ingestor = await self._start_ingest(message)
            elif message.collection != name:
                raise InvalidArgument(
                    "every message of an Ingest stream must name the same collection",
                    metadata={"field": "collection"},
                )
            docs = documents_from_proto(message.documents)
            await ingestor.add(docs)
        if ingestor is None:
            raise InvalidArgument(
                "an Ingest stream needs at least one message", reason="EMPTY_INPUT"
            )
        stats = ingestor.stats
        total = time.perf_counter() - began
        return pb.IngestResponse(
            documents=stats.documents,
            chunks=stats.chunks,
            chunk_tokens=ingestor.settings.chunk_tokens,
            overlap_tokens=ingestor.settings.overlap_tokens,
            timings=[
                hop_timing("embed", queue_s=0, compute_s=stats.embed_s, total_s=stats.embed_s, batch_size=stats.chunks),
                hop_timing("search", queue_s=0, compute_s=stats.write_s, total_s=total, batch_size=stats.chunks),
            ],
        )

    async def _start_ingest(self, first: pb.IngestRequest) -> Ingestor:
        hop = self._hop
        collection = hop.collection(first.collection)
        chunking = first.chunking
        return await hop.ingestor(collection, chunking.chunk_tokens, chunking.overlap_tokens)



def _finish_timings(timings: list[common_pb2.HopTiming], began: float) -> None:
    """Stretch the "search" timing's total to the whole call as the hop saw it."""
    for t in timings:
        if t.hop == "search":
            t.total_us = int((time.perf_counter() - began) * 1e6)
