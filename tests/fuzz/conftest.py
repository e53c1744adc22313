"""The embedded default for the fuzz suite: the four real hops (fake engines, real search
over a temporary data directory) in one real server on port 0."""

from __future__ import annotations

import io
import logging

import grpc
import pytest

from server.engines.generator import model_specs
from server.servicers.embedding import EmbeddingHop
from server.servicers.generation import GenerationHop
from server.servicers.pipeline import PipelineHop
from server.servicers.rerank import RerankHop
from server.servicers.search import SearchHop
from tests.conftest import make_config, running
from tests.fuzz.fakes import EchoGenerator, FakeEmbedder, FakeReranker


def default_hops(config):
    """The embedded default's hops with fake engines (in its start order; the pipeline
    reaches the other four in-process)."""
    spec = model_specs(config.generation)[0]
    return [
        EmbeddingHop(FakeEmbedder()),
        SearchHop(),
        RerankHop(FakeReranker()),
        GenerationHop({spec.name: EchoGenerator()}),
        PipelineHop(),
    ]


@pytest.fixture
async def default_server(tmp_path):
    """(server, channel) of the embedded default with fake engines."""
    config = make_config(search={"data_dir": str(tmp_path / "data")})
    async with running(config, default_hops(config)) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, channel


@pytest.fixture
def captured_log():
    """Everything logged (WARNING and up) while the test runs, as one growing buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
