"""Bad input answered right and fast: tokens, TLS/mTLS, oversized messages.

Each case checks the refusal (status code + ErrorInfo where the server sends one), that
the handler never ran for a refused call, and that the server keeps serving afterwards.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import server.interceptors as interceptors
from backbone.v1 import embedding_service_pb2_grpc as emb_grpc
from server_fakes import (
    FakeEmbeddingHop,
    embed_request,
    embed_stream,
    health_status,
    only_error_info,
    stream_request,
)
from tests.conftest import make_config, running

TOKEN = "s3cret-token-value"
SERVING = health_pb2.HealthCheckResponse.SERVING
# Refusals must come well before this; a hang would show up as DEADLINE_EXCEEDED.
SHORT_DEADLINE_S = 5.0


# -- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files of a server CA + server cert, a client CA + client cert, and a rogue pair."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject, key, issuer, issuer_key, *, ca: bool, sans=(), usage=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert, key=None) -> tuple[Path, Path | None]:
    cert_path = directory / f"{stem}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = directory / f"{stem}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """Fresh keys and certificates for this module (server SANs: localhost, 127.0.0.1)."""
    d = tmp_path_factory.mktemp("pki")
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in
            ("ca", "server", "client_ca", "client", "rogue")}
    ca = _issue("test server CA", keys["ca"], "test server CA", keys["ca"], ca=True)
    server = _issue(
        "localhost", keys["server"], "test server CA", keys["ca"], ca=False,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client_ca = _issue("test client CA", keys["client_ca"], "test client CA", keys["client_ca"],
                       ca=True)
    client = _issue("a client", keys["client"], "test client CA", keys["client_ca"], ca=False,
                    usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _issue("rogue", keys["rogue"], "rogue", keys["rogue"], ca=False,
                   usage=ExtendedKeyUsageOID.CLIENT_AUTH)  # self-signed, not from the CA
    ca_path, _ = _write(d, "ca", ca)
    server_cert, server_key = _write(d, "server", server, keys["server"])
    client_ca_path, _ = _write(d, "client_ca", client_ca)
    client_cert, client_key = _write(d, "client", client, keys["client"])
    rogue_cert, rogue_key = _write(d, "rogue", rogue, keys["rogue"])
    return Pki(ca_path, server_cert, server_key, client_ca_path, client_cert, client_key,
               rogue_cert, rogue_key)


def tls_credentials(pki: Pki, cert: Path | None = None, key: Path | None = None):
    """Client credentials trusting the test server CA, with an optional client cert."""
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


async def check_refused_fast(channel: grpc.aio.Channel) -> None:
    """A call on ``channel`` fails with UNAVAILABLE before the short deadline."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_status(channel, timeout=SHORT_DEADLINE_S)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value


# -- bearer token ----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def auth_server():
    """(hop, address) of a server that requires TOKEN."""
    hop = FakeEmbeddingHop()
    async with running(make_config(server={"auth_token": TOKEN}), [hop]) as server:
        yield hop, server.address


