"""Fixtures of the pipeline tests: the pipeline hop on a real server on port 0 whose
upstreams (all four hops) are scriptable fakes on another real server."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

from backbone.v1 import pipeline_service_pb2_grpc as pb_grpc
from server.router.hop import RouterHop
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


@pytest.fixture(params=["direct", "routed"])
async def split(request):
    """The pipeline hop without the hops it calls, each a fake over gRPC: ``direct``, the
    pipeline alone in its process calling the fakes' address ([upstream]); ``routed``,
    the pipeline beside the router in one process (``backbone serve router pipeline``),
    calling them through the router's policy ([router.upstreams])."""
    embed, hops = EmbedScript(), HopScript()
    fake = await start_fake_hops(embed, hops)
    names = ("embedding", "search", "rerank", "generation")
    hop = PipelineHop()
    if request.param == "direct":
        config = make_config(upstream={f"{h}_address": fake.address for h in names})
        served = [hop]
    else:
        config = make_config(router={"upstreams": {h: [fake.address] for h in names},
                                     "start_wait_s": 5})
        served = [hop, RouterHop()]
    try:
        async with running(config, served) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                yield Split(pb_grpc.PipelineServiceStub(channel), embed, hops, hop)
    finally:
        await fake.stop()
