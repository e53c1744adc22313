"""OpenTelemetry traces: one trace per request across the router, the pipeline and every hop.

Each server process has a tracer provider: its own SDK provider exporting OTLP/gRPC when
``[telemetry] otlp_endpoint`` is set, else the global one (a no-op unless the embedding
application installed an SDK; its non-recording spans still carry the trace context on).
The provider feeds:

* the server interceptor of ``opentelemetry-instrumentation-grpc`` (``server_interceptor``):
  extracts W3C ``traceparent`` from the call's metadata and opens the server span of each
  ``backbone.v1`` RPC (health and reflection are left alone: health's Watch writes with
  ``context.write()``, which the aio instrumentation breaks, open-telemetry/
  opentelemetry-python-contrib#3066; our streaming handlers are async generators);
* the client interceptors (``client_interceptors``) of every upstream channel (pipeline ->
  hops, search -> embedding, router -> replicas): they inject ``traceparent``;
* ``hop_span``: the span the upstream layer opens around each hop call ("embed",
  "search", "rerank", "generate"), in-process or over gRPC alike, so an Answer is one
  trace with a span per hop under the pipeline's server span.

Nothing here reads the environment; ``provider_for`` is called from the server's start.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)

from server.config_spine import TelemetryConfig

TRACER_NAME = "backbone"
#: Only the contract's services get server spans (not grpc.health / reflection).
TRACED_SERVICES = "backbone.v1."


def provider_for(config: TelemetryConfig) -> Any:
    """An SDK provider exporting to ``config.otlp_endpoint`` (batched), or None: use the
    global provider."""
    if not config.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def shutdown(provider: Any) -> None:
    """Flush and stop a provider made by ``provider_for`` (None: nothing to do)."""
    if provider is not None and hasattr(provider, "shutdown"):
        provider.shutdown()


def server_interceptor(provider: Any = None) -> Any:
    """The grpc.aio server interceptor opening a span per ``backbone.v1`` RPC."""
    return aio_server_interceptor(
        tracer_provider=provider, filter_=filters.service_prefix(TRACED_SERVICES)
    )


def client_interceptors(provider: Any = None) -> list[Any]:
    """grpc.aio client interceptors: a client span per call, ``traceparent`` injected."""
    return aio_client_interceptors(
        tracer_provider=provider, filter_=filters.service_prefix(TRACED_SERVICES)
    )


def tracer(provider: Any = None) -> trace.Tracer:
    """The backbone's tracer on ``provider`` (None: the global provider)."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


@contextmanager
def hop_span(t: trace.Tracer, hop: str, **attributes: Any):
    """A span around one hop call, current while it runs (its gRPC client span, when
    remote, is its child); an error is recorded on it."""
    with t.start_as_current_span(hop, kind=trace.SpanKind.INTERNAL) as span:
        span.set_attribute("backbone.hop", hop)
        for key, value in attributes.items():
            span.set_attribute(f"backbone.{key}", value)
        yield span


def trace_headers() -> dict[str, str]:
    """The current context as W3C headers (``traceparent``), for engines that take them
    (vLLM's ``trace_headers``)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
