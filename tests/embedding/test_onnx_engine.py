"""The ONNX Runtime engine (the hop's default on CPU) and the hop's choice of engine."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from server.config import EmbeddingConfig
from server.engines import onnx_embedder, registry
from server.engines.embedder import SentenceTransformerEmbedder
from server.engines.onnx_embedder import OnnxEmbedder
from server.servicers.embedding import EmbeddingHop

TEXTS = [
    "",
    "hello",
    "Paris is the capital and most populous city of France.",
    "An over-long text that the model cuts at its maximum sequence length. " * 40,
]


def test_vectors_equal_sentence_transformers_on_lanes_and_alone(onnx_minilm, minilm):
    want = minilm._model.encode(TEXTS, convert_to_numpy=True)
    for got in (onnx_minilm.embed(TEXTS), onnx_minilm.embed_alone(TEXTS)):
        assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
        cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert cosine.min() >= 0.99999


def test_lanes_in_parallel_threads_give_the_same_vectors(onnx_minilm):
    expected = onnx_minilm.embed(TEXTS)
    errors: list[BaseException] = []

    def lane() -> None:
        try:
            for _ in range(5):
                np.testing.assert_allclose(onnx_minilm.embed(TEXTS), expected, atol=1e-5)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=lane) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_token_counts_match_the_torch_engine(onnx_minilm, minilm):
    assert onnx_minilm.count_tokens(TEXTS) == minilm.count_tokens(TEXTS)
    assert onnx_minilm.max_seq_length == minilm.max_seq_length == 256


def test_prepared_tokens_give_the_counts_and_the_vectors_of_the_texts(onnx_minilm):
    inputs, counts = onnx_minilm.prepare(TEXTS)
    assert counts == onnx_minilm.count_tokens(TEXTS)
    # Tokenised once on the request path, except the over-long text: the lane cuts it.
    assert [isinstance(i, str) for i in inputs] == [False, False, False, True]
    assert inputs[2].ids.shape == (1, counts[2])
    np.testing.assert_array_equal(onnx_minilm.embed(inputs), onnx_minilm.embed(TEXTS))
    np.testing.assert_array_equal(onnx_minilm.embed_alone(inputs), onnx_minilm.embed_alone(TEXTS))


def test_engine_that_disagrees_with_sentence_transformers_refuses_to_start(monkeypatch):
    monkeypatch.setattr(onnx_embedder, "CHECK_COSINE", 1.01)  # no real vector can pass
    with pytest.raises(RuntimeError, match="differ from sentence-transformers"):
        OnnxEmbedder()


def test_hop_falls_back_to_torch_when_onnx_cannot_serve(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no runtime here")

    monkeypatch.setattr(onnx_embedder.OnnxEmbedder, "from_config", classmethod(broken))
    engine = registry.load(registry.EMBEDDING, "onnx", EmbeddingConfig())
    assert isinstance(engine, SentenceTransformerEmbedder)


def test_hop_policy_follows_the_engine(onnx_minilm, minilm):
    cfg = EmbeddingConfig(max_batch_size=16)
    onnx_policy = EmbeddingHop._policy(cfg, onnx_minilm)
    assert (onnx_policy.max_batch_size, onnx_policy.lanes) == (1, onnx_minilm.lanes)
    torch_policy = EmbeddingHop._policy(cfg, minilm)
    assert (torch_policy.max_batch_size, torch_policy.lanes) == (16, 1)
    # Texts are handed to a lane ahead of time only when there is nothing to group; the
    # admission rule's knobs come from the config.
    assert (onnx_policy.lane_depth, torch_policy.lane_depth) == (2, 1)
    one_lane = EmbeddingHop._policy(cfg, SimpleNamespace(batch_limit=1, lanes=1, runs_alone=False))
    assert one_lane.max_queue_delay_s == cfg.max_queue_delay_ms / 1000
    assert one_lane.default_deadline_s == cfg.default_deadline_ms / 1000
    assert one_lane.max_queue_tokens == cfg.max_queue_tokens


def test_one_lane_runs_every_text_on_every_core(minilm):
    engine = OnnxEmbedder(lanes=1)
    assert engine.lanes == 1 and engine._lane_session is engine._alone_session
    want = minilm._model.encode(TEXTS, convert_to_numpy=True)
    got = engine.embed(TEXTS)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.99999
