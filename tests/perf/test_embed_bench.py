"""perf.embed_bench: server processes, the CLI end to end on the echo floor, the figures."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from perf import embed_bench
from perf.embed_bench import markdown_report, run_figures, summarize
from perf.harness import REPO_ROOT, start_backbone_server, start_echo_server


def test_echo_server_process_and_loadgen_cli_write_the_result(tmp_path) -> None:
    echo = start_echo_server(tmp_path)
    try:
        out = tmp_path / "echo.json"
        subprocess.run(
            [
                sys.executable, "-m", "perf.loadgen", "echo", "--target", echo.target,
                "--rate", "30", "--duration", "1", "--warmup", "0.2", "--no-progress",
                "--server-pid", str(echo.pid), "--json-out", str(out),
            ],
            cwd=REPO_ROOT, check=True, timeout=60,
        )
        result = json.loads(out.read_text())
    finally:
        echo.stop()
    assert echo.proc.returncode is not None  # stopped
    assert result["errors_by_status"] == {} and result["counts"]["ok"] > 0
    assert result["client"]["event_loop"] == "uvloop"
    assert result["client"]["pid"] != echo.pid  # the client ran in its own process
    server = result["server"]
    assert server["pid"] == echo.pid and not server["exited"]
    assert 0 < server["rss_mb"]["start"] <= server["rss_mb"]["max"]


def test_a_server_that_dies_at_startup_is_reported(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="exited with 3"):
        start_backbone_server("{python} -c 'import sys; sys.exit(3)'", tmp_path, "x", startup_timeout_s=30)


def _phases() -> dict:
    def load(rps, p50, p99, counts=None, errors=None, rss=(500.0, 510.0), rate=None, items=1):
        counts = counts or {"issued": 100, "ok": 100, "errors": 0, "dropped_by_client": 0}
        return {
            "throughput_rps": rps, "items_per_s": rps * items, "target_rate_rps": rate,
            "latency_ms": {"p50": p50, "p99": p99}, "latency_by_status_ms": {},
            "counts": counts, "errors_by_status": errors or {},
            "server": {"rss_mb": {"start": rss[0], "max": rss[1]}},
        }

    return {
        "baseline": {"best": {"mode": "sorted", "texts_per_s": 100.0, "batch_size": 32}, "single_text_p50_ms": 9.0},
        # The single-caller claim is taken from the interleaved comparison, not the baseline.
        "embed_interleaved": {
            "inprocess_ms": {"p50": 10.0}, "server_ms": {"p50": 11.5},
            "server_reported_compute_ms": {"p50": 10.2},
            "rpc_floor": {"overhead_p50_ms": 0.9},
        },
        "echo_closed": load(2000.0, 20.0, 40.0),
        "embed_single": load(80.0, 11.5, 20.0),
        "embed_saturation": load(95.0, 600.0, 900.0),
        # In-process blocks interleaved with the server's: the ratio is taken per round
        # (0.95, 0.90, 1.00), not from the baseline phase's best (100 texts/s).
        "saturation_rounds": [
            {"round": 1, "inprocess": {"texts_per_s": 100.0}, "server": load(95.0, 600.0, 900.0)},
            {"round": 2, "inprocess": {"texts_per_s": 100.0}, "server": load(90.0, 610.0, 950.0)},
            {"round": 3, "inprocess": {"texts_per_s": 80.0}, "server": load(
                80.0, 590.0, 800.0, counts={"issued": 200, "ok": 100, "errors": 100, "dropped_by_client": 0},
                errors={"RESOURCE_EXHAUSTED": 100},
            )},
        ],
        "embed_half": load(47.5, 30.0, 80.0, rate=47.5),
        "embed_overload": load(
            95.0, 35.0, 36.0, rate=285.0,
            counts={"issued": 1000, "ok": 300, "errors": 700, "dropped_by_client": 0},
            errors={"RESOURCE_EXHAUSTED": 700},
        ),
    }


def test_figures_are_ratios_within_the_run() -> None:
    figures = run_figures(_phases())
    assert figures["throughput_ratio"] == pytest.approx(0.95)
    assert figures["saturation_texts_per_s"] == pytest.approx(90.0)
    assert figures["inprocess_interleaved_texts_per_s"] == pytest.approx(100.0)
    assert figures["saturation_p99_ms"] == pytest.approx(900.0)
    assert figures["saturation_refused_share"] == pytest.approx(100 / 400)
    assert figures["single_overhead_ms"] == pytest.approx(1.5)
    assert figures["single_floor_overhead_ms"] == pytest.approx(0.9)
    assert figures["inprocess_best_sorted"] == 1.0
    assert figures["overload_answered_pct"] == pytest.approx(100.0)
    assert figures["overload_p99_vs_single_p99"] == pytest.approx(1.8)
    assert figures["overload_rss_growth"] == pytest.approx(0.02)
    summary = summarize([{"run": 1, "phases": _phases(), "figures": figures}])
    assert all(summary["pass"].values()), summary["pass"]


def test_an_unanswered_request_or_a_slow_tail_fails_its_claim() -> None:
    good = _phases()
    bad = copy.deepcopy(good)
    bad["embed_overload"]["counts"]["ok"] = 299
    bad["embed_overload"]["errors_by_status"]["DEADLINE_EXCEEDED"] = 1
    bad["embed_half"]["latency_ms"]["p99"] = 150.0
    runs = [
        {"run": i, "phases": p, "figures": run_figures(p)} for i, p in enumerate([good, bad, good], 1)
    ]
    summary = summarize(runs)
    # One unanswered request in any run fails; the p99 claim uses the median run.
    assert summary["pass"]["overload_all_answered"] is False
    assert summary["pass"]["half_load_p99"] is True
    meta = {
        "started_at": "t", "host": {"cpus": 2}, "duration": 1, "warmup": 0, "concurrency": 64,
        "half_load": 0.5, "overload": 3.0, "server_command": "cmd", "plot_note": "no plot",
    }
    report = markdown_report(summary, runs, meta)
    assert "| claim | measured (median) | target | pass |" in report
    assert report.count("\n| 2 |") == 1  # one row per run


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails like when absent
    note = embed_bench.plot_latency_vs_load([], tmp_path / "p.png")
    assert "skipped" in note and not (tmp_path / "p.png").exists()


class _Worker:
    def __init__(self, log: list) -> None:
        self.log = log

    def measure(self, setting, seconds):
        self.log.append(("in-process", setting["mode"], seconds))
        return {"texts_per_s": 50.0}


def test_saturation_rounds_alternate_which_side_leads(monkeypatch) -> None:
    log: list = []

    def loadgen(args, scenario, server, out_path, *, concurrency=None, duration=None, **_):
        log.append(("server", concurrency, duration))
        return {"items_per_s": 45.0}

    monkeypatch.setattr(embed_bench, "run_loadgen", loadgen)
    args = embed_bench.build_parser().parse_args(["--saturation-rounds", "3", "--saturation-seconds", "5"])
    rounds = embed_bench.run_saturation(args, None, _Worker(log), {"mode": "onnx-lanes"}, "/tmp/x")
    assert log == [
        ("in-process", "onnx-lanes", 5.0), ("server", 64, 5.0),
        ("server", 64, 5.0), ("in-process", "onnx-lanes", 5.0),
        ("in-process", "onnx-lanes", 5.0), ("server", 64, 5.0),
    ]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["inprocess"]["texts_per_s"] == 50.0 and r["server"]["items_per_s"] == 45.0 for r in rounds)


@pytest.mark.parametrize("flags", [["--saturation-rounds", "0"], ["--saturation-seconds", "0"]])
def test_a_saturation_phase_without_a_round_is_refused_at_once(flags, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        embed_bench.main([*flags, "--out-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "--saturation-rounds must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "embed_raw").exists()  # nothing started
