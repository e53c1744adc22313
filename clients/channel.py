"""Channels to a backbone process, sync and aio, built from one ``ClientOptions``.

Policy carried by the channel itself (so raw stubs on it get it too):
  * retries via the gRPC service config: only UNAVAILABLE, only the idempotent unary
    methods in ``IDEMPOTENT_UNARY_METHODS``, with exponential backoff, under a
    ``retryThrottling`` budget (gRPC stops retrying while most recent calls fail);
  * message-size limits, TLS / mTLS and a server-name override.
Policy carried per call (see ``call_kwargs``): the default deadline and the bearer token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from backbone.v1 import (
    embedding_service_pb2,
    generation_service_pb2,
    pipeline_service_pb2,
    rerank_service_pb2,
    router_service_pb2,
    vector_search_service_pb2,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
HEALTH_SERVICE = "grpc.health.v1.Health"

#: Fully qualified names of every backbone service, from the generated descriptors.
BACKBONE_SERVICES: tuple[str, ...] = tuple(
    service.full_name
    for module in (
        embedding_service_pb2,
        vector_search_service_pb2,
        rerank_service_pb2,
        generation_service_pb2,
        pipeline_service_pb2,
        router_service_pb2,
    )
    for service in module.DESCRIPTOR.services_by_name.values()
)

#: (service, method) pairs retried on UNAVAILABLE. Invariant: each is unary-unary and safe
#: to run twice; streaming and writing methods (Upsert, Delete, Generate, ...) never are.
IDEMPOTENT_UNARY_METHODS: tuple[tuple[str, str], ...] = (
    ("backbone.v1.EmbeddingService", "Embed"),
    ("backbone.v1.VectorSearchService", "Search"),
    ("backbone.v1.VectorSearchService", "SearchBatch"),
    ("backbone.v1.VectorSearchService", "Get"),
    ("backbone.v1.VectorSearchService", "DescribeCollection"),
    ("backbone.v1.VectorSearchService", "ListCollections"),
    ("backbone.v1.RerankService", "Rerank"),
    ("backbone.v1.GenerationService", "ListModels"),
    ("backbone.v1.GenerationService", "CountTokens"),
    ("backbone.v1.PipelineService", "Retrieve"),
    ("backbone.v1.RouterService", "ListEndpoints"),
    (HEALTH_SERVICE, "Check"),
)

# Retry budget (gRPC retryThrottling): each failed attempt costs 1 token, each success
# earns TOKEN_RATIO; retries stop while tokens <= MAX_TOKENS / 2.
RETRY_MAX_TOKENS = 10
RETRY_TOKEN_RATIO = 0.1
# A request larger than gRPC's per-call retry buffer is never retried; this covers the
# largest Embed request the server accepts (1 MiB) with room to spare.
RETRY_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ClientOptions:
    """How to reach a backbone process and the per-call defaults.

    TLS is used when ``tls`` is set or any ``tls_*`` path is given; with no ``tls_ca``
    the system roots verify the server. ``tls_cert`` + ``tls_key`` add a client
    certificate (mTLS). Timeouts are seconds; ``math.inf`` means no deadline.
    """

    #: host:port or any gRPC target (``dns:///name:port``, ``unix:/path``).
    address: str = DEFAULT_ADDRESS
    #: Bearer token sent as ``authorization: Bearer <token>`` on every call; "" for none.
    token: str = field(default="", repr=False)  # a secret: never in repr or logs
    #: Use TLS even when no ``tls_*`` path is given (system roots).
    tls: bool = False
    #: PEM bundle of CAs that verify the server.
    tls_ca: str = ""
    #: PEM client certificate chain for mTLS (with ``tls_key``).
    tls_cert: str = ""
    #: PEM client private key for mTLS (with ``tls_cert``).
    tls_key: str = ""
    #: Name expected in the server certificate instead of the address's host.
    tls_server_name: str = ""
    #: Default deadline of unary calls.
    timeout: float = 10.0
    #: Default deadline of streaming calls (generation, ingest, EmbedStream).
    stream_timeout: float = 300.0
    #: Largest message sent or received, in bytes. The default is the server's default
    #: cap (``server.max_message_bytes``, 4 MiB): a request over it fails here at once with
    #: RESOURCE_EXHAUSTED instead of after uploading it. Raise both together.
    max_message_bytes: int = 4 * 1024 * 1024
    #: Attempts per idempotent unary call (1 disables retries; gRPC caps it at 5).
    retry_max_attempts: int = 4

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("address must not be empty")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        if not (self.timeout > 0 and self.stream_timeout > 0):
            raise ValueError("timeouts must be positive (math.inf for none)")
        if not 1 <= self.retry_max_attempts <= 5:
            raise ValueError("retry_max_attempts must be 1-5")
        if self.max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")

    @property
    def use_tls(self) -> bool:
        """True when the channel is secured with TLS."""
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_server_name)



def service_config(options: ClientOptions) -> dict[str, Any]:
    """The channel's gRPC service config: retry policy and retry budget."""
    if options.retry_max_attempts < 2:
        return {}
    return {
        "methodConfig": [
            {
                "name": [{"service": s, "method": m} for s, m in IDEMPOTENT_UNARY_METHODS],
                "retryPolicy": {
                    "maxAttempts": options.retry_max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": RETRY_MAX_TOKENS, "tokenRatio": RETRY_TOKEN_RATIO},
    }


def channel_options(options: ClientOptions) -> list[tuple[str, Any]]:
    """gRPC channel arguments for these options."""
    config = service_config(options)
    args: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.enable_retries", 1 if config else 0),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        # Our config is the only one: ignore configs a resolver (DNS TXT) might offer.
        ("grpc.service_config_disable_resolution", 1),
    ]
    if config:
        args.append(("grpc.service_config", json.dumps(config)))
    if options.tls_server_name:
        args.append(("grpc.ssl_target_name_override", options.tls_server_name))
    return args


def channel_credentials(options: ClientOptions) -> grpc.ChannelCredentials | None:
    """TLS credentials (reading the PEM files now), or None for a plaintext channel."""
    if not options.use_tls:
        return None

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(options.tls_ca),
        private_key=read(options.tls_key),
        certificate_chain=read(options.tls_cert),
    )


def open_channel(options: ClientOptions) -> grpc.Channel:
    """A sync channel; the caller closes it."""
    credentials = channel_credentials(options)
    if credentials is None:
        return grpc.insecure_channel(options.address, options=channel_options(options))
    return grpc.secure_channel(options.address, credentials, options=channel_options(options))


def open_aio_channel(
    options: ClientOptions, interceptors: Sequence[Any] | None = None
) -> grpc.aio.Channel:
    """An aio channel (create it inside the event loop that uses it); the caller closes it.
    ``interceptors``: grpc.aio client interceptors (e.g. OpenTelemetry's)."""
    credentials = channel_credentials(options)
    if credentials is None:
        return grpc.aio.insecure_channel(
            options.address, options=channel_options(options), interceptors=interceptors
        )
    return grpc.aio.secure_channel(
        options.address, credentials, options=channel_options(options),
        interceptors=interceptors,
    )


def call_metadata(options: ClientOptions) -> tuple[tuple[str, str], ...]:
    """Metadata sent on every call: the bearer token, when there is one."""
    return (("authorization", f"Bearer {options.token}"),) if options.token else ()


def call_kwargs(
    options: ClientOptions, timeout: float | None = None, *, stream: bool = False
) -> dict[str, Any]:
    """Keyword arguments for one stub call: its deadline and metadata.

    ``timeout`` None takes the options' default (``stream_timeout`` for streaming calls);
    ``math.inf`` means no deadline.
    """
    if timeout is None:
        timeout = options.stream_timeout if stream else options.timeout
    return {
        "timeout": None if math.isinf(timeout) else timeout,
        "metadata": call_metadata(options),
    }
