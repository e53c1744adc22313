"""How fast the embedding server answers bad input, measured from a separate client process.

This process is the client. It starts three embedding servers as their own processes (from
``--server-cmd``): a plain one, one that requires a bearer token (``server.auth_token``)
and one that serves TLS only (a fresh self-signed certificate for 127.0.0.1 / localhost).
Each bad request below is sent ``--repeats`` times, one at a time, after ``--warmup``
uncounted sends. Each send is timed from the call to the error on the client. Requests are
serialized beforehand, so the time covers gRPC and the server, not protobuf encoding.

1. ``Embed`` with an empty input list -> INVALID_ARGUMENT / EMPTY_INPUT;
2. ``Embed`` with 10,000 texts -> INVALID_ARGUMENT / TOO_MANY_INPUTS;
3. ``Embed`` with one 1 MiB text (over ``embedding.max_text_chars``) -> INVALID_ARGUMENT /
   INPUT_TOO_LARGE;
4. a 5 MB message (over ``server.max_message_bytes``, 4 MiB) -> RESOURCE_EXHAUSTED from
   gRPC core, with no ErrorInfo;
5. a wrong bearer token (token server) -> UNAUTHENTICATED / UNAUTHENTICATED;
6. no token (token server) -> UNAUTHENTICATED / UNAUTHENTICATED;
7. a plaintext client against the TLS port, on a new channel for every send ->
   UNAVAILABLE on the client side, with no ErrorInfo.

Meanwhile ``--background-concurrency`` closed-loop callers keep sending good one-text
``Embed`` requests to the plain server on their own channel. The report counts how many
succeeded and how many failed during the bad-input phase. Every one must be OK.

For each case the report gives the status codes and ErrorInfo reasons seen, p50/p99/max in
ms, whether every answer was the expected one, and pass/fail for p99 <= ``--target-ok-ms``
(default 10). The markdown table is printed. The results go to
``perf/results/bad_input.json`` and ``perf/results/bad_input.md``, and the servers' logs go
under ``perf/results/bad_input_raw/``.

``.venv/bin/python -m perf.bad_input_bench`` (20 sends per case); quicker:
``.venv/bin/python -m perf.bad_input_bench --repeats 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import ipaddress
import os
import platform
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backbone.v1 import embedding_service_pb2
from clients.errors import from_rpc_error
from perf.embed_bench import DEFAULT_SERVER_CMD, EMBED_SERVICE
from perf.harness import REPO_ROOT, ServerProcess, start_backbone_server
from perf.report import fmt, latency_summary, markdown_table, write_json

DEFAULT_OUT_DIR = REPO_ROOT / "perf" / "results"
EMBED_METHOD = f"/{EMBED_SERVICE}/Embed"
GOOD_TEXT = "a short sentence that the embedding server should answer at once"
TOO_MANY_TEXTS = 10_000
LARGE_TEXT_CHARS = 1024 * 1024  # one 1 MiB text: over max_text_chars, under the message cap
OVERSIZED_MESSAGE_CHARS = 5_000_000  # 5 MB: over server.max_message_bytes (4 MiB)
# The client may send anything; the server's cap is the one under test.
CLIENT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", CLIENT_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", CLIENT_MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),  # one attempt per send: the time is the server's answer
)
# A background caller whose request failed waits this long before the next one.
FAILURE_PAUSE_S = 0.01


# --- the cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One kind of bad request: what to send, to which server, and the answer expected.

    ``server`` is ``"plain"``, ``"auth"`` (token required) or ``"tls"``; ``request`` is
    the serialized ``EmbedRequest``; ``expected_reason`` is ``""`` for a status without a
    backbone ErrorInfo; ``fresh_channel`` opens a new channel for every send.
    """

    key: str
    description: str
    server: str
    request: bytes
    expected_code: str
    expected_reason: str = ""
    metadata: tuple[tuple[str, str], ...] = ()
    fresh_channel: bool = False


