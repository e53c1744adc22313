"""Process lifecycle: health during start-up, reflection, watchdog, graceful shutdown, CLI.

In-process tests use fake hops gated by ``asyncio.Event``; the last test starts the real
``serve embedding`` process (bundled MiniLM) and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import server.app as app
from backbone.v1 import embedding_service_pb2 as emb_pb2
from backbone.v1 import embedding_service_pb2_grpc as emb_grpc
from perf.harness import child_env, start_announced_async
from server.app import BackboneServer, contract_services
from server.interceptors import InFlight, _around
from server.main import main as server_main
from server_fakes import (
    EMBEDDING_SERVICE,
    FakeEmbeddingHop,
    embed_request,
    health_status,
    only_error_info,
    wait_for_health,
)
from tests.conftest import make_config, running

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RERANK_SERVICE = "backbone.v1.RerankService"


async def embed(stub: emb_grpc.EmbeddingServiceStub, *texts: str) -> emb_pb2.EmbedResponse:
    """One Embed call as a coroutine (for tasks)."""
    return await stub.Embed(embed_request(*texts), timeout=30)


class FakeRerankHop(FakeEmbeddingHop):
    """A second hop (health only: it registers no servicer) to tell hops apart."""

    name = "rerank"
    service_names = (RERANK_SERVICE,)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Nothing to register."""


class BrokenHop(FakeEmbeddingHop):
    """A hop whose start fails (its model cannot load)."""

    async def start(self, ctx) -> None:
        """Fail like a missing model would."""
        raise FileNotFoundError("model directory missing")


async def test_health_is_not_serving_until_each_hop_has_started():
    first_gate, second_gate = asyncio.Event(), asyncio.Event()
    first, second = FakeEmbeddingHop(first_gate), FakeRerankHop(second_gate)
    server = BackboneServer(make_config(), [first, second])
    starting = asyncio.create_task(server.start())
    try:
        await asyncio.wait_for(first.start_entered.wait(), 10)
        async with grpc.aio.insecure_channel(server.address) as channel:
            # the port is open, the hop is loading: everything NOT_SERVING
            for service in ("", EMBEDDING_SERVICE, RERANK_SERVICE):
                assert await health_status(channel, service, timeout=10) == NOT_SERVING
            first_gate.set()
            await wait_for_health(channel, SERVING, EMBEDDING_SERVICE)
            await asyncio.wait_for(second.start_entered.wait(), 10)
            # one hop ready, the other still loading: the process is not ready
            assert await health_status(channel, "", timeout=10) == NOT_SERVING
            assert await health_status(channel, RERANK_SERVICE, timeout=10) == NOT_SERVING
            assert not starting.done()
            second_gate.set()
            await asyncio.wait_for(starting, 10)
            for service in ("", EMBEDDING_SERVICE, RERANK_SERVICE):
                assert await health_status(channel, service, timeout=10) == SERVING
            assert server.context.local == {"embedding": first, "rerank": second}
    finally:
        first_gate.set()
        second_gate.set()
        await asyncio.gather(starting, return_exceptions=True)
        await server.stop(grace=0)


async def test_objects_left_by_starting_a_hop_are_frozen_out_of_garbage_collection():
    import gc

    gc.unfreeze()
    async with running(make_config(), [FakeEmbeddingHop(None)]):
        # What loading left behind is frozen (a full collection no longer walks it) and
        # nothing still tracked predates the start.
        assert gc.get_freeze_count() > 0
        assert len(gc.get_objects(generation=2)) < gc.get_freeze_count()


async def test_a_hop_that_fails_to_start_fails_the_start_and_never_serves():
    hop = BrokenHop()
    server = BackboneServer(make_config(), [hop])
    try:
        with pytest.raises(FileNotFoundError):
            await server.start()
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await health_status(channel, "", timeout=10) == NOT_SERVING
            assert await health_status(channel, EMBEDDING_SERVICE, timeout=10) == NOT_SERVING
    finally:
        await server.stop(grace=0)
    assert hop.stopped


async def test_reflection_lists_the_backbone_services():
    async with running(make_config(), [FakeEmbeddingHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=EMBEDDING_SERVICE),
            ]
            responses = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=10)]
    listed = {s.name for s in responses[0].list_services_response.service}
    assert set(contract_services()) <= listed
    assert {"backbone.v1.EmbeddingService", "backbone.v1.VectorSearchService",
            "backbone.v1.RerankService", "backbone.v1.GenerationService",
            "backbone.v1.PipelineService", "backbone.v1.RouterService",
            "grpc.health.v1.Health"} <= listed
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert files, responses[1]
    names = {descriptor_pb2.FileDescriptorProto.FromString(f).name for f in files}
    assert "backbone/v1/embedding_service.proto" in names


