"""OpenTelemetry traces: one trace per request across the router, the pipeline and every hop.

Each server process has a tracer provider: its own SDK provider exporting OTLP/gRPC when
``[telemetry] otlp_endpoint`` is set, else the global one (a no-op unless the embedding
application installed an SDK; its non-recording spans still carry the trace context on).
The provider feeds:

* the server interceptor (``TraceInterceptor``): extracts W3C ``traceparent`` from the
  call's metadata and opens the server span of each ``backbone.v1`` RPC (health and
  reflection are left alone: health's Watch writes with ``context.write()``, which the
  aio instrumentation breaks, open-telemetry/opentelemetry-python-contrib#3066; our
  streaming handlers are async generators);
* the client interceptors of ``opentelemetry-instrumentation-grpc``
  (``client_interceptors``) on the pipeline's and search's upstream channels: a client
  span per call, ``traceparent`` injected; the router, which forwards bytes, sends its
  own span's ``traceparent`` in the metadata it forwards (``server.router.forward``);
* ``hop_span``: the span the upstream layer opens around each hop call ("embed",
  "search", "rerank", "generate"), in-process or over gRPC alike, so an Answer is one
  trace with a span per hop under the pipeline's server span.

Nothing here reads the environment; ``provider_for`` is called from the server's start.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

from server.config_spine import TelemetryConfig

TRACER_NAME = "backbone"
#: Only the contract's services get server spans (not grpc.health / reflection).
TRACED_SERVICES = "backbone.v1."
#: Server-streaming RPCs get a server span only here (the Answer stream, parent of the
#: hop spans). Elsewhere (Generate at the generation hop and through the router) a span
#: held across a stream's yields is finalised late when the caller cancels (the stream
#: is abandoned, not closed, and closed later in another context), which delayed the
#: router's relay cancels in tests/routing; those streams carry the trace on in their
#: metadata, and the caller's client span times them.
TRACED_STREAMS = ("backbone.v1.PipelineService/",)


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


class TraceInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per ``backbone.v1`` RPC, child of the caller's ``traceparent``.

    Ours rather than the contrib package's aio server interceptor: that one wraps the
    servicer context and iterates the handler's stream without closing it. Here the
    handler's own context object is passed on and its stream closed on every path; only
    ``TRACED_STREAMS`` streams are spanned (see there).
    """

    def __init__(self, provider: Any = None) -> None:
        self._tracer = trace.get_tracer(
            "opentelemetry.instrumentation.grpc", tracer_provider=provider
        )

    def _span(self, method: str, context: grpc.aio.ServicerContext):
        carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        service, _, name = method.lstrip("/").rpartition("/")
        return self._tracer.start_as_current_span(
            method, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False, set_status_on_exception=False,
        )

    async def intercept_service(self, continuation, details):  # noqa: ANN001 - grpc types
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.lstrip("/").startswith(TRACED_SERVICES):
            return handler
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            fn = getattr(handler, kind)
            if fn is None:
                continue
            if handler.response_streaming and not inspect.iscoroutinefunction(fn):
                if not method.lstrip("/").startswith(TRACED_STREAMS):
                    return handler


                async def streamed(request, context, _fn=fn):
                    with self._span(method, context) as span:
                        responses = _fn(request, context)
                        try:
                            async for response in responses:
                                yield response
                        finally:
                            await responses.aclose()
                            _set_code(span, context)

                return handler._replace(**{kind: streamed})

            async def unary(request, context, _fn=fn):
                with self._span(method, context) as span:
                    try:
                        return await _fn(request, context)
                    finally:
                        _set_code(span, context)

            return handler._replace(**{kind: unary})
        return handler


def _set_code(span: trace.Span, context: grpc.aio.ServicerContext) -> None:
    code = context.code()
    if code is None:
        return
    value = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
    span.set_attribute("rpc.grpc.status_code", value)
    if value != 0:
        span.set_status(trace.Status(trace.StatusCode.ERROR))


def server_interceptor(provider: Any = None) -> TraceInterceptor:
    """The grpc.aio server interceptor opening a span per ``backbone.v1`` RPC."""
    return TraceInterceptor(provider)


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


def start_hop_span(t: trace.Tracer, hop: str, **attributes: Any) -> trace.Span:
    """``hop_span``'s span for a stream, started but not made current: the stream makes it
    current around each of its steps only (``in_span``). Kept current across an async
    generator's yields it would leak into the consumer between items, and be detached in
    whatever context the last step ran in: the pipeline runs a stream's first step as a
    task (the Generate starts while the sources are written), and OpenTelemetry logged
    "Failed to detach context" with a traceback on every Answer."""
    attrs = {"backbone.hop": hop, **{f"backbone.{k}": v for k, v in attributes.items()}}
    return t.start_span(hop, kind=trace.SpanKind.INTERNAL, attributes=attrs)


def in_span(span: trace.Span):
    """``span`` current for one step (attached and detached in that step's context); an
    error raised in it is recorded on the span; the span is not ended."""
    return trace.use_span(span, end_on_exit=False)


def trace_headers() -> dict[str, str]:
    """The current context as W3C headers (``traceparent``), for engines that take them
    (vLLM's ``trace_headers``)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
