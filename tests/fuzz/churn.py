"""Create/delete churn of one collection against concurrent describe/list/search/upsert
through a real server, with the bookkeeping that checks the lifecycle's promises."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import grpc

from backbone.v1 import common_pb2
from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from tests.fuzz.wire import check_error

NAME = "churn"
DIMENSION = 8
# Codes each RPC may answer while its collection comes and goes.
ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@dataclass
class ChurnResult:
    """Codes by RPC, and the points acknowledged into the last incarnation."""

    codes: collections.Counter = field(default_factory=collections.Counter)
    cycles: int = 0
    # ids whose UpsertBatch was sent after the final CreateCollection was acknowledged
    # and was acknowledged itself: they must be readable.
    final_acked: set[str] = field(default_factory=set)
    bad: list[str] = field(default_factory=list)


def _vector(i: int) -> common_pb2.Vector:
    return common_pb2.Vector(values=[float((i + j) % 7 + 1) for j in range(DIMENSION)])


async def churn(channel: grpc.aio.Channel, seconds: float, readers: int = 2) -> ChurnResult:
    """Run the churn for ``seconds``; ends with the collection created. Bounded in time."""
    stub = pb_grpc.VectorSearchServiceStub(channel)
    result = ChurnResult()
    stop = asyncio.Event()  # the churner stops
    done = asyncio.Event()  # everyone else stops (a little after the final create)
    # Set while the collection is (as far as the churner knows) created; the instant of
    # the last acknowledged create.
    created_at = [0.0]
    acked: list[tuple[float, str]] = []  # (sent at, id) of acknowledged UpsertBatch calls

    async def call(rpc: str, coro) -> object | None:
        try:
            response = await coro
        except grpc.aio.AioRpcError as err:
            result.codes[(rpc, err.code().name)] += 1
            try:
                check_error(err)
            except AssertionError as exc:
                result.bad.append(f"{rpc}: {exc}")
            if err.code() not in ALLOWED:
                result.bad.append(f"{rpc}: {err.code().name} {err.details()}")
            return None
        result.codes[(rpc, "OK")] += 1
        return response

    async def churner() -> None:
        while not stop.is_set():
            await call("DeleteCollection", stub.DeleteCollection(pb.DeleteCollectionRequest(name=NAME), timeout=10))
            if await call("CreateCollection", stub.CreateCollection(
                pb.CreateCollectionRequest(name=NAME, dimension=DIMENSION), timeout=10
            )) is not None:
                created_at[0] = time.monotonic()
            result.cycles += 1
        # end created, so the acknowledged points of this last incarnation can be read
        if await call("CreateCollection", stub.CreateCollection(
            pb.CreateCollectionRequest(name=NAME, dimension=DIMENSION), timeout=10
        )) is not None:
            created_at[0] = time.monotonic()
        await asyncio.sleep(0.3)  # the others keep going against the last incarnation
        done.set()

    async def reader(k: int) -> None:
        i = 0
        while not done.is_set():
            i += 1
            await call("DescribeCollection", stub.DescribeCollection(pb.DescribeCollectionRequest(name=NAME), timeout=10))
            await call("ListCollections", stub.ListCollections(pb.ListCollectionsRequest(), timeout=10))
            await call("Search", stub.Search(pb.SearchRequest(
                collection=NAME, vector=_vector(i), top_k=3, with_payload=True
            ), timeout=10))
            await call("Get", stub.Get(pb.GetRequest(collection=NAME, ids=[f"r{k}-{i}"]), timeout=10))

    async def writer() -> None:
        i = 0
        while not done.is_set():
            i += 1
            point_id = f"p{i}"
            sent = time.monotonic()
            ok = await call("UpsertBatch", stub.UpsertBatch(pb.UpsertBatchRequest(
                collection=NAME, points=[pb.Point(id=point_id, vector=_vector(i))]
            ), timeout=10))
            if ok is not None:
                acked.append((sent, point_id))

    async def streamer() -> None:
        i = 0
        while not done.is_set():
            i += 1

            # One message a stream, all of it sent before the answer: a stream the server
            # ends (NOT_FOUND) while the client is still writing later messages can end
            # as a client-side "Internal error from Core" (seen here twice in ~1,000
            # streams), which says nothing about the lifecycle under test.
            def messages():
                yield pb.UpsertRequest(
                    collection=NAME,
                    points=[pb.Point(id=f"s{i}-{j}", vector=_vector(j)) for j in range(3)],
                )

            await call("Upsert", stub.Upsert(messages(), timeout=10))

    tasks = [asyncio.create_task(churner()), asyncio.create_task(writer()),
             asyncio.create_task(streamer())]
    tasks += [asyncio.create_task(reader(k)) for k in range(readers)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    # Points acknowledged into an earlier incarnation are gone with it: only those sent
    # after the final create was acknowledged must be readable.
    result.final_acked = {point_id for sent, point_id in acked if sent > created_at[0] > 0}
    return result
