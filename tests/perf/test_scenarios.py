"""perf.scenarios: the embed scenario's inputs and its check of the answers."""

from __future__ import annotations

import argparse

import grpc
import pytest

from backbone.v1 import embedding_service_pb2 as pb, embedding_service_pb2_grpc
from perf.loadgen import LoadConfig, run_scenario
from perf.scenarios import MSMARCO_CORPUS, SCENARIOS, batches, shuffled_texts


def test_texts_come_from_ms_marco_in_a_seeded_order() -> None:
    assert MSMARCO_CORPUS.exists(), MSMARCO_CORPUS
    first = shuffled_texts(seed=0)
    assert len(first) == 5000 and all(first)
    assert shuffled_texts(seed=0) == first
    assert shuffled_texts(seed=1) != first
    groups = batches(first, 3)
    assert len(groups) == 5000 // 3 and all(len(g) == 3 for g in groups)


class _FakeEmbedder(embedding_service_pb2_grpc.EmbeddingServiceServicer):
    """Answers with one vector per input, or one too few when told to (a harness test only)."""

    def __init__(self, short: bool) -> None:
        self.short = short
        self.seen: list[int] = []

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        self.seen.append(len(request.inputs))
        count = len(request.inputs) - (1 if self.short else 0)
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=[0.5] * 4) for _ in range(count)])


@pytest.mark.parametrize("short", [False, True])
async def test_embed_scenario_sends_n_texts_and_checks_the_answer(serve, short: bool) -> None:
    fake = _FakeEmbedder(short)
    target = await serve(lambda server: embedding_service_pb2_grpc.add_EmbeddingServiceServicer_to_server(fake, server))
    options = argparse.Namespace(texts_per_request=3, normalize=False, corpus=MSMARCO_CORPUS)
    config = LoadConfig(target=target, mode="closed", concurrency=2, duration=0.3, warmup=0, progress=False)
    result = await run_scenario(config, SCENARIOS["embed"], options)
    assert set(fake.seen) == {3}
    assert result["items_per_request"] == 3
    if short:
        assert result["counts"]["ok"] == 0
        assert result["errors_by_status"] == {"BAD_RESPONSE": result["counts"]["issued"]}
    else:
        assert result["errors_by_status"] == {}
        assert result["items_per_s"] == pytest.approx(3 * result["throughput_rps"], rel=1e-3)
