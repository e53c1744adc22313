"""Fixtures of the rerank tests: one copy of each engine per session, real servers on port 0.

The cross-encoder is a tiny randomly initialised ``BertForSequenceClassification`` with
the bundled MiniLM's tokenizer, built and saved here (no cross-encoder can be
downloaded): it proves that a real model directory loads and scores exactly, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from backbone.v1 import rerank_service_pb2_grpc
from server.servicers.rerank import RerankHop
from tests.conftest import error_reason, make_config, running



@pytest.fixture(scope="session")
def passages(msmarco_dir) -> list[str]:
    """Real MS MARCO passages (about 60 to 200 tokens)."""
    with open(msmarco_dir / "corpus.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(300), fh)]


@pytest.fixture(scope="session")
def maxsim_engine():
    """The default engine over the bundled MiniLM, document cache off (every document
    goes through the batcher, so batching is what the tests exercise)."""
    from server.engines.maxsim_reranker import MaxSimReranker

    return MaxSimReranker(cache_bytes=0)


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory) -> Path:
    """A small random cross-encoder saved with save_pretrained (weights + tokenizer)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from server.engines.embedder import bundled_model_path

    path = tmp_path_factory.mktemp("models") / "tiny-cross-encoder"
    torch.manual_seed(1234)
    config = BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512, num_labels=1,
        # A wide init spreads the logits, so scores differ visibly between documents.
        initializer_range=0.5,
    )
    BertForSequenceClassification(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(str(bundled_model_path())).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def cross_encoder_engine(tiny_cross_encoder_dir):
    """The cross-encoder engine over the tiny saved model."""
    from server.engines.cross_encoder_reranker import CrossEncoderReranker

    return CrossEncoderReranker(tiny_cross_encoder_dir)


@pytest.fixture(scope="module")
async def maxsim_server(maxsim_engine):
    """A real server with the rerank hop over the default engine (small batches)."""
    config = make_config(rerank={"max_batch_size": 16, "max_wait_ms": 5})
    async with running(config, [RerankHop(engine=maxsim_engine)]) as server:
        yield server


@pytest.fixture
async def maxsim_stub(maxsim_server):
    async with grpc.aio.insecure_channel(maxsim_server.address) as channel:
        yield rerank_service_pb2_grpc.RerankServiceStub(channel)
