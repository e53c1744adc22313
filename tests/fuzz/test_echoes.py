"""Bounded echoes: a user-supplied name comes back at most once, cut to QUOTE_CHARS with a
marker; a name over its documented limit is INVALID_ARGUMENT before any lookup; the error
for a 1 MB name has trailers under 2 KiB."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from backbone.v1 import (
    common_pb2,
    embedding_service_pb2 as emb,
    embedding_service_pb2_grpc as emb_grpc,
    generation_service_pb2 as gen,
    generation_service_pb2_grpc as gen_grpc,
    rerank_service_pb2 as rr,
    rerank_service_pb2_grpc as rr_grpc,
    vector_search_service_pb2 as vs,
    vector_search_service_pb2_grpc as vs_grpc,
)
from router.errors import QUOTE_CHARS, quote
from tests.fuzz.wire import check_error, trailers_bytes
from tests.server.server_fakes import only_error_info

MB = 1_000_000
TAG = "Q1w2E3r4T5"  # a name's distinctive start, to count its echoes


def _calls(name: str):
    """(label, stub class, method, request) with ``name`` in a name field."""
    vector = common_pb2.Vector(values=[0.0] * 8)
    field = vs.Filter(must=[vs.Condition(field=name, equals=struct_pb2.Value(string_value="x"))])
    return [
        ("describe", vs_grpc.VectorSearchServiceStub, "DescribeCollection", vs.DescribeCollectionRequest(name=name)),
        ("delete", vs_grpc.VectorSearchServiceStub, "DeleteCollection", vs.DeleteCollectionRequest(name=name)),
        ("get", vs_grpc.VectorSearchServiceStub, "Get", vs.GetRequest(collection=name, ids=["a"])),
        ("search", vs_grpc.VectorSearchServiceStub, "Search", vs.SearchRequest(collection=name, vector=vector, top_k=1)),
        ("filter", vs_grpc.VectorSearchServiceStub, "Search", vs.SearchRequest(collection="known", vector=vector, top_k=1, filter=field)),
        ("create", vs_grpc.VectorSearchServiceStub, "CreateCollection", vs.CreateCollectionRequest(name=name, dimension=8)),
        ("embed", emb_grpc.EmbeddingServiceStub, "Embed", emb.EmbedRequest(inputs=["hi"], model=name)),
        ("rerank", rr_grpc.RerankServiceStub, "Rerank", rr.RerankRequest(query="q", documents=["d"], model=name)),
        ("generate", gen_grpc.GenerationServiceStub, "Generate", gen.GenerateRequest(prompt="hi", model=name)),
    ]


async def _error(channel, stub_cls, method, request) -> grpc.aio.AioRpcError:
    call = getattr(stub_cls(channel), method)(request, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "Generate":
            async for _ in call:
                pass
        else:
            await call
    return caught.value


@pytest.mark.parametrize("name,expect", [
    (TAG + "z" * MB, "INVALID_ARGUMENT"),
    (TAG + "😀" * 1000, "INVALID_ARGUMENT"),
    (TAG + "y" * 50, None),  # within every limit: NOT_FOUND (or INVALID_FILTER), echoed once
])
async def test_names_are_echoed_once_and_bounded(default_server, name, expect):
    _, channel = default_server
    stub = vs_grpc.VectorSearchServiceStub(channel)
    known = await stub.CreateCollection(vs.CreateCollectionRequest(name="known", dimension=8))
    assert known.collection.name == "known"
    for label, stub_cls, method, request in _calls(name):
        if label == "create" and expect is None:
            continue  # a valid name: created, no error to look at
        err = await _error(channel, stub_cls, method, request)
        check_error(err)
        assert trailers_bytes(err) < 2048, (label, trailers_bytes(err))
        if expect is not None:
            assert err.code().name == expect, (label, err.code(), err.details())
        else:
            assert err.code().name in ("NOT_FOUND", "INVALID_ARGUMENT"), (label, err.code())
        info = only_error_info(err)
        text = err.details() + "".join(info.metadata.values())
        assert text.count(TAG) <= 1, (label, err.details(), dict(info.metadata))


def test_quote_cuts_with_a_marker_and_keeps_short_values():
    assert quote("abc") == "abc"
    cut = quote("x" * (QUOTE_CHARS + 5))
    assert cut == "x" * QUOTE_CHARS + "…(+5 chars)"
    assert quote("a\nb") == "a\\nb"
