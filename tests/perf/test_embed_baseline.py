"""perf.embed_baseline: the in-process settings of the ONNX engine, timed for real."""

from __future__ import annotations

import io
import json

import pytest

from perf.embed_baseline import measure_onnx, measure_setting, serve_blocks


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


def test_block_worker_times_each_requested_setting(onnx_minilm, msmarco_dir):
    with open(msmarco_dir / "corpus.jsonl") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(20), fh)]
    requests = io.StringIO(
        '{"mode": "onnx-lanes", "batch_size": 1, "lanes": 2, "seconds": 0.2}\n'
        "\n"
        '{"mode": "onnx-alone", "batch_size": 1, "lanes": 0, "seconds": 0.2}\n'
    )
    results = io.StringIO()
    served = serve_blocks(requests, results, texts, engines={"onnx": onnx_minilm})
    rows = [json.loads(line) for line in results.getvalue().splitlines()]
    assert served == 2
    assert [(r["mode"], r["lanes"]) for r in rows] == [("onnx-lanes", 2), ("onnx-alone", 0)]
    assert all(r["texts"] >= 2 and r["seconds"] >= 0.2 for r in rows)


def test_block_worker_refuses_a_mode_it_does_not_know():
    with pytest.raises(ValueError, match="unknown baseline mode"):
        measure_setting({}, ["a text"], {"mode": "gpu", "batch_size": 1}, 0.1)
