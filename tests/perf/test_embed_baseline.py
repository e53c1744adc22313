"""perf.embed_baseline: the in-process settings of the ONNX engine, timed for real."""

from __future__ import annotations

import json

import pytest

from perf.embed_baseline import measure_onnx


def test_onnx_settings_time_one_text_per_call(onnx_minilm, msmarco_dir):
    with open(msmarco_dir / "corpus.jsonl") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(20), fh)]
    alone = measure_onnx(onnx_minilm, texts, 0, seconds=0.2, min_calls=5)
    lanes = measure_onnx(onnx_minilm, texts, 2, seconds=0.2, min_calls=5)
    assert (alone["mode"], alone["lanes"], lanes["mode"], lanes["lanes"]) == (
        "onnx-alone", 0, "onnx-lanes", 2
    )
    for row in (alone, lanes):
        assert row["batch_size"] == 1 and row["texts"] >= 5
        assert row["texts"] == row["call_latency_ms"]["count"]
        assert row["texts_per_s"] == pytest.approx(row["texts"] / row["seconds"], rel=0.01)
