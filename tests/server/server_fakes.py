"""A fake embedding hop and client-side helpers for the server-core tests.

The fake tests server policy and plumbing (health, errors, auth, limits, shutdown), never
model behaviour: it answers ``EmbeddingService`` with fixed two-dimensional vectors, counts
the calls that reached it, and can be gated (``asyncio.Event``) or told what to raise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backbone.v1 import embedding_service_pb2 as emb_pb2
from backbone.v1 import embedding_service_pb2_grpc as emb_grpc
from server.hop import HopContext

EMBEDDING_SERVICE = "backbone.v1.EmbeddingService"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class FakeEmbeddingHop:
    """A Hop serving EmbeddingService without a model.

    ``start_gate``: when given, ``start()`` sets ``start_entered`` and blocks until the gate
    is set. ``call_gate``: when set to an Event, each Embed sets ``call_entered`` and waits
    for it. ``raise_in_call``: a factory of the exception calls raise (None: answer), from
    the ``raise_from_call``-th call reaching the servicer on (1-based).
    """

    name = "embedding"
    service_names = (EMBEDDING_SERVICE,)

    def __init__(self, start_gate: asyncio.Event | None = None) -> None:
        self.start_gate = start_gate
        self.start_entered = asyncio.Event()
        self.call_gate: asyncio.Event | None = None
        self.call_entered = asyncio.Event()
        self.raise_in_call: Callable[[], BaseException] | None = None
        self.raise_from_call = 1
        self.calls = 0
        self.started = False
        self.stopped = False
        self.is_healthy = True
        self.health_checked = asyncio.Event()

    async def start(self, ctx: HopContext) -> None:
        """Optionally block on the start gate, then report started."""
        self.start_entered.set()
        if self.start_gate is not None:
            await self.start_gate.wait()
        self.started = True

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the fake EmbeddingService."""
        emb_grpc.add_EmbeddingServiceServicer_to_server(FakeEmbeddingServicer(self), server)

    def healthy(self) -> bool:
        """What the test says; sets ``health_checked`` on every poll."""
        self.health_checked.set()
        return self.is_healthy

    async def stop(self) -> None:
        """Record the stop."""
        self.stopped = True


class FakeEmbeddingServicer(emb_grpc.EmbeddingServiceServicer):
    """Counts calls; raises or waits as its hop is told; answers [i, len(text)] vectors."""

    def __init__(self, hop: FakeEmbeddingHop) -> None:
        self._hop = hop

    async def _answer(self, request: emb_pb2.EmbedRequest) -> emb_pb2.EmbedResponse:
        hop = self._hop
        hop.calls += 1
        hop.call_entered.set()
        if hop.call_gate is not None:
            await hop.call_gate.wait()
        if hop.raise_in_call is not None and hop.calls >= hop.raise_from_call:
            raise hop.raise_in_call()
        response = emb_pb2.EmbedResponse(model="fake", dimensions=2)
        for i, text in enumerate(request.inputs):
            response.embeddings.add(values=[float(i), float(len(text))])
        return response

    async def Embed(self, request, context):  # noqa: N802 - gRPC method name
        """One fixed answer per call."""
        return await self._answer(request)

    async def EmbedStream(self, request_iterator, context):  # noqa: N802 - gRPC method name
        """One answer per message, in order."""
        async for message in request_iterator:
            response = await self._answer(message.request)
            yield emb_pb2.EmbedStreamResponse(response=response, id=message.id)


# -- client side ---------------------------------------------------------------------


def embed_request(*texts: str) -> emb_pb2.EmbedRequest:
    """An EmbedRequest for ``texts`` (default one short text)."""
    return emb_pb2.EmbedRequest(inputs=list(texts or ("hello",)))


def error_infos(error: grpc.aio.AioRpcError) -> list[error_details_pb2.ErrorInfo]:
    """Every ErrorInfo in the call's google.rpc.Status trailer (checked against the call)."""
    blobs = [v for k, v in (error.trailing_metadata() or ()) if k == STATUS_DETAILS_KEY]
    if not blobs:
        return []
    assert len(blobs) == 1, "more than one grpc-status-details-bin trailer"
    status = status_pb2.Status.FromString(blobs[0])
    assert status.code == error.code().value[0], "Status proto code differs from the call's"
    assert status.message == error.details(), "Status proto message differs from the call's"
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    return infos


def only_error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The single ErrorInfo of a failed call; fails the test unless there is exactly one."""
    infos = error_infos(error)
    assert len(infos) == 1, f"want exactly one ErrorInfo, got {len(infos)}: {error!r}"
    return infos[0]


async def health_status(channel: grpc.aio.Channel, service: str = "", **kwargs) -> int:
    """The health status of ``service`` (HealthCheckResponse.ServingStatus value)."""
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), **kwargs)
    return response.status


async def wait_for_health(
    channel: grpc.aio.Channel, want: int, service: str = "", timeout: float = 10.0
) -> None:
    """Follow Health.Watch until ``service`` reports ``want`` (fails after ``timeout`` s)."""
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=service))
    try:
        async with asyncio.timeout(timeout):
            async for response in call:
                if response.status == want:
                    return
    finally:
        call.cancel()
    raise AssertionError(f"health watch of {service!r} ended before reaching {want}")


def stream_request(i: int, *texts: str) -> emb_pb2.EmbedStreamRequest:
    """The ``i``-th EmbedStream message."""
    return emb_pb2.EmbedStreamRequest(id=str(i), request=embed_request(*texts))


async def embed_stream(
    stub: emb_grpc.EmbeddingServiceStub,
    requests: list[emb_pb2.EmbedStreamRequest],
    *,
    metadata=None,
    timeout: float = 10.0,
) -> tuple[list[emb_pb2.EmbedStreamResponse], grpc.aio.AioRpcError | None]:
    """Ping-pong over EmbedStream: write one message, read its answer, then the next.

    Writing only while the server waits for a message avoids a grpc.aio client race (a write
    that crosses the server's final status is reported as "Internal error from Core"
    instead of that status). With no requests, nothing is written and the call is only
    read: the server must end it by itself (e.g. refusing it). Returns the responses
    received and the call's error (None if it ended OK).
    """
    call = stub.EmbedStream(metadata=metadata, timeout=timeout)
    received: list[emb_pb2.EmbedStreamResponse] = []
    try:
        for request in requests:
            await call.write(request)
            response = await call.read()
            if response is grpc.aio.EOF:
                return received, None
            received.append(response)
        if requests:
            await call.done_writing()
        tail = await call.read()
        assert tail is grpc.aio.EOF, f"unexpected extra response {tail}"
    except grpc.aio.AioRpcError as exc:
        return received, exc
    return received, None
