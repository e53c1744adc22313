"""Fixtures of the pipeline tests: the pipeline hop on a real server on port 0 whose
upstreams (all four hops) are scriptable fakes on another real server."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

from backbone.v1 import pipeline_service_pb2_grpc as pb_grpc
from server.servicers.pipeline import PipelineHop
from tests.conftest import make_config, running
from tests.pipeline.fakes import EmbedScript, HopScript, start_fake_hops


@dataclass
class Split:
    """The pipeline (a stub on it) and the fakes' scripts."""

    stub: pb_grpc.PipelineServiceStub
    embed: EmbedScript
    hops: HopScript
    hop: PipelineHop


@pytest.fixture
async def split():
    """Pipeline hop alone in its process; every hop it calls is a fake over gRPC."""
    embed, hops = EmbedScript(), HopScript()
    fake = await start_fake_hops(embed, hops)
    upstream = {f"{h}_address": fake.address for h in ("embedding", "search", "rerank", "generation")}
    hop = PipelineHop()
    try:
        async with running(make_config(upstream=upstream), [hop]) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                yield Split(pb_grpc.PipelineServiceStub(channel), embed, hops, hop)
    finally:
        await fake.stop()