def embed_request(texts: Sequence[str]) -> bytes:
    """A serialized ``EmbedRequest`` for ``texts``."""
    return embedding_service_pb2.EmbedRequest(inputs=list(texts)).SerializeToString()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


def wrong_token(token: str) -> str:
    """A token of the same length as ``token`` that is not ``token``."""
    return ("0" if token[:1] != "0" else "1") * len(token)


def build_cases(token: str) -> list[Case]:
    """The judged list: the bad requests, in the order they are sent."""
    good = embed_request([GOOD_TEXT])
    return [
        Case("empty_input", "Embed, empty input list", "plain", embed_request([]),
             "INVALID_ARGUMENT", "EMPTY_INPUT"),
        Case("too_many_inputs", f"Embed, {TOO_MANY_TEXTS:,} texts", "plain",
             embed_request([GOOD_TEXT] * TOO_MANY_TEXTS), "INVALID_ARGUMENT", "TOO_MANY_INPUTS"),
        Case("text_too_large", "Embed, one 1 MiB text", "plain",
             embed_request(["x" * LARGE_TEXT_CHARS]), "INVALID_ARGUMENT", "INPUT_TOO_LARGE"),
        Case("message_too_large", "5 MB message (> 4 MiB server cap)", "plain",
             embed_request(["x" * OVERSIZED_MESSAGE_CHARS]), "RESOURCE_EXHAUSTED"),
        Case("wrong_token", "wrong bearer token", "auth", good,
             "UNAUTHENTICATED", "UNAUTHENTICATED", metadata=bearer(wrong_token(token))),
        Case("missing_token", "no bearer token", "auth", good,
             "UNAUTHENTICATED", "UNAUTHENTICATED"),
        Case("plaintext_to_tls", "plaintext client -> TLS port (new channel each)", "tls", good,
             "UNAVAILABLE", fresh_channel=True),
    ]


# --- TLS material -------------------------------------------------------------------------


def self_signed_cert(common_name: str = "localhost") -> tuple[bytes, bytes]:
    """(certificate PEM, PKCS#8 key PEM) valid one day for localhost and 127.0.0.1.

    Self-signed and marked as a CA, so the certificate is its own trust root for a client.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_cert(directory: Path) -> tuple[Path, Path]:
    """Write a fresh :func:`self_signed_cert` into ``directory``; (cert path, key path)."""
    cert_pem, key_pem = self_signed_cert()
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert_pem)
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)
    return cert_path, key_path


# --- servers ------------------------------------------------------------------------------


def start_server(
    command: str,
    log_dir: Path,
    name: str,
    extra_sets: Sequence[str],
    startup_timeout_s: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    """Start one embedding server from ``command`` plus ``--set`` items; wait for SERVING."""
    return start_backbone_server(command, log_dir, EMBED_SERVICE, startup_timeout_s,
                                 name=f"embedding server {name}", extra_sets=extra_sets,
                                 credentials=credentials)


@contextlib.contextmanager
def running_servers(
    args: argparse.Namespace, log_dir: Path, token: str, cert_dir: Path
) -> Iterator[dict[str, ServerProcess]]:
    """The plain, token and TLS servers, one after the other; all stopped on the way out."""
    cert_path, key_path = write_cert(cert_dir)
    tls_credentials = grpc.ssl_channel_credentials(root_certificates=cert_path.read_bytes())
    specs = [
        ("plain", [], None),
        ("auth", [f"server.auth_token={token}"], None),
        ("tls", [f"server.tls_cert={cert_path}", f"server.tls_key={key_path}"], tls_credentials),
    ]
    with contextlib.ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for name, sets, credentials in specs:
            server = start_server(args.server_cmd, log_dir, name, sets, args.startup_timeout,
                                  credentials)
            stack.callback(server.stop)  # SIGTERM, then SIGKILL after the grace period
            servers[name] = server
        yield servers


# --- measuring ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One timed send: milliseconds to the answer, its status code and ErrorInfo reason."""

    ms: float
    code: str
    reason: str = ""
    exception: str = ""


