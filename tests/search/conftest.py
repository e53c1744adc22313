"""Fixtures of the search hop tests: servers on port 0 with real FAISS (and MiniLM)."""

from __future__ import annotations

import grpc
import pytest

from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from server.servicers.embedding import EmbeddingHop
from server.servicers.search import SearchHop
from tests.conftest import error_reason, make_config, running


def search_config(data_dir, **search):
    """A test config: collections under ``data_dir``, one OpenMP thread per FAISS call."""
    return make_config(search={"data_dir": str(data_dir), "faiss_threads": 1, "faiss_build_threads": 1, **search})



async def expect_error(call, code: grpc.StatusCode, reason: str):
    """Await ``call`` and check it fails with ``code`` and ErrorInfo ``reason``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert error_reason(info.value) == reason, info.value.details()
    return info.value


@pytest.fixture(scope="module")
async def text_server(minilm, tmp_path_factory):
    """Embedding + search hops in one process (the embedded default), real MiniLM."""
    config = search_config(tmp_path_factory.mktemp("collections"))
    async with running(config, [EmbeddingHop(embedder=minilm), SearchHop()]) as server:
        yield server


@pytest.fixture
async def text_stub(text_server):
    """A VectorSearchService stub on the text server."""
    async with grpc.aio.insecure_channel(text_server.address) as channel:
        yield pb_grpc.VectorSearchServiceStub(channel)
