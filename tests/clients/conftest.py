"""Fixtures for the client tests: a real grpc.aio server on port 0 with scriptable fakes.

The fakes test the CLIENT's policy (error mapping, retries, deadlines, token, TLS); a
deterministic fake embedding stands in for the model, which these tests make no claim
about. Errors are sent the way the server's error interceptor sends them: a canonical
status plus one google.rpc.ErrorInfo in ``grpc-status-details-bin``.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from backbone.v1 import embedding_service_pb2 as emb_pb
from backbone.v1 import embedding_service_pb2_grpc as emb_grpc
from backbone.v1 import vector_search_service_pb2 as vs_pb
from backbone.v1 import vector_search_service_pb2_grpc as vs_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients.channel import BACKBONE_SERVICES

DIM = 384
MAX_TEXT_CHARS = 1000
SERVER_MAX_RECEIVE_BYTES = 256 * 1024


def fake_vector(text: str) -> np.ndarray:
    """A deterministic 384-dim float32 vector for a text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


@pytest.fixture
def fake():
    """The fake model: text -> the vector the fake server answers with."""
    return fake_vector


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    reason: str,
    message: str,
    metadata: dict[str, str] | None = None,
    domain: str = "backbone.v1",
) -> None:
    """End the call with ``code`` and, when ``reason`` is set, one ErrorInfo."""
    trailer = ()
    if reason:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata))
        status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
        trailer = (("grpc-status-details-bin", status.SerializeToString()),)
    await context.abort(code, message, trailing_metadata=trailer)


@dataclass
class Script:
    """What the fakes saw, and the failures they are told to answer with."""

    calls: Counter = field(default_factory=Counter)  # method -> attempts seen
    metadata: list[dict[str, str]] = field(default_factory=list)
    time_remaining: list[float | None] = field(default_factory=list)
    # method -> [(code, reason, metadata, domain)], popped one per attempt
    failures: dict[str, list[tuple]] = field(default_factory=dict)
    required_token: str = ""

    def fail(
        self,
        method: str,
        code: grpc.StatusCode,
        reason: str = "",
        *,
        times: int = 1,
        metadata: dict[str, str] | None = None,
        domain: str = "backbone.v1",
    ) -> None:
        """Answer the next ``times`` attempts of ``method`` with this error."""
        self.failures.setdefault(method, []).extend([(code, reason, metadata, domain)] * times)

    async def enter(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Record an attempt, then check the token and play a scripted failure."""
        self.calls[method] += 1
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.metadata.append(md)
        self.time_remaining.append(context.time_remaining())
        if self.required_token and md.get("authorization") != f"Bearer {self.required_token}":
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "bad token")
        pending = self.failures.get(method)
        if pending:
            code, reason, metadata, domain = pending.pop(0)
            await abort(context, code, reason, f"scripted {code.name}", metadata, domain)


async def check_embed_request(
    request: emb_pb.EmbedRequest, context: grpc.aio.ServicerContext
) -> emb_pb.EmbedResponse:
    """Validate like the real hop (bad input rejected first), then fake-embed."""
    inputs = list(request.inputs)
    if not inputs or any(not text for text in inputs):
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_INPUT", "empty text")
    too_long = [i for i, text in enumerate(inputs) if len(text) > MAX_TEXT_CHARS]
    if too_long:
        await abort(
            context, grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LARGE",
            f"text {too_long[0]} is over {MAX_TEXT_CHARS} characters",
            {"limit": str(MAX_TEXT_CHARS), "index": str(too_long[0])},
        )
    if request.dimensions > DIM:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", "dimensions")
    if "hang" in inputs:
        await asyncio.Event().wait()  # until the deadline cancels the call
    dim = request.dimensions or DIM
    embeddings = []
    for text in inputs:
        vector = fake_vector(text)[:dim]
        if request.normalize:
            vector = vector / np.linalg.norm(vector)
        embeddings.append(emb_pb.Embedding(values=vector.tolist(), tokens=len(text.split())))
    return emb_pb.EmbedResponse(
        embeddings=embeddings, model="fake-minilm", dimensions=dim,
        usage={"prompt_tokens": sum(e.tokens for e in embeddings)},
        timings=[{"hop": "embed", "total_us": 7, "batch_size": len(inputs)}],
    )


class FakeEmbedding(emb_grpc.EmbeddingServiceServicer):
    """EmbeddingService with a deterministic fake model."""

    def __init__(self, script: Script) -> None:
        self.script = script

    async def Embed(self, request, context):  # noqa: N802 - gRPC method name
        await self.script.enter("Embed", context)
        return await check_embed_request(request, context)

    async def EmbedStream(self, request_iterator, context):  # noqa: N802
        await self.script.enter("EmbedStream", context)
        async for message in request_iterator:
            response = await check_embed_request(message.request, context)
            yield emb_pb.EmbedStreamResponse(response=response, id=message.id)


class FakeVectorSearch(vs_grpc.VectorSearchServiceServicer):
    """Search (idempotent) and Delete (not): empty answers, for retry policy tests."""

    def __init__(self, script: Script) -> None:
        self.script = script

    async def Search(self, request, context):  # noqa: N802
        await self.script.enter("Search", context)
        return vs_pb.SearchResponse()

    async def Delete(self, request, context):  # noqa: N802
        await self.script.enter("Delete", context)
        return vs_pb.DeleteResponse(deleted=len(request.ids))


@dataclass
class Backend:
    """A running fake server."""

    address: str
    script: Script
    health: health.aio.HealthServicer
    server: grpc.aio.Server


async def start_backend(credentials: grpc.ServerCredentials | None = None) -> Backend:
    """Start a fake server on 127.0.0.1:0 with every backbone service SERVING."""
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", SERVER_MAX_RECEIVE_BYTES)]
    )
    script = Script()
    emb_grpc.add_EmbeddingServiceServicer_to_server(FakeEmbedding(script), server)
    vs_grpc.add_VectorSearchServiceServicer_to_server(FakeVectorSearch(script), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *BACKBONE_SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return Backend(f"127.0.0.1:{port}", script, health_servicer, server)


@pytest.fixture
async def backend():
    """A fresh fake server per test (fresh port: its own gRPC retry-throttle state)."""
    b = await start_backend()
    yield b
    await b.server.stop(None)


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server cert for "backbone.test" and a client cert."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_credentials(self) -> grpc.ServerCredentials:
        """mTLS server credentials: clients must present a cert from the CA."""
        return grpc.ssl_server_credentials(
            [(self.server_key.read_bytes(), self.server_cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=True,
        )


def _issue(name, key, issuer_name, issuer_key, *, ca=False, san=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """A self-signed CA with a server and a client certificate (EC P-256)."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backbone test CA")])
    ca = _issue("backbone test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "backbone.test", server_key, ca_name, ca_key,
        san=[x509.DNSName("backbone.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("backbone client", client_key, ca_name, ca_key)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    server_cert, server_key_path = _write(directory, "server", server, server_key)
    client_cert, client_key_path = _write(directory, "client", client, client_key)
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path)


@pytest.fixture
async def tls_backend(pki):
    """A fresh fake server requiring mTLS with the test CA."""
    b = await start_backend(pki.server_credentials())
    yield b
    await b.server.stop(None)