async def test_graceful_shutdown_flips_health_first_and_lets_in_flight_calls_finish():
    hop = FakeEmbeddingHop()
    server = BackboneServer(make_config(server={"grace_seconds": 30}), [hop])
    await server.start()
    # Observe the moment the gRPC server itself begins to stop, and what health says then.
    grpc_stop = server._server.stop
    grpc_stopping = asyncio.Event()
    health_when_grpc_stops = []

    async def observed_stop(grace):
        async with grpc.aio.insecure_channel(server.address) as probe:
            health_when_grpc_stops.append(await health_status(probe, timeout=10))
        grpc_stopping.set()
        await grpc_stop(grace)

    server._server.stop = observed_stop
    stopping = None
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = emb_grpc.EmbeddingServiceStub(channel)
            hop.call_gate = asyncio.Event()
            in_flight = asyncio.create_task(embed(stub, "abc"))
            await asyncio.wait_for(hop.call_entered.wait(), 10)

            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            stopping = asyncio.create_task(server.stop())
            assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
            watch.cancel()  # our watch is in flight too; let it go
            await asyncio.wait_for(grpc_stopping.wait(), 10)
            assert health_when_grpc_stops == [NOT_SERVING], "health must flip before the stop"
            assert not in_flight.done(), "the in-flight call ended before it was released"
            calls_before = hop.calls

            # new calls are refused while the old one drains (gRPC core answers UNAVAILABLE,
            # or CANCELLED for a call that raced its GOAWAY); the handler never runs
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(embed_request(), timeout=10)
            assert hop.calls == calls_before
            assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert not stopping.done()
            assert not hop.stopped, "hops must outlive the calls in flight"

            hop.call_gate.set()
            response = await asyncio.wait_for(in_flight, 10)
            assert list(response.embeddings[0].values) == [0.0, 3.0]
        await asyncio.wait_for(stopping, 10)  # well within the 30 s grace
        assert hop.stopped
    finally:
        if hop.call_gate is not None:
            hop.call_gate.set()
        if stopping is None:
            await server.stop(grace=0)
        else:
            await asyncio.gather(stopping, return_exceptions=True)


async def test_in_flight_calls_past_the_grace_are_answered_unavailable_and_the_server_stops():
    hop = FakeEmbeddingHop()
    server = BackboneServer(make_config(), [hop])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = emb_grpc.EmbeddingServiceStub(channel)
            # a stream that got one answer, then one call of each kind held in the hop
            stream = stub.EmbedStream(timeout=30)
            await stream.write(emb_pb2.EmbedStreamRequest(request=embed_request("a"), id="1"))
            assert (await asyncio.wait_for(stream.read(), 10)).id == "1"
            hop.call_gate = asyncio.Event()  # never set before the stop
            hop.call_entered.clear()
            await stream.write(emb_pb2.EmbedStreamRequest(request=embed_request("b"), id="2"))
            await asyncio.wait_for(hop.call_entered.wait(), 10)
            hop.call_entered.clear()
            unary = asyncio.create_task(embed(stub))
            await asyncio.wait_for(hop.call_entered.wait(), 10)

            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(server.stop(grace=1.0), 10)
            took = asyncio.get_running_loop().time() - started
            # answered by the server before gRPC core's own cut at the end of the grace
            # (a bare "Cancelling all calls" with no ErrorInfo), with a status a client may
            # retry and the usual single ErrorInfo
            for call in (unary, stream.read()):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await asyncio.wait_for(call, 10)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
                assert only_error_info(caught.value).reason == "UNAVAILABLE"
                assert "shutting down" in caught.value.details()
            assert 0.4 <= took < 0.9, took
        assert hop.stopped
    finally:
        if hop.call_gate is not None:
            hop.call_gate.set()
        await server.stop(grace=0)  # idempotent


