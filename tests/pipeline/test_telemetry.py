"""One trace per Answer: W3C traceparent across the pipeline and every hop, in-process
(embedding, search) and over gRPC (rerank, generation), with an in-memory exporter and
with a real OTLP/gRPC receiver on port 0."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from opentelemetry.trace import SpanKind
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from backbone.v1 import generation_service_pb2 as gen_pb
from backbone.v1 import generation_service_pb2_grpc as gen_grpc
from backbone.v1 import pipeline_service_pb2 as pb
from backbone.v1 import pipeline_service_pb2_grpc as pl_grpc
from backbone.v1 import rerank_service_pb2_grpc as rr_grpc
from backbone.v1 import vector_search_service_pb2 as vs_pb
from backbone.v1 import vector_search_service_pb2_grpc as vs_grpc
from server import telemetry
from server.config import load_config
from server.servicers.embedding import EmbeddingHop
from server.servicers.pipeline import PipelineHop
from server.servicers.search import SearchHop
from tests.conftest import running
from tests.pipeline.fakes import FakeGeneration, FakeRerank, HopScript, start_fake

ANSWER_SPAN = "/backbone.v1.PipelineService/Answer"
HOPS = ("embed", "search", "rerank", "generate")
TEXTS = ["Green tea is unoxidised.", "Black tea is fully oxidised.", "Oolong is in between."]


def _config(tmp_path, fake_address: str, **telemetry_section):
    return load_config(overrides={
        "server": {"port": 0, "metrics_port": 0, "grace_seconds": 2},
        "search": {"data_dir": str(tmp_path), "faiss_threads": 1, "faiss_build_threads": 1},
        "upstream": {"rerank_address": fake_address, "generation_address": fake_address},
        "pipeline": {"cache": False},
        "telemetry": telemetry_section,
    })


async def _seed(server, minilm) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        search = vs_grpc.VectorSearchServiceStub(channel)
        await search.CreateCollection(vs_pb.CreateCollectionRequest(name="tea", dimension=384))
        await search.UpsertBatch(vs_pb.UpsertBatchRequest(collection="tea", points=[
            vs_pb.Point(id=f"t{i}", vector={"values": v.tolist()}, payload=vs_pb.Payload(text=t))
            for i, (t, v) in enumerate(zip(TEXTS, minilm.embed(TEXTS)))
        ]))


async def _answer_once(server, metadata=()) -> list[pb.AnswerResponse]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        request = pb.AnswerRequest(
            retrieve=pb.RetrieveRequest(query="what is green tea", collection="tea", top_n=2),
            sampling=gen_pb.SamplingParams(max_tokens=16),
        )
        stub = pl_grpc.PipelineServiceStub(channel)
        return [m async for m in stub.Answer(request, timeout=30, metadata=metadata)]


def _fake_hops(provider):
    script = HopScript()
    return start_fake(
        [(rr_grpc.add_RerankServiceServicer_to_server, FakeRerank(script)),
         (gen_grpc.add_GenerationServiceServicer_to_server, FakeGeneration(script))],
        interceptors=[telemetry.server_interceptor(provider)],
    )


async def test_one_answer_is_one_trace_with_a_span_per_hop(minilm, tmp_path, caplog):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    fake = await _fake_hops(provider)
    hops = [EmbeddingHop(embedder=minilm), SearchHop(), PipelineHop()]
    try:
        async with running(_config(tmp_path, fake.address), hops, tracer_provider=provider) as server:
            await _seed(server, minilm)
            exporter.clear()  # the collection's set-up calls are their own traces
            messages = await _answer_once(server)
    finally:
        await fake.stop()
    assert messages[-1].WhichOneof("event") == "final"
    # The generate span is attached and detached within each step of its stream, whose
    # first step runs as a task of its own (it starts while the sources are written).
    assert not [r for r in caplog.records if "detach" in r.getMessage()], caplog.text
    spans = exporter.get_finished_spans()
    answers = [s for s in spans if s.name == ANSWER_SPAN]
    answer_traces = {s.context.trace_id for s in answers}
    assert len(answers) == 1, [s.name for s in spans]
    assert {s.context.trace_id for s in spans} == answer_traces
    pipeline = answers[0]
    assert pipeline.parent is None  # the caller sent no traceparent: the pipeline is the root
    by_name = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    for hop in HOPS:
        [span] = by_name[hop]
        assert span.parent.span_id == pipeline.context.span_id, hop
    # The remote hops' own server spans joined through traceparent in the gRPC metadata
    # (Generate's stream gets no server span: server.telemetry.TRACED_STREAMS; its client
    # span is under "generate").
    [gen_client] = [s for s in by_name["/backbone.v1.GenerationService/Generate"]]
    assert gen_client.kind == SpanKind.CLIENT and gen_client.parent.span_id == by_name["generate"][0].context.span_id
    for remote, hop in (("/backbone.v1.RerankService/Rerank", "rerank"),):
        [server_span] = [s for s in by_name[remote] if s.kind == SpanKind.SERVER]
        chain, parent = [], server_span.parent
        ids = {s.context.span_id: s for s in spans}
        while parent is not None:
            chain.append(ids[parent.span_id].name)
            parent = ids[parent.span_id].parent
        assert hop in chain and chain[-1] == ANSWER_SPAN, chain


async def test_a_callers_traceparent_is_continued(minilm, tmp_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    fake = await _fake_hops(provider)
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    try:
        hops = [EmbeddingHop(embedder=minilm), SearchHop(), PipelineHop()]
        async with running(_config(tmp_path, fake.address), hops, tracer_provider=provider) as server:
            await _seed(server, minilm)
            exporter.clear()
            await _answer_once(server, (("traceparent", f"00-{trace_id}-{parent_id}-01"),))
    finally:
        await fake.stop()
    spans = exporter.get_finished_spans()
    [answer] = [s for s in spans if s.name == ANSWER_SPAN]
    assert answer.parent.span_id == int(parent_id, 16)
    assert {f"{s.context.trace_id:032x}" for s in spans} == {trace_id}


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector keeping what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_receiver(minilm, tmp_path):
    # A thread-pool (sync) server: the exporter's last flush runs while the event loop is
    # busy stopping the backbone server.
    receiver = _Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    fake = await _fake_hops(None)  # remote hops without an exporter of their own
    try:
        config = _config(tmp_path, fake.address, otlp_endpoint=f"http://127.0.0.1:{port}",
                         service_name="backbone-test")
        hops = [EmbeddingHop(embedder=minilm), SearchHop(), PipelineHop()]
        async with running(config, hops) as server:
            await _seed(server, minilm)
            await _answer_once(server)
        # stopping the server flushed its provider
    finally:
        await fake.stop()
        collector.stop(0)
    spans = [
        (span, rs.resource)
        for request in receiver.requests for rs in request.resource_spans
        for ss in rs.scope_spans for span in ss.spans
    ]
    [answer] = [s for s, _ in spans if s.name == ANSWER_SPAN]
    in_answer = [s for s, _ in spans if s.trace_id == answer.trace_id]
    names = {s.name for s in in_answer}
    assert set(HOPS) <= names, names
    for span in in_answer:
        if span.name in HOPS:
            assert span.parent_span_id == answer.span_id
    services = {a.value.string_value for _, r in spans for a in r.attributes if a.key == "service.name"}
    assert services == {"backbone-test"}


def test_no_endpoint_means_no_exporting_provider():
    assert telemetry.provider_for(load_config().telemetry) is None
    with pytest.raises(Exception):
        load_config(overrides={"telemetry": {"otlp_endpont": "x"}})


async def test_prometheus_counts_hops_cache_and_queues(minilm, tmp_path):
    from server import metrics

    reg = metrics.get().registry

    def value(name, **labels):
        return reg.get_sample_value(name, labels) or 0.0

    fake = await _fake_hops(None)
    greedy = gen_pb.SamplingParams(temperature=0.0, max_tokens=16)
    config = load_config(overrides={
        "server": {"port": 0, "metrics_port": 0},
        "search": {"data_dir": str(tmp_path), "faiss_threads": 1, "faiss_build_threads": 1},
        "upstream": {"rerank_address": fake.address, "generation_address": fake.address},
    })
    before = {hop: value("backbone_upstream_requests_total", hop=hop, code="OK") for hop in HOPS}
    hits = value("backbone_cache_lookups_total", result="exact_hit")
    misses = value("backbone_cache_lookups_total", result="miss")
    try:
        hops = [EmbeddingHop(embedder=minilm), SearchHop(), PipelineHop()]
        async with running(config, hops) as server:
            await _seed(server, minilm)
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pl_grpc.PipelineServiceStub(channel)
                request = pb.AnswerRequest(
                    retrieve=pb.RetrieveRequest(query="what is green tea", collection="tea", top_n=2),
                    sampling=greedy,
                )
                for _ in range(2):  # a miss, then the same question: an exact hit
                    [m async for m in stub.Answer(request, timeout=30)]
            entries = value("backbone_cache_entries")
            depth = reg.get_sample_value("backbone_queue_depth", {"hop": "embed"})
    finally:
        await fake.stop()
    for hop in HOPS:
        assert value("backbone_upstream_requests_total", hop=hop, code="OK") == before[hop] + 1, hop
        assert value("backbone_upstream_seconds_count", hop=hop) >= 1
    assert value("backbone_upstream_queue_seconds_count", hop="rerank") >= 1
    assert value("backbone_cache_lookups_total", result="miss") == misses + 1
    assert value("backbone_cache_lookups_total", result="exact_hit") == hits + 1
    assert entries >= 1 and depth == 0.0


async def test_the_router_continues_the_trace_under_its_own_span():
    from backbone.v1 import embedding_service_pb2 as epb
    from backbone.v1 import embedding_service_pb2_grpc as emb_grpc
    from server.router.hop import RouterHop
    from tests.conftest import make_config
    from tests.routing.conftest import fakes

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with fakes(1) as [replica]:
        config = make_config(router={"upstreams": {"embedding": [replica.address]}, "start_wait_s": 5})
        async with running(config, [RouterHop()], tracer_provider=provider) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                await emb_grpc.EmbeddingServiceStub(channel).Embed(
                    epb.EmbedRequest(inputs=["abc"]), timeout=5,
                    metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
                )
    [span] = [s for s in exporter.get_finished_spans() if s.name.endswith("/Embed")]
    assert f"{span.context.trace_id:032x}" == trace_id and span.parent.span_id == int(parent_id, 16)
    # The replica got the same trace, parented under the router's span (not the caller's).
    _, got_trace, got_parent, _ = replica.last_metadata["traceparent"].split("-")
    assert got_trace == trace_id and int(got_parent, 16) == span.context.span_id
