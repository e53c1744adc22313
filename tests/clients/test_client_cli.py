"""``backbone embed`` and ``backbone health`` run in-process against the fake server.

The sync CLI runs in a worker thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from clients.channel import BACKBONE_SERVICES
from clients.cli import main


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_embed_prints_one_json_vector_per_text(backend, fake, capsys):
    code = await run_cli("embed", "hello", "world", "--address", backend.address)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert len(lines) == 2
    vectors = np.array([json.loads(line) for line in lines], dtype=np.float32)
    assert vectors.shape == (2, 384)
    np.testing.assert_array_equal(vectors, np.stack([fake("hello"), fake("world")]))


async def test_embed_short_format_options_and_env_address(backend, fake, capsys, monkeypatch):
    monkeypatch.setenv("BACKBONE_ADDRESS", backend.address)
    code = await run_cli("embed", "hello", "--dimensions", "8", "--format", "short")
    out, _ = capsys.readouterr()
    head = ", ".join(f"{v:.4f}" for v in fake("hello")[:4])
    assert code == 0
    assert out == f"8 [{head}, ...]\n"


async def test_embed_reads_stdin_lines_in_batches(backend, fake, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\nc\n"))
    code = await run_cli(
        "embed", "first", "-", "--batch-size", "2", "--normalize", "--address", backend.address
    )
    out, _ = capsys.readouterr()
    vectors = np.array([json.loads(line) for line in out.splitlines()])
    assert code == 0
    assert vectors.shape == (4, 384)
    expected = fake("c") / np.linalg.norm(fake("c"))
    np.testing.assert_allclose(vectors[3], expected, rtol=1e-5)
    assert backend.script.calls["Embed"] == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "INVALID_ARGUMENT EMPTY_INPUT"), ("x" * 2000, "INVALID_ARGUMENT INPUT_TOO_LARGE")],
)
async def test_embed_bad_input_is_one_line_exit_1(backend, capsys, text, expected):
    code = await run_cli("embed", text, "--address", backend.address)
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith(f"backbone embed: {expected}: ")
    assert err.count("\n") == 1


async def test_embed_token_and_wrong_token(backend, capsys):
    backend.script.required_token = "s3cret"
    ok = await run_cli("embed", "x", "--address", backend.address, "--token", "s3cret")
    bad = await run_cli("embed", "x", "--address", backend.address, "--token", "nope")
    _, err = capsys.readouterr()
    assert (ok, bad) == (0, 1)
    assert "UNAUTHENTICATED" in err


async def test_embed_over_mtls(tls_backend, pki, capsys):
    port = tls_backend.address.rsplit(":", 1)[1]
    code = await run_cli(
        "embed", "x", "--address", f"localhost:{port}",
        "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
        "--tls-key", str(pki.client_key), "--tls-server-name", "backbone.test",
    )
    out, _ = capsys.readouterr()
    assert code == 0 and len(json.loads(out)) == 384


async def test_unreachable_server_exit_1(capsys):
    code = await run_cli("embed", "x", "--address", "127.0.0.1:1", "--timeout", "2")
    _, err = capsys.readouterr()
    assert code == 1 and err.startswith("backbone embed: UNAVAILABLE")


async def test_usage_errors_exit_2(capsys, tmp_path):
    assert await run_cli("embed", "x", "--tls-cert", "c.pem") == 2
    missing = str(tmp_path / "missing.pem")
    assert await run_cli("embed", "x", "--tls-ca", missing) == 2
    _, err = capsys.readouterr()
    assert "tls_cert and tls_key" in err and "missing.pem" in err
    with pytest.raises(SystemExit) as caught:
        await run_cli("embed", "x", "--dimensions", "-1")
    assert caught.value.code == 2


async def test_health_all_serving_exit_0(backend, capsys):
    code = await run_cli("health", "--address", backend.address)
    out, _ = capsys.readouterr()
    rows = dict(line.split() for line in out.splitlines())
    assert code == 0
    assert rows == {"(server)": "SERVING", **{s: "SERVING" for s in BACKBONE_SERVICES}}


async def test_health_not_serving_exit_1(backend, capsys):
    name = "backbone.v1.EmbeddingService"
    await backend.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    all_code = await run_cli("health", "--address", backend.address)
    one_code = await run_cli("health", "--address", backend.address, "--service", "")
    named = await run_cli("health", "--address", backend.address, "--service", name)
    out, _ = capsys.readouterr()
    assert (all_code, one_code, named) == (1, 0, 1)
    assert f"{name}  NOT_SERVING" in out


async def test_health_named_unknown_service_exit_1(backend, capsys):
    code = await run_cli("health", "--address", backend.address, "--service", "no.Such")
    out, _ = capsys.readouterr()
    assert code == 1 and out.split() == ["no.Such", "SERVICE_UNKNOWN"]


def test_generate_stats_name_the_tier_that_auto_chose():
    from clients.commands.generate import route_summary

    route = '{"tier": "large", "model": "m", "score": 0.81, "spilled": false}'
    assert route_summary(route) == " tier=large score=0.81"
    assert route_summary(b'{"tier": "small", "score": 0.1, "spilled": true}') == (
        " tier=small score=0.10 spilled"
    )
    assert route_summary(None) == "" and route_summary("not json") == ""
