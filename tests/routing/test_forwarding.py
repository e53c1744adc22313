"""The router forwards every kind of RPC to real grpc.aio replicas (fakes with chosen
faults): bytes through, errors relayed with their ErrorInfo, metadata and deadlines
forwarded, streams kept streams, cancellation passed on, health and ListEndpoints."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backbone.v1 import (
    embedding_service_pb2 as epb,
    embedding_service_pb2_grpc,
    generation_service_pb2 as gpb,
    generation_service_pb2_grpc,
    router_service_pb2 as rpb,
    router_service_pb2_grpc,
)
from tests.conftest import error_reason
from tests.routing.conftest import fakes, router_for

EMBED = "backbone.v1.EmbeddingService"


async def test_unary_forwarding_metadata_deadline_and_bad_input_never_opens_breakers():
    async with fakes(2) as replicas, router_for(
            {"embedding": [r.address for r in replicas]}, breaker_consecutive=3) as (server, ch):
        stub = embedding_service_pb2_grpc.EmbeddingServiceStub(ch)
        md = (("authorization", "Bearer t"), ("x-backbone-priority", "low"),
              ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
        call = stub.Embed(epb.EmbedRequest(inputs=["abc", "de"]), timeout=2.0, metadata=md)
        response = await call
        assert [e.values[0] for e in response.embeddings] == [3.0, 2.0]
        served = next(r for r in replicas if r.calls)
        assert served.last_metadata["x-backbone-priority"] == "low"
        assert served.last_metadata["traceparent"].startswith("00-0af7")
        assert served.last_metadata["authorization"] == "Bearer t"
        # the caller's 2 s minus a reserve (gRPC rounds deadlines on the wire: a little slack)
        assert 1.5 < served.last_time_remaining < 2.05
        keys = dict(await call.trailing_metadata())
        assert "backbone-in-flight" in keys  # the router's own load, not the replica's
        for _ in range(30):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Embed(epb.EmbedRequest(inputs=["bad"]), timeout=2)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert error_reason(err.value) == "INVALID_INPUT"
        assert sum(r.calls for r in replicas) == 31, "bad input is never retried"
        listing = await router_service_pb2_grpc.RouterServiceStub(ch).ListEndpoints(
            rpb.ListEndpointsRequest())
        assert [e.address for e in listing.endpoints] == sorted(r.address for r in replicas)
        assert all(e.breaker == rpb.BREAKER_STATE_CLOSED for e in listing.endpoints)
        assert all(e.health == rpb.ENDPOINT_HEALTH_SERVING for e in listing.endpoints)
        assert sum(e.calls for e in listing.endpoints) == 31
        assert listing.retry_budget_left[EMBED] > 0


async def test_failing_replica_is_retried_elsewhere_and_its_breaker_opens():
    async with fakes(3) as replicas, router_for(
            {"embedding": [r.address for r in replicas]}, breaker_consecutive=3) as (server, ch):
        replicas[0].fail_all = True
        stub = embedding_service_pb2_grpc.EmbeddingServiceStub(ch)
        for _ in range(60):
            await stub.Embed(epb.EmbedRequest(inputs=["x"]), timeout=2)  # never fails
        listing = await router_service_pb2_grpc.RouterServiceStub(ch).ListEndpoints(
            rpb.ListEndpointsRequest(service=EMBED))
        bad = next(e for e in listing.endpoints if e.address == replicas[0].address)
        assert bad.breaker in (rpb.BREAKER_STATE_OPEN, rpb.BREAKER_STATE_HALF_OPEN)
        assert replicas[0].calls <= 10, "open breaker keeps calls off it"


async def test_health_follows_replicas_and_unconfigured_services_are_unimplemented():
    async with fakes(1) as replicas, router_for({"embedding": [replicas[0].address]}) as (server, ch):
        health = health_pb2_grpc.HealthStub(ch)
        check = lambda name: health.Check(health_pb2.HealthCheckRequest(service=name))  # noqa: E731
        assert (await check("")).status == health_pb2.HealthCheckResponse.SERVING
        assert (await check("backbone.v1.RerankService")).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await replicas[0].set_serving(False)
        for _ in range(100):
            if (await check("")).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.01)
        assert (await check(EMBED)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await embedding_service_pb2_grpc.EmbeddingServiceStub(ch).Embed(
                epb.EmbedRequest(inputs=["x"]), timeout=2)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        gen = generation_service_pb2_grpc.GenerationServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gen.ListModels(gpb.ListModelsRequest(), timeout=2)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_streams_stay_streams_and_cancels_reach_the_replica():
    async with fakes(2, token_delay_s=0.01) as replicas, router_for(
            {"embedding": [r.address for r in replicas],
             "generation": [r.address for r in replicas]}) as (server, ch):
        gen = generation_service_pb2_grpc.GenerationServiceStub(ch)
        call = gen.Generate(gpb.GenerateRequest(prompt="a b c", sampling=gpb.SamplingParams(max_tokens=5)),
                            timeout=5)
        texts = [m.delta.text async for m in call if m.HasField("delta")]
        assert texts == ["a ", "b ", "c ", "a ", "b "]
        # cancelled mid-stream by the caller: the replica's generation ends too
        for _ in range(10):
            call = gen.Generate(gpb.GenerateRequest(prompt="x", sampling=gpb.SamplingParams(max_tokens=500)),
                                timeout=5)
            await call.read()
            call.cancel()
        # and by the caller's deadline
        call = gen.Generate(gpb.GenerateRequest(prompt="x", sampling=gpb.SamplingParams(max_tokens=500)),
                            timeout=0.2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(200):
            if all(r.active_generations == 0 for r in replicas):
                break
            await asyncio.sleep(0.01)
        assert [r.active_generations for r in replicas] == [0, 0], "no generation left running"
        assert sum(r.generations_cancelled for r in replicas) == 11
        # Abort reaches the replica that has the request
        assert (await gen.Abort(gpb.AbortRequest(request_id="r1"), timeout=2)).aborted
        assert not (await gen.Abort(gpb.AbortRequest(request_id="nobody"), timeout=2)).aborted
        # bidi: EmbedStream relays both ways, in order
        emb = embedding_service_pb2_grpc.EmbeddingServiceStub(ch)

        async def requests():
            for i in range(5):
                yield epb.EmbedStreamRequest(id=str(i), request=epb.EmbedRequest(inputs=["x" * i]))

        answers = [a async for a in emb.EmbedStream(requests(), timeout=5)]
        assert [(a.id, a.response.embeddings[0].values[0]) for a in answers] == [
            (str(i), float(i)) for i in range(5)]
