"""perf.loadgen against real in-process gRPC servers: counting, the cap, both modes."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from perf.loadgen import LoadConfig, LoadRun, build_parser, config_from_args, run_scenario
from perf.scenarios import SCENARIOS, BadResponse

RESULT_KEYS = {
    "scenario", "mode", "target_rate_rps", "concurrency", "max_inflight", "duration_s",
    "throughput_rps", "items_per_s", "latency_ms", "errors_by_status", "counts", "server",
    "elapsed_s", "schedule_lag_ms", "max_inflight_observed",
}


async def test_open_loop_low_rate_answers_everything(echo_target: str) -> None:
    config = LoadConfig(
        target=echo_target, mode="open", rate=40, duration=1.0, warmup=0.2, progress=False
    )
    result = await run_scenario(config, SCENARIOS["echo"])
    assert RESULT_KEYS <= result.keys()
    counts = result["counts"]
    assert result["errors_by_status"] == {}
    assert counts["dropped_by_client"] == 0
    assert counts["ok"] == counts["issued"] == counts["arrivals"]
    # Poisson with mean 40 in the 1 s window: far outside [10, 90] would mean a broken clock.
    assert 10 <= counts["arrivals"] <= 90
    lat = result["latency_ms"]
    assert lat["count"] == counts["ok"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert result["throughput_rps"] == pytest.approx(counts["ok"] / result["elapsed_s"], rel=1e-3)
    assert result["scenario"] == "echo" and result["mode"] == "open"
    assert result["scenario_options"] == {"payload_bytes": 512}


async def test_cap_counts_arrivals_beyond_it_as_dropped(hanging_target: str) -> None:
    async with grpc.aio.insecure_channel(hanging_target) as channel:
        hang = channel.unary_unary("/perf.Hang/Hang")

        async def call(timeout: float) -> None:
            await hang(b"x", timeout=timeout)

        config = LoadConfig(
            target=hanging_target, mode="open", rate=200, max_inflight=2,
            duration=1.0, warmup=0.0, timeout=0.3, progress=False,
        )
        result = await LoadRun(config, call).run("hang")
    counts = result["counts"]
    assert result["max_inflight_observed"] == 2
    assert counts["dropped_by_client"] > 0
    # Nothing lost: every arrival was either sent or counted as dropped ...
    assert counts["issued"] + counts["dropped_by_client"] == counts["arrivals"]
    # ... and every sent request ended with a status.
    assert counts["ok"] == 0
    assert result["errors_by_status"] == {"DEADLINE_EXCEEDED": counts["issued"]}
    assert counts["issued"] >= 2


async def test_closed_loop_keeps_exactly_n_callers_busy(echo_target: str) -> None:
    config = LoadConfig(
        target=echo_target, mode="closed", concurrency=4, duration=0.5, warmup=0.1, progress=False
    )
    result = await run_scenario(config, SCENARIOS["echo"])
    assert result["max_inflight_observed"] == 4
    assert result["errors_by_status"] == {}
    assert result["counts"]["ok"] == result["counts"]["issued"] > 4
    assert result["concurrency"] == 4 and result["target_rate_rps"] is None


async def test_bad_answers_and_client_exceptions_are_counted_not_lost() -> None:
    outcomes = itertools.cycle([None, BadResponse("short"), RuntimeError("boom")])

    async def call(timeout: float) -> None:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    config = LoadConfig(target="unused", mode="closed", concurrency=1, duration=0.05, warmup=0, progress=False)
    result = await LoadRun(config, call).run("synthetic")
    statuses = result["errors_by_status"]
    assert set(statuses) == {"BAD_RESPONSE", "CLIENT_ERROR"}
    assert result["counts"]["ok"] + sum(statuses.values()) == result["counts"]["issued"]
    assert list(result["client_errors"]) == ["RuntimeError: boom"]
    assert result["counts"]["issued"] >= 3


def test_cli_mode_flags() -> None:
    parser = build_parser()
    closed = config_from_args(parser.parse_args(["embed", "--concurrency", "64", "--texts-per-request", "2"]))
    assert closed.mode == "closed" and closed.concurrency == 64 and closed.max_inflight == 64
    opened = config_from_args(parser.parse_args(["echo", "--rate", "12.5", "--max-inflight", "7"]))
    assert opened.mode == "open" and opened.rate == 12.5 and opened.max_inflight == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["echo", "--rate", "1", "--concurrency", "2"])
    with pytest.raises(ValueError):
        LoadConfig(target="x", mode="open", rate=0).validate()


async def test_closed_loop_counts_answers_inside_the_window(serve) -> None:
    # Each answer takes 0.4 s; window [0.2 s, 0.6 s): both callers' first answers (at ~0.4 s)
    # fall inside it, their second ones (at ~0.8 s) after it.
    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(0.4)  # the server's service time, not synchronisation
        return request

    handler = grpc.method_handlers_generic_handler("perf.Slow", {"Slow": grpc.unary_unary_rpc_method_handler(slow)})
    target = await serve(lambda server: server.add_generic_rpc_handlers((handler,)))
    async with grpc.aio.insecure_channel(target) as channel:
        method = channel.unary_unary("/perf.Slow/Slow")

        async def call(timeout: float) -> None:
            await method(b"x", timeout=timeout)

        config = LoadConfig(target=target, mode="closed", concurrency=2, duration=0.4, warmup=0.2, progress=False)
        result = await LoadRun(config, call).run("slow")
    assert result["counts"]["ok"] == 2
    assert result["counts"]["completed_after_window"] == 2
    assert result["throughput_rps"] == pytest.approx(2 / 0.4)
    assert 390 <= result["latency_ms"]["p50"] < 600


@pytest.fixture
async def refusing_target():
    """A server refusing every call with RESOURCE_EXHAUSTED and 50 ms of pushback."""
    from server.errors import Overloaded
    from server.interceptors import STATUS_DETAILS_KEY, rich_status

    async def refuse(request, context):
        code, details = rich_status(Overloaded("full", retry_after_s=0.05))
        await context.abort(code, "full", trailing_metadata=((STATUS_DETAILS_KEY, details),))

    handler = grpc.method_handlers_generic_handler(
        "perf.Refuse", {"Refuse": grpc.unary_unary_rpc_method_handler(refuse)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.mark.parametrize("honor", [True, False])
async def test_closed_loop_callers_back_off_on_pushback(refusing_target: str, honor: bool) -> None:
    async with grpc.aio.insecure_channel(refusing_target) as channel:
        refuse = channel.unary_unary("/perf.Refuse/Refuse")

        async def call(timeout: float) -> None:
            await refuse(b"x", timeout=timeout)

        config = LoadConfig(
            target=refusing_target, mode="closed", concurrency=1, duration=1.0, warmup=0.0,
            progress=False, honor_pushback=honor,
        )
        result = await LoadRun(config, call).run("refuse")
    issued = result["counts"]["issued"]
    assert result["errors_by_status"] == {"RESOURCE_EXHAUSTED": issued}
    if honor:  # 50 ms after each refusal, as told: about 20 in one second
        assert 10 <= issued <= 21
    else:  # back to back: a refusal storm
        assert issued >= 50
