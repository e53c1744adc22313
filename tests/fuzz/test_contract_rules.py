"""One rule for enums (an unknown number is INVALID_ARGUMENT naming the field, on every
RPC) and one for empty client streams (EMPTY_INPUT for every stream-in, unary-out RPC)."""

from __future__ import annotations

import grpc
import pytest

from backbone.v1 import (
    common_pb2,
    embedding_service_pb2 as emb,
    embedding_service_pb2_grpc as emb_grpc,
    rerank_service_pb2 as rr,
    rerank_service_pb2_grpc as rr_grpc,
    vector_search_service_pb2 as vs,
    vector_search_service_pb2_grpc as vs_grpc,
)
from tests.fuzz.wire import check_error, contract_methods, raw_call
from tests.server.server_fakes import only_error_info

VECTOR = common_pb2.Vector(values=[1.0] * 8)


def _cases():
    return [
        (emb_grpc.EmbeddingServiceStub, "Embed", emb.EmbedRequest(inputs=["hi"], truncation=99), "truncation"),
        (emb_grpc.EmbeddingServiceStub, "Embed", emb.EmbedRequest(inputs=["hi"], truncation=-1), "truncation"),
        (rr_grpc.RerankServiceStub, "Rerank", rr.RerankRequest(query="q", documents=["d"], truncation=99), "truncation"),
        (vs_grpc.VectorSearchServiceStub, "CreateCollection", vs.CreateCollectionRequest(name="n", dimension=8, metric=99), "metric"),
        (vs_grpc.VectorSearchServiceStub, "CreateCollection", vs.CreateCollectionRequest(name="n", dimension=8, index_kind=-3), "index_kind"),
        (vs_grpc.VectorSearchServiceStub, "Search", vs.SearchRequest(collection="c", vector=VECTOR, top_k=1, mode=42), "mode"),
        (vs_grpc.VectorSearchServiceStub, "SearchBatch", vs.SearchBatchRequest(searches=[
            vs.SearchRequest(collection="c", vector=VECTOR, top_k=1),
            vs.SearchRequest(collection="c", vector=VECTOR, top_k=1, mode=9),
        ]), "searches[1].mode"),
    ]


@pytest.mark.parametrize("stub_cls,method,request_,field", _cases(),
                         ids=[f"{c[1]}-{c[3]}-{i}" for i, c in enumerate(_cases())])
async def test_unknown_enum_values_are_invalid_argument_naming_the_field(
    default_server, stub_cls, method, request_, field
):
    _, channel = default_server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub_cls(channel), method)(request_, timeout=10)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    info = only_error_info(err)
    assert info.reason == "INVALID_INPUT" and info.metadata["field"] == field


async def test_an_unknown_enum_inside_a_stream_is_invalid_argument(default_server):
    _, channel = default_server
    stub = emb_grpc.EmbeddingServiceStub(channel)
    message = emb.EmbedStreamRequest(id="1", request=emb.EmbedRequest(inputs=["a"], truncation=7))
    call = stub.EmbedStream(iter([message]), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert only_error_info(caught.value).metadata["field"] == "request.truncation"


async def test_known_enum_values_still_work(default_server):
    _, channel = default_server
    stub = emb_grpc.EmbeddingServiceStub(channel)
    response = await stub.Embed(emb.EmbedRequest(
        inputs=["hi"], truncation=common_pb2.TRUNCATION_POLICY_REJECT
    ), timeout=10)
    assert len(response.embeddings) == 1


async def test_every_client_streaming_rpc_refuses_an_empty_stream(default_server):
    _, channel = default_server
    stream_in = [(m, cs, ss) for m, cs, ss in contract_methods() if cs and not ss]
    assert {m.rsplit("/", 1)[1] for m, _, _ in stream_in} >= {"Upsert", "Ingest"}
    for method, cs, ss in stream_in:
        code, err = await raw_call(channel, method, cs, ss, [])
        if code == grpc.StatusCode.UNIMPLEMENTED:
            continue  # a placeholder of a service not served here
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code)
        assert check_error(err) == "EMPTY_INPUT"


async def test_an_empty_bidi_stream_ends_ok(default_server):
    _, channel = default_server
    code, err = await raw_call(channel, "/backbone.v1.EmbeddingService/EmbedStream", True, True, [])
    assert code == grpc.StatusCode.OK, err


async def test_auto_routing_with_an_embedding_of_another_dimension_is_no_internal_error(tmp_path):
    """Found by the fuzz bench: ``model="auto"`` scored with an embedding hop whose vectors
    do not fit the learned model (8 dimensions against 384 weights) raised ValueError, an
    INTERNAL per call; the features decide then, as when the embedding is unavailable."""
    from backbone.v1 import generation_service_pb2 as gen, generation_service_pb2_grpc as gen_grpc
    from tests.conftest import make_config, running
    from tests.fuzz.conftest import default_hops

    config = make_config(search={"data_dir": str(tmp_path / "data")}, routing={"learned": "always"})
    async with running(config, default_hops(config)) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = gen_grpc.GenerationServiceStub(channel).Generate(
                gen.GenerateRequest(model="auto", prompt="why is the sky blue? explain it step by step"), timeout=30)
            finals = [m async for m in call if m.HasField("final")]
    assert len(finals) == 1
