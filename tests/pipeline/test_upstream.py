"""The one upstream path (server.upstream): a search hop embedding text queries on a
remote embedding hop keeps the upstream's status and pushback, forwards what is left of
the caller's deadline, and uses TLS when the process is configured for it."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from backbone.v1 import embedding_service_pb2_grpc as emb_grpc
from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from server.servicers.search import SearchHop
from tests.clients.conftest import pki  # noqa: F401 - the test CA fixture
from tests.conftest import error_reason, running
from tests.pipeline.fakes import DIM, EmbedScript, FakeEmbedding, start_fake
from tests.search.conftest import search_config

S = grpc.StatusCode


def retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a failed call, seconds."""
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry.retry_delay.ToNanoseconds() / 1e9
    return None


@pytest.fixture
async def fake_embedding():
    """A plaintext fake embedding hop and its script."""
    script = EmbedScript()
    fake = await start_fake([(emb_grpc.add_EmbeddingServiceServicer_to_server, FakeEmbedding(script))])
    yield fake, script
    await fake.stop()


async def _search(address: str, credentials=None, timeout: float = 5.0) -> pb.SearchResponse:
    channel = (
        grpc.aio.insecure_channel(address) if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    async with channel:
        stub = pb_grpc.VectorSearchServiceStub(channel)
        await stub.CreateCollection(pb.CreateCollectionRequest(name="docs", dimension=DIM))
        return await stub.Search(
            pb.SearchRequest(collection="docs", text="what is green tea", top_k=3), timeout=timeout
        )


@pytest.mark.parametrize(
    ("code", "reason", "retry_s"),
    [
        (S.RESOURCE_EXHAUSTED, "OVERLOADED", 0.25),
        (S.NOT_FOUND, "MODEL_NOT_FOUND", None),
        (S.INVALID_ARGUMENT, "INPUT_TOO_LARGE", None),
        (S.DEADLINE_EXCEEDED, "DEADLINE_TOO_SHORT", None),
        (S.UNAVAILABLE, "CIRCUIT_OPEN", 0.5),
    ],
)
async def test_upstream_status_reaches_the_caller_unchanged(
    fake_embedding, tmp_path, code, reason, retry_s
):
    fake, script = fake_embedding
    script.failure = (code, reason, retry_s)
    config = search_config(tmp_path, embedding_address=fake.address)
    async with running(config, [SearchHop()]) as server:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _search(server.address)
    assert info.value.code() == code, info.value.details()
    assert error_reason(info.value) == reason
    assert retry_delay_s(info.value) == retry_s


async def test_transport_failure_becomes_unavailable(tmp_path):
    # Nothing listens there: a transport failure, the one case mapped to UNAVAILABLE.
    fake = await start_fake([])
    address = fake.address
    await fake.stop()
    config = search_config(tmp_path, embedding_address=address)
    async with running(config, [SearchHop()]) as server:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _search(server.address)
    assert info.value.code() == S.UNAVAILABLE
    assert error_reason(info.value) == "UNAVAILABLE"


async def test_remote_call_carries_the_callers_remaining_deadline(fake_embedding, tmp_path):
    fake, script = fake_embedding
    config = search_config(tmp_path, embedding_address=fake.address)
    async with running(config, [SearchHop()]) as server:
        response = await _search(server.address, timeout=2.0)
    assert [t.hop for t in response.timings] == ["embed", "search"]
    # The embed timing is the hop's own (the fake reports 12 us), as every hop's is, not
    # the wall time of the call with its wire legs.
    assert (response.timings[0].total_us, response.timings[0].compute_us) == (12, 10)
    [remaining] = script.time_remaining
    # What the caller had (2 s) less the time spent getting there and the reserve, not
    # 30 s (gRPC rounds the timeout header up to a few significant digits: hence 2.05).
    assert remaining is not None and 1.0 < remaining < 2.05
    assert "authorization" not in script.metadata[0]


async def test_remote_call_without_caller_deadline_uses_the_configured_default(fake_embedding, tmp_path):
    fake, script = fake_embedding
    config = search_config(tmp_path, embedding_address=fake.address)
    config = type(config)(**{**config.__dict__, "upstream": type(config.upstream)(default_timeout_s=7.0)})
    async with running(config, [SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.VectorSearchServiceStub(channel)
            await stub.CreateCollection(pb.CreateCollectionRequest(name="docs", dimension=DIM))
            await stub.Search(pb.SearchRequest(collection="docs", text="tea", top_k=1))
    assert 6.0 < script.time_remaining[0] <= 7.05  # gRPC rounds the timeout header up


def _tls_config(tmp_path, pki, embedding_address):  # noqa: F811 - pki is the fixture value
    config = search_config(tmp_path, embedding_address=embedding_address)
    from server.config import load_config

    return load_config(overrides={
        "server": {"port": 0, "metrics_port": 0, "grace_seconds": 2, "auth_token": "s3cret",
                   "tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key),
                   "tls_client_ca": str(pki.ca)},
        "search": {"data_dir": config.search.data_dir, "faiss_threads": 1,
                   "faiss_build_threads": 1, "embedding_address": embedding_address},
    })


async def test_with_tls_configured_the_upstream_channel_is_tls(tmp_path, pki):  # noqa: F811
    script = EmbedScript()
    # The fake embedding hop accepts only mTLS clients of the test CA.
    fake = await start_fake(
        [(emb_grpc.add_EmbeddingServiceServicer_to_server, FakeEmbedding(script))],
        credentials=pki.server_credentials(),
    )
    client = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    try:
        config = _tls_config(tmp_path, pki, fake.address)
        async with running(config, [SearchHop()]) as server:
            channel = grpc.aio.secure_channel(server.address, client)
            async with channel:
                stub = pb_grpc.VectorSearchServiceStub(channel)
                md = (("authorization", "Bearer s3cret"),)
                await stub.CreateCollection(
                    pb.CreateCollectionRequest(name="docs", dimension=DIM), metadata=md
                )
                response = await stub.Search(
                    pb.SearchRequest(collection="docs", text="tea", top_k=1), metadata=md, timeout=5
                )
        assert [t.hop for t in response.timings] == ["embed", "search"]
        assert script.metadata[0]["authorization"] == "Bearer s3cret"
        # The same process without TLS settings cannot reach that hop (the old plaintext
        # channel): the test above would fail on a plaintext upstream channel.
        plain = search_config(tmp_path / "plain", embedding_address=fake.address)
        async with running(plain, [SearchHop()]) as server:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _search(server.address)
        assert info.value.code() == S.UNAVAILABLE
    finally:
        await fake.stop()


def test_plain_struct_gives_what_message_to_dict_gives():
    from google.protobuf import json_format, struct_pb2

    from server.upstream.wire import plain_struct

    struct = struct_pb2.Struct()
    struct.update({"title": "tea", "year": 2024, "score": 0.5, "ok": True, "none": None,
                   "tags": ["a", 1, [2, {"x": "y"}]], "nested": {"k": {"deep": False}}})
    struct.fields["unset"].CopyFrom(struct_pb2.Value())
    assert plain_struct(struct) == json_format.MessageToDict(struct)
    assert plain_struct(struct_pb2.Struct()) == {}
    struct.fields["bad"].number_value = float("inf")
    with pytest.raises(ValueError):
        plain_struct(struct)