@dataclass
class BackgroundTally:
    """Good requests sent during the bad-input phase: OK latencies and failures by status."""

    latencies_ms: list[float] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        """Requests answered OK with one embedding."""
        return len(self.latencies_ms)


def embed_call(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """``Embed`` on ``channel`` taking serialized requests and returning raw bytes."""
    return channel.unary_unary(EMBED_METHOD)


async def timed_send(
    call: grpc.aio.UnaryUnaryMultiCallable, case: Case, timeout_s: float
) -> Attempt:
    """Send ``case.request`` once; the time to its answer and what the answer was."""
    metadata = case.metadata or None
    started = time.perf_counter()
    try:
        await call(case.request, metadata=metadata, timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        ms = (time.perf_counter() - started) * 1000.0
        typed = from_rpc_error(error)
        return Attempt(ms, typed.code.name, typed.reason, type(typed).__name__)
    return Attempt((time.perf_counter() - started) * 1000.0, "OK")


async def send_on_fresh_channel(target: str, case: Case, timeout_s: float) -> Attempt:
    """:func:`timed_send` on a channel opened for this send (its closing is not timed)."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        return await timed_send(embed_call(channel), case, timeout_s)


async def run_case(
    case: Case, target: str, channel: grpc.aio.Channel | None, repeats: int, warmup: int,
    timeout_s: float,
) -> list[Attempt]:
    """``warmup`` uncounted sends, then ``repeats`` timed ones, one at a time.

    Sends go on ``channel``, or on a new channel to ``target`` each when the case asks
    for it (or no channel is given).
    """
    attempts = []
    for index in range(warmup + repeats):
        if case.fresh_channel or channel is None:
            attempt = await send_on_fresh_channel(target, case, timeout_s)
        else:
            attempt = await timed_send(embed_call(channel), case, timeout_s)
        if index >= warmup:
            attempts.append(attempt)
    return attempts


async def keep_serving(
    channel: grpc.aio.Channel, stop: asyncio.Event, tally: BackgroundTally, timeout_s: float
) -> None:
    """One closed-loop caller of good one-text ``Embed`` requests until ``stop`` is set."""
    call = channel.unary_unary(
        EMBED_METHOD, response_deserializer=embedding_service_pb2.EmbedResponse.FromString
    )
    request = embed_request([GOOD_TEXT])
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reply = await call(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            tally.failures[error.code().name] += 1
            await asyncio.sleep(FAILURE_PAUSE_S)  # no busy loop if the server is gone
            continue
        if len(reply.embeddings) == 1 and reply.embeddings[0].values:
            tally.latencies_ms.append((time.perf_counter() - started) * 1000.0)
        else:
            tally.failures["BAD_RESPONSE"] += 1


async def warm_up_channel(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """One good request on ``channel``; raises when it is not answered OK."""
    await embed_call(channel)(embed_request([GOOD_TEXT]), timeout=timeout_s)


async def measure(
    cases: Sequence[Case], targets: dict[str, str], args: argparse.Namespace
) -> tuple[dict[str, list[Attempt]], BackgroundTally]:
    """Every case in turn while background callers load the plain server.

    Cases share one channel per server (except new-channel cases); the background
    callers have a channel of their own, as other clients would.
    """
    tally = BackgroundTally()
    stop = asyncio.Event()
    shared = {c.server for c in cases if not c.fresh_channel}
    async with contextlib.AsyncExitStack() as stack:
        channels = {}
        for name in sorted(shared):
            channels[name] = await stack.enter_async_context(
                grpc.aio.insecure_channel(targets[name], options=CHANNEL_OPTIONS)
            )
        background = await stack.enter_async_context(
            grpc.aio.insecure_channel(targets["plain"], options=CHANNEL_OPTIONS)
        )
        await warm_up_channel(background, args.background_timeout)  # not counted
        workers = [
            asyncio.create_task(keep_serving(background, stop, tally, args.background_timeout))
            for _ in range(args.background_concurrency)
        ]
        started = time.perf_counter()
        try:
            results = {}
            for case in cases:
                print(f"[bench] {case.key}: {case.description}", file=sys.stderr)
                results[case.key] = await run_case(
                    case, targets[case.server], channels.get(case.server),
                    args.repeats, args.warmup, args.timeout,
                )
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
            tally.seconds = time.perf_counter() - started
    return results, tally


# --- figures and report -------------------------------------------------------------------


def outcome_key(code: str, reason: str) -> str:
    """``CODE / REASON`` (an en dash for a status without a backbone ErrorInfo)."""
    return f"{code} / {reason or '–'}"


def summarize_case(case: Case, attempts: Sequence[Attempt], target_ok_ms: float) -> dict[str, Any]:
    """The figures of one case: outcomes seen, latency summary, expected? and p99 pass."""
    counts = collections.Counter((a.code, a.reason) for a in attempts)
    latency = latency_summary(a.ms for a in attempts)
    p99 = latency["p99"]
    return {
        "case": case.key,
        "description": case.description,
        "server": case.server,
        "request_bytes": len(case.request),
        "expected": {"code": case.expected_code, "reason": case.expected_reason},
        "outcomes": [
            {"code": code, "reason": reason, "count": n} for (code, reason), n in counts.most_common()
        ],
        "client_exceptions": sorted({a.exception for a in attempts if a.exception}),
        "latency_ms": latency,
        "expected_ok": bool(attempts) and set(counts) == {(case.expected_code, case.expected_reason)},
        "p99_ok": p99 is not None and p99 <= target_ok_ms,
        "samples_ms": [round(a.ms, 3) for a in attempts],
    }


def summarize_background(tally: BackgroundTally, concurrency: int) -> dict[str, Any]:
    """The good traffic's counts and latency over the bad-input phase."""
    failed = sum(tally.failures.values())
    return {
        "concurrency": concurrency,
        "seconds": round(tally.seconds, 3),
        "ok": tally.ok,
        "failed": failed,
        "failures_by_status": dict(tally.failures),
        "latency_ms": latency_summary(tally.latencies_ms),
        "all_ok": tally.ok > 0 and failed == 0,
    }


def build_report(
    cases: Sequence[dict[str, Any]], background: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Any]:
    """The whole result: meta, per-case figures, background traffic and overall verdicts."""
    return {
        "meta": meta,
        "cases": list(cases),
        "background": background,
        "pass": {
            "all_expected": all(c["expected_ok"] for c in cases),
            "all_p99_within_target": all(c["p99_ok"] for c in cases),
            "background_all_ok": background["all_ok"],
        },
    }


def got_label(outcomes: Sequence[dict[str, Any]]) -> str:
    """What came back: one ``CODE / REASON``, or each with its count when they differ."""
    if len(outcomes) == 1:
        return outcome_key(outcomes[0]["code"], outcomes[0]["reason"])
    return ", ".join(f"{outcome_key(o['code'], o['reason'])} ×{o['count']}" for o in outcomes)


def pass_fail(ok: bool) -> str:
    """A verdict cell."""
    return "pass" if ok else "fail"


def markdown_report(report: dict[str, Any]) -> str:
    """The table of cases, the background traffic line and the verdicts, as markdown."""
    meta, bg = report["meta"], report["background"]
    target = meta["target_ok_ms"]
    rows = [
        (
            index,
            case["description"],
            outcome_key(case["expected"]["code"], case["expected"]["reason"]),
            got_label(case["outcomes"]),
            case["latency_ms"]["count"],
            fmt(case["latency_ms"]["p50"], 2),
            fmt(case["latency_ms"]["p99"], 2),
            fmt(case["latency_ms"]["max"], 2),
            "yes" if case["expected_ok"] else "NO",
            pass_fail(case["p99_ok"]),
        )
        for index, case in enumerate(report["cases"], start=1)
    ]
    headers = ["#", "case", "expected", "got", "n", "p50 ms", "p99 ms", "max ms", "expected?",
               f"p99 <= {fmt(float(target), 0)} ms"]
    failures = ", ".join(f"{k} {v}" for k, v in bg["failures_by_status"].items()) or "none"
    verdicts = report["pass"]
    return (
        "# Bad input: time to the error\n\n"
        f"{meta['started_at']} · {meta['host']['cpus']} CPUs · {meta['repeats']} sends per case "
        f"after {meta['warmup']} warm-up sends, one at a time, from a separate client process · "
        f"deadline {fmt(meta['timeout_s'], 1)} s · server: `{meta['server_command']}`\n\n"
        + markdown_table(headers, rows)
        + f"\nMeanwhile {bg['concurrency']} closed-loop callers sent good one-text Embed requests "
        f"to the plain server for {fmt(bg['seconds'], 1)} s: {bg['ok']} OK, {bg['failed']} failed "
        f"({failures}); OK p50 {fmt(bg['latency_ms']['p50'], 2)} ms, "
        f"p99 {fmt(bg['latency_ms']['p99'], 2)} ms. All OK: {'yes' if bg['all_ok'] else 'NO'}.\n\n"
        f"Every answer as expected: {'yes' if verdicts['all_expected'] else 'NO'} · "
        f"every p99 <= {fmt(float(target), 0)} ms: {'yes' if verdicts['all_p99_within_target'] else 'NO'}\n"
    )


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``bad_input.json`` and ``bad_input.md`` into ``out_dir``; their paths."""
    json_path = write_json(Path(out_dir) / "bad_input.json", report)
    md_path = Path(out_dir) / "bad_input.md"
    md_path.write_text(markdown_report(report), encoding="utf-8")
    return json_path, md_path


# --- main ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m perf.bad_input_bench`` parser."""
    parser = argparse.ArgumentParser(prog="python -m perf.bad_input_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed sends per case (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted sends per case first (default 2)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="deadline of each bad request, s (default 5)")
    parser.add_argument("--target-ok-ms", type=float, default=10.0,
                        help="a case passes when its p99 is at most this, ms (default 10)")
    parser.add_argument("--background-concurrency", type=int, default=2,
                        help="closed-loop callers of good requests meanwhile (default 2)")
    parser.add_argument("--background-timeout", type=float, default=10.0,
                        help="deadline of each good request, s (default 10)")
    parser.add_argument(
        "--server-cmd", default=DEFAULT_SERVER_CMD,
        help="command starting an embedding server; {python} and {port} are filled in and the "
        f"token and TLS servers get extra --set items (default: {DEFAULT_SERVER_CMD!r})",
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds to wait for each server's SERVING")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="where bad_input.json / bad_input.md go")
    return parser


def run_meta(args: argparse.Namespace, started_at: str) -> dict[str, Any]:
    """What the run was: when, where, how many sends, which server command."""
    return {
        "started_at": started_at,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(),
                 "python": platform.python_version()},
        "server_command": args.server_cmd,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timeout_s": args.timeout,
        "target_ok_ms": args.target_ok_ms,
        "background_concurrency": args.background_concurrency,
    }


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop servers


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m perf.bad_input_bench``."""
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.background_concurrency < 1:
        print("bad_input_bench: --repeats and --background-concurrency must be >= 1, "
              "--warmup >= 0", file=sys.stderr)
        return 2
    import uvloop

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    log_dir = Path(args.out_dir) / "bad_input_raw"
    log_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    cases = build_cases(token)
    with tempfile.TemporaryDirectory(prefix="bad-input-tls-") as cert_dir:
        with running_servers(args, log_dir, token, Path(cert_dir)) as servers:
            targets = {name: server.target for name, server in servers.items()}
            attempts, tally = uvloop.run(measure(cases, targets, args))
    summaries = [summarize_case(c, attempts[c.key], args.target_ok_ms) for c in cases]
    report = build_report(summaries, summarize_background(tally, args.background_concurrency),
                          run_meta(args, started_at))
    _, md_path = write_report(report, args.out_dir)
    print(md_path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
