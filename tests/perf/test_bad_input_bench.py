"""perf.bad_input_bench: the cases, the certificate and the report, without any server."""

from __future__ import annotations

import ipaddress
import json

import pytest
from cryptography import x509

from backbone.v1 import embedding_service_pb2
from perf.bad_input_bench import (
    Attempt,
    BackgroundTally,
    Case,
    build_cases,
    build_parser,
    build_report,
    got_label,
    markdown_report,
    self_signed_cert,
    summarize_background,
    summarize_case,
    write_report,
)
from server.config import EmbeddingConfig, ServerConfig

TOKEN = "the-right-token"


def _case(code: str = "INVALID_ARGUMENT", reason: str = "EMPTY_INPUT") -> Case:
    return Case("empty_input", "Embed, empty input list", "plain", b"", code, reason)


def _meta() -> dict:
    return {
        "started_at": "2024-01-01T00:00:00+00:00", "host": {"cpus": 2}, "server_command": "serve",
        "repeats": 4, "warmup": 2, "timeout_s": 5.0, "target_ok_ms": 10.0, "background_concurrency": 2,
    }


def test_cases_are_the_judged_list_and_their_requests_hit_the_intended_limit() -> None:
    cases = {c.key: c for c in build_cases(TOKEN)}
    assert list(cases) == [
        "empty_input", "too_many_inputs", "text_too_large", "message_too_large",
        "wrong_token", "missing_token", "plaintext_to_tls",
    ]
    limits, cap = EmbeddingConfig(), ServerConfig().max_message_bytes

    def inputs(key: str) -> list[str]:
        return list(embedding_service_pb2.EmbedRequest.FromString(cases[key].request).inputs)

    assert inputs("empty_input") == []
    assert len(inputs("too_many_inputs")) == 10_000 > limits.max_inputs
    # 1 MiB text: refused by the servicer (per-text limit), not by gRPC's message cap
    assert len(inputs("text_too_large")[0]) > limits.max_text_chars
    assert len(cases["text_too_large"].request) < cap
    assert len(cases["message_too_large"].request) > cap
    assert (cases["message_too_large"].expected_code, cases["message_too_large"].expected_reason) == (
        "RESOURCE_EXHAUSTED", "")
    wrong = dict(cases["wrong_token"].metadata)["authorization"]
    assert wrong.startswith("Bearer ") and wrong != f"Bearer {TOKEN}" and len(wrong) == len(f"Bearer {TOKEN}")
    assert cases["missing_token"].metadata == ()
    assert cases["plaintext_to_tls"].fresh_channel and cases["plaintext_to_tls"].server == "tls"


def test_self_signed_cert_names_localhost_and_the_loopback_ip() -> None:
    cert_pem, key_pem = self_signed_cert()
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.issuer == cert.subject
    assert b"PRIVATE KEY" in key_pem


def test_a_case_answered_as_expected_and_fast_passes() -> None:
    attempts = [Attempt(ms, "INVALID_ARGUMENT", "EMPTY_INPUT", "EmptyInputError") for ms in (1.0, 2.0, 3.0, 4.0)]
    summary = summarize_case(_case(), attempts, target_ok_ms=10.0)
    assert summary["expected_ok"] and summary["p99_ok"]
    assert summary["latency_ms"]["p50"] == pytest.approx(2.5)
    assert summary["latency_ms"]["max"] == 4.0 and summary["latency_ms"]["count"] == 4
    assert summary["outcomes"] == [{"code": "INVALID_ARGUMENT", "reason": "EMPTY_INPUT", "count": 4}]
    assert summary["client_exceptions"] == ["EmptyInputError"]


def test_a_wrong_answer_or_a_slow_tail_fails_the_case() -> None:
    attempts = [Attempt(1.0, "INVALID_ARGUMENT", "EMPTY_INPUT")] * 3 + [Attempt(50.0, "UNAVAILABLE", "")]
    summary = summarize_case(_case(), attempts, target_ok_ms=10.0)
    assert not summary["expected_ok"] and not summary["p99_ok"]
    assert got_label(summary["outcomes"]) == "INVALID_ARGUMENT / EMPTY_INPUT ×3, UNAVAILABLE / – ×1"
    # the right code with the wrong reason is not the expected answer either
    wrong_reason = summarize_case(_case(), [Attempt(1.0, "INVALID_ARGUMENT", "INVALID_INPUT")], 10.0)
    assert not wrong_reason["expected_ok"] and wrong_reason["p99_ok"]
    assert not summarize_case(_case(), [], 10.0)["expected_ok"]  # nothing measured: no pass


def test_background_passes_only_when_every_good_request_is_ok() -> None:
    tally = BackgroundTally(latencies_ms=[5.0, 6.0], seconds=1.5)
    assert summarize_background(tally, 2)["all_ok"]
    tally.failures["UNAVAILABLE"] += 1
    failed = summarize_background(tally, 2)
    assert not failed["all_ok"] and failed["failed"] == 1 and failed["ok"] == 2
    assert failed["failures_by_status"] == {"UNAVAILABLE": 1}
    assert not summarize_background(BackgroundTally(), 2)["all_ok"]  # no traffic at all


def test_report_table_and_files(tmp_path) -> None:
    fast = summarize_case(_case(), [Attempt(1.0, "INVALID_ARGUMENT", "EMPTY_INPUT")] * 4, 10.0)
    tls = Case("plaintext_to_tls", "plaintext client -> TLS port", "tls", b"", "UNAVAILABLE", fresh_channel=True)
    slow = summarize_case(tls, [Attempt(30.0, "UNAVAILABLE", "")] * 4, 10.0)
    background = summarize_background(BackgroundTally(latencies_ms=[5.0] * 10, seconds=2.0), 2)
    report = build_report([fast, slow], background, _meta())
    assert report["pass"] == {"all_expected": True, "all_p99_within_target": False, "background_all_ok": True}
    text = markdown_report(report)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| #"))
    assert "p99 <= 10 ms" in lines[header]
    assert lines[header + 2].startswith("| 1 | Embed, empty input list | INVALID_ARGUMENT / EMPTY_INPUT |")
    assert lines[header + 2].endswith("| yes | pass |")
    assert "| UNAVAILABLE / – | UNAVAILABLE / – | 4 | 30.00 | 30.00 | 30.00 | yes | fail |" in lines[header + 3]
    assert "10 OK, 0 failed (none)" in text and "All OK: yes" in text
    json_path, md_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    assert md_path.read_text() == text


def test_parser_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.repeats, args.warmup, args.target_ok_ms, args.background_concurrency) == (20, 2, 10.0, 2)
    assert "{port}" in args.server_cmd and "serve embedding" in args.server_cmd
