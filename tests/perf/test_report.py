"""perf.report: percentiles, medians and tables on known data."""

from __future__ import annotations

import pytest

from perf.report import dig, latency_summary, markdown_table, median


def test_percentiles_of_1_to_100_match_hand_computed_values() -> None:
    # Linear interpolation between closest ranks: p = 1 + (q/100) * 99.
    summary = latency_summary(range(1, 101))
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p95"] == pytest.approx(95.05)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["max"] == 100
    assert summary["mean"] == pytest.approx(50.5)
    assert summary["count"] == 100


def test_percentiles_are_order_independent_and_tail_sensitive() -> None:
    samples = [5.0] * 98 + [500.0, 1000.0]
    forward = latency_summary(samples)
    backward = latency_summary(list(reversed(samples)))
    assert forward == backward
    assert forward["p50"] == 5.0
    assert forward["p99"] == pytest.approx(500.0 + 0.01 * 500.0)
    assert forward["max"] == 1000.0


def test_empty_summary_has_no_figures() -> None:
    summary = latency_summary([])
    assert summary["count"] == 0
    assert summary["p50"] is None and summary["p99"] is None and summary["max"] is None


def test_median_skips_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None, None]) is None
    assert median([1.0, 4.0]) == 2.5


def test_dig_and_markdown_table() -> None:
    record = {"a": {"b": {"c": 7}}}
    assert dig(record, "a.b.c") == 7
    assert dig(record, "a.x.c") is None
    table = markdown_table(["x", "y"], [[1.25, None], ["s", True]])
    lines = table.strip().splitlines()
    assert lines[0] == "| x | y |"
    assert lines[2] == "| 1.2 | – |" or lines[2] == "| 1.3 | – |"
    assert lines[3] == "| s | yes |"