@pytest.fixture
async def auth_channel(auth_server):
    """A plaintext channel to the token-protected server."""
    async with grpc.aio.insecure_channel(auth_server[1]) as channel:
        yield channel


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", ""),),
        bearer("wrong-token"),
        bearer(TOKEN + "x"),
        bearer(TOKEN[:-1]),
        (("authorization", TOKEN),),  # no "Bearer " scheme
        (("authorization", f"Basic {TOKEN}"),),
        (("x-api-key", TOKEN),),
    ],
    ids=["missing", "empty", "wrong", "longer", "shorter", "no-scheme", "basic", "other-key"],
)
async def test_bad_or_missing_token_is_refused_before_the_handler(
    auth_server, auth_channel, metadata
):
    hop = auth_server[0]
    before = hop.calls
    stub = emb_grpc.EmbeddingServiceStub(auth_channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(embed_request(), metadata=metadata, timeout=SHORT_DEADLINE_S)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    info = only_error_info(caught.value)
    assert (info.domain, info.reason) == ("backbone.v1", "UNAUTHENTICATED")
    assert TOKEN not in caught.value.details()
    # streaming calls are refused before the handler reads a message
    received, error = await embed_stream(stub, [], metadata=metadata, timeout=SHORT_DEADLINE_S)
    assert not received and error is not None
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert only_error_info(error).reason == "UNAUTHENTICATED"
    assert hop.calls == before, "the handler ran for an unauthenticated call"


async def test_right_token_is_served(auth_server, auth_channel):
    hop = auth_server[0]
    before = hop.calls
    stub = emb_grpc.EmbeddingServiceStub(auth_channel)
    response = await stub.Embed(embed_request("ab"), metadata=bearer(TOKEN), timeout=10)
    assert list(response.embeddings[0].values) == [0.0, 2.0]
    assert hop.calls == before + 1


async def test_token_is_compared_in_constant_time(auth_server, auth_channel, monkeypatch):
    seen = []
    real = interceptors.hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(interceptors.hmac, "compare_digest", spy)
    stub = emb_grpc.EmbeddingServiceStub(auth_channel)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Embed(embed_request(), metadata=bearer("nope"), timeout=10)
    await stub.Embed(embed_request(), metadata=bearer(TOKEN), timeout=10)
    assert len(seen) == 2


async def test_health_stays_open_without_a_token(auth_channel):
    assert await health_status(auth_channel, timeout=10) == SERVING
    assert await health_status(auth_channel, "backbone.v1.EmbeddingService", timeout=10) == SERVING
    watch = health_pb2_grpc.HealthStub(auth_channel).Watch(health_pb2.HealthCheckRequest())
    try:
        assert (await watch.read()).status == SERVING
    finally:
        watch.cancel()


async def test_other_services_need_the_token_too(auth_channel):
    # a placeholder: refused for the token before it can say UNIMPLEMENTED
    answer = auth_channel.unary_stream("/backbone.v1.PipelineService/Answer")(b"", timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in answer:
            pass
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # reflection describes the API: not open either
    stub = reflection_pb2_grpc.ServerReflectionStub(auth_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.ServerReflectionInfo(iter([request]), timeout=10):
            pass
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    async for response in stub.ServerReflectionInfo(
        iter([request]), metadata=bearer(TOKEN), timeout=10
    ):
        assert response.list_services_response.service


# -- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tls_server(pki):
    """(hop, port) of a TLS server."""
    hop = FakeEmbeddingHop()
    config = make_config(server={"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)})
    async with running(config, [hop]) as server:
        yield hop, server.port


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_tls_client_is_served(pki, tls_server, host):
    async with grpc.aio.secure_channel(f"{host}:{tls_server[1]}", tls_credentials(pki)) as ch:
        assert await health_status(ch, timeout=10) == SERVING
        response = await emb_grpc.EmbeddingServiceStub(ch).Embed(embed_request(), timeout=10)
        assert len(response.embeddings) == 1


async def test_plaintext_client_against_tls_port_fails_fast_and_tls_keeps_working(
    pki, tls_server
):
    hop, port = tls_server
    before = hop.calls
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
        await check_refused_fast(plain)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await emb_grpc.EmbeddingServiceStub(plain).Embed(
                embed_request(), timeout=SHORT_DEADLINE_S
            )
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert hop.calls == before
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", tls_credentials(pki)) as ch:
        assert await health_status(ch, timeout=10) == SERVING


async def test_tls_client_that_does_not_trust_the_server_is_refused(pki, tls_server):
    untrusted = grpc.ssl_channel_credentials(root_certificates=pki.client_ca.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{tls_server[1]}", untrusted) as ch:
        await check_refused_fast(ch)


async def test_tls_client_against_plaintext_port_fails_fast(pki):
    async with running(make_config(), [FakeEmbeddingHop()]) as server:
        async with grpc.aio.secure_channel(server.address, tls_credentials(pki)) as ch:
            await check_refused_fast(ch)


# -- mTLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def mtls_server(pki):
    """(hop, port) of a server that requires a client certificate from the client CA."""
    hop = FakeEmbeddingHop()
    config = make_config(server={
        "tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key),
        "tls_client_ca": str(pki.client_ca),
    })
    async with running(config, [hop]) as server:
        yield hop, server.port


@pytest.mark.parametrize("client", ["none", "rogue"])
async def test_mtls_refuses_clients_without_a_ca_signed_cert(pki, mtls_server, client):
    hop, port = mtls_server
    before = hop.calls
    cert, key = (None, None) if client == "none" else (pki.rogue_cert, pki.rogue_key)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", tls_credentials(pki, cert, key)) as ch:
        await check_refused_fast(ch)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await emb_grpc.EmbeddingServiceStub(ch).Embed(embed_request(), timeout=SHORT_DEADLINE_S)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert hop.calls == before


async def test_mtls_accepts_a_client_cert_signed_by_the_client_ca(pki, mtls_server):
    hop, port = mtls_server
    creds = tls_credentials(pki, pki.client_cert, pki.client_key)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        assert await health_status(ch, timeout=10) == SERVING
        response = await emb_grpc.EmbeddingServiceStub(ch).Embed(embed_request(), timeout=10)
        assert len(response.embeddings) == 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
        await check_refused_fast(plain)


# -- message size ----------------------------------------------------------------------

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
async def small_limit_server():
    """(hop, address) of a server whose messages are capped at LIMIT bytes."""
    hop = FakeEmbeddingHop()
    async with running(make_config(server={"max_message_bytes": LIMIT}), [hop]) as server:
        yield hop, server.address


async def test_message_over_the_limit_is_resource_exhausted_and_server_keeps_serving(
    small_limit_server,
):
    hop, address = small_limit_server
    async with grpc.aio.insecure_channel(address) as channel:
        stub = emb_grpc.EmbeddingServiceStub(channel)
        before = hop.calls
        # just under the cap: served (the cap is the configured one, not gRPC's 4 MiB)
        fits = embed_request("x" * (LIMIT - 100))
        assert fits.ByteSize() < LIMIT
        assert len((await stub.Embed(fits, timeout=10)).embeddings) == 1
        assert hop.calls == before + 1
        for size in (LIMIT + 1, 5 * 1024 * 1024):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(embed_request("x" * size), timeout=SHORT_DEADLINE_S)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        received, error = await embed_stream(
            stub, [stream_request(1, "x" * (LIMIT + 1))], timeout=SHORT_DEADLINE_S
        )
        assert not received and error is not None
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert hop.calls == before + 1, "an oversized message reached the handler"
        # the same channel and server go on serving
        assert len((await stub.Embed(embed_request("small"), timeout=10)).embeddings) == 1
        assert await health_status(channel, timeout=10) == SERVING
