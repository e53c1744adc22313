"""perf.forwarder_floor: every forwarder really forwards, and the report has each."""

from __future__ import annotations

import json

import pytest

from perf import forwarder_floor


def test_every_forwarder_answers_through_to_the_replica_and_is_reported(tmp_path):
    assert forwarder_floor.main(["--rounds", "1", "--seconds", "0.2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "forwarder_floor.json").read_text())["result"]
    assert set(report) == {"direct", *forwarder_floor.FORWARDERS}
    for name, figures in report.items():
        assert figures["calls"] > 0 and figures["p50_ms"] > 0, name
    assert report["direct"]["added_p50_ms"] == 0
    assert "aio_sync_client" in (tmp_path / "forwarder_floor.md").read_text()


def test_bad_arguments_are_refused_before_anything_starts():
    with pytest.raises(SystemExit):
        forwarder_floor.main(["--rounds", "0"])