async def test_a_caller_that_leaves_is_not_answered_for_and_the_server_keeps_serving():
    hop = FakeEmbeddingHop()
    async with running(make_config(), [hop]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = emb_grpc.EmbeddingServiceStub(channel)
            hop.call_gate = asyncio.Event()
            call = stub.Embed(embed_request(), timeout=30)
            await asyncio.wait_for(hop.call_entered.wait(), 10)
            call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED
            # the cancelled handler has left the calls in flight, which the shutdown cuts
            for _ in range(100):
                if not len(server._guard.in_flight):
                    break
                await asyncio.sleep(0.01)
            assert len(server._guard.in_flight) == 0
            hop.call_gate.set()
            assert list((await embed(stub, "abc")).embeddings[0].values) == [0.0, 3.0]


async def test_watchdog_turns_an_unhealthy_hop_not_serving(monkeypatch):
    monkeypatch.setattr(app, "WATCHDOG_PERIOD_S", 0.02)
    sick, fine = FakeEmbeddingHop(), FakeRerankHop()
    async with running(make_config(), [sick, fine]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            for service in ("", EMBEDDING_SERVICE, RERANK_SERVICE):
                assert await health_status(channel, service, timeout=10) == SERVING
            sick.is_healthy = False  # e.g. its batcher task died
            await wait_for_health(channel, NOT_SERVING, EMBEDDING_SERVICE)
            await wait_for_health(channel, NOT_SERVING, "")
            assert await health_status(channel, RERANK_SERVICE, timeout=10) == SERVING
            # it stays down even if the hop claims to recover: a dead task does not revive
            sick.is_healthy = True
            for _ in range(3):  # three more watchdog rounds, counted on the healthy hop
                fine.health_checked.clear()
                await asyncio.wait_for(fine.health_checked.wait(), 10)
            assert await health_status(channel, EMBEDDING_SERVICE, timeout=10) == NOT_SERVING


class CrashingCheckHop(FakeRerankHop):
    """A hop whose health check itself raises."""

    def healthy(self) -> bool:
        """Broken once told to be unhealthy."""
        self.health_checked.set()
        if not self.is_healthy:
            raise RuntimeError("health check crashed")
        return True


async def test_a_raising_health_check_counts_as_unhealthy_and_the_watchdog_lives_on(monkeypatch):
    monkeypatch.setattr(app, "WATCHDOG_PERIOD_S", 0.02)
    crashing, later = CrashingCheckHop(), FakeEmbeddingHop()
    async with running(make_config(), [later, crashing]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await wait_for_health(channel, SERVING, "")
            crashing.is_healthy = False
            await wait_for_health(channel, NOT_SERVING, RERANK_SERVICE)
            assert await health_status(channel, EMBEDDING_SERVICE, timeout=10) == SERVING
            # the watchdog still watches the other hop
            later.is_healthy = False
            await wait_for_health(channel, NOT_SERVING, EMBEDDING_SERVICE)


# -- the command ------------------------------------------------------------------------


def test_unknown_service_is_refused_by_the_command(capsys):
    assert server_main(["serve", "nosuchservice", "--port", "0"]) == 2
    assert "nosuchservice" in capsys.readouterr().err


def test_bad_config_is_refused_by_the_command(capsys, tmp_path):
    assert server_main(["serve", "embedding", "--set", "server.port=abc"]) == 2
    assert "server.port" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nno_such_key = 1\n")
    assert server_main(["serve", "embedding", "--config", str(bad)]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert server_main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2


def test_backbone_console_command_routes_serve_to_the_server():
    from clients.cli import build_parser
    from server.main import serve

    args = build_parser("serve").parse_args(
        ["serve", "embedding", "--port", "0", "--host", "127.0.0.1", "--config", "x.toml"]
    )
    assert args.func is serve
    assert (args.services, args.port, args.host, args.config) == (
        ["embedding"], 0, "127.0.0.1", "x.toml",
    )


GRACE_S = 5


@pytest.mark.slow
async def test_serve_embedding_process_serves_and_exits_cleanly_on_sigterm(tmp_path):
    env = child_env({
        "BACKBONE_SERVER__AUTH_TOKEN": "process-secret-token",
        "BACKBONE_SERVER__METRICS_PORT": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    })
    stderr_path = tmp_path / "server.log"
    server = await start_announced_async(
        [sys.executable, "-m", "server.main", "serve", "embedding", "--port", "0",
         "--set", f"server.grace_seconds={GRACE_S}"],
        "embedding server", stderr_path, env=env, timeout_s=300,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await health_status(channel, "", timeout=10) == SERVING
            assert await health_status(channel, EMBEDDING_SERVICE, timeout=10) == SERVING
            stub = emb_grpc.EmbeddingServiceStub(channel)
            token = (("authorization", "Bearer process-secret-token"),)
            response = await stub.Embed(
                emb_pb2.EmbedRequest(inputs=["hello world"], normalize=True),
                metadata=token, timeout=30,
            )
            assert response.dimensions == 384
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(embed_request(), timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        server.signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.proc.wait(), GRACE_S + 10) == 0
    finally:
        await server.kill()
    log = stderr_path.read_text()
    assert "process-secret-token" not in log, "the token leaked into the log"
    config_line = next(line for line in log.splitlines() if "effective config:" in line)
    shown = json.loads(config_line.split("effective config:", 1)[1])
    assert shown["server"]["auth_token"] == "***"
    assert shown["server"]["grace_seconds"] == GRACE_S
    assert "shutting down" in log


class _Context:
    """The part of a grpc.aio servicer context the guard's wrapper uses."""

    def __init__(self) -> None:
        self.aborted: tuple | None = None

    async def abort(self, code, details, trailing_metadata=()):
        self.aborted = (code, details, trailing_metadata)
        raise grpc.aio.AbortError()


async def test_a_stream_cut_while_grpc_sends_its_response_is_answered_once_the_send_ends():
    in_flight = InFlight()
    closed = []

    async def responses(request, context):
        try:
            for i in range(3):
                yield i
        finally:
            closed.append("closed")

    wrapper = _around("/m", True, lambda context: None, in_flight)(responses)
    context = _Context()
    stream = wrapper(None, context)
    assert await stream.__anext__() == 0  # suspended at its yield: gRPC is sending it
    # counted but not cancelled: a cancel inside gRPC's send would end the call CANCELLED
    # (here it would cancel this very test's task)
    assert in_flight.cut() == 1
    with pytest.raises(grpc.aio.AbortError):
        await stream.__anext__()
    code, details, trailers = context.aborted
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
    assert [key for key, _ in trailers] == ["grpc-status-details-bin"]
    assert closed == ["closed"], "the handler's stream must be closed, not left to the GC"
    assert len(in_flight) == 0
