"""The admission rule (router/admission.py) with a fake clock: no network, no sleeps.

``admit`` is called with ``now=`` a fixed instant and deadlines relative to it, so every
claim here is exact arithmetic on the estimates, not a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from router.admission import (
    AdmissionGate,
    AdmissionPolicy,
    Priority,
    TtftEstimator,
    admit,
)
from router.errors import DeadlineTooShort, Overloaded
from server.engines.generator import (
    GenerationFinal,
    GenerationParams,
    GenerationRequest,
    ModelSpec,
    ServedModel,
    TokenDelta,
)

NOW = 1000.0
POLICY = AdmissionPolicy(max_queue_delay_s=4.0, default_deadline_s=10.0, reserve_s=0.005,
                         low_fraction=0.5)


def decide(wait_s, own_s, deadline_in, priority=Priority.NORMAL, policy=POLICY):
    deadline = None if deadline_in is None else NOW + deadline_in
    return admit("embed", policy, wait_s=wait_s, own_s=own_s, deadline=deadline,
                 priority=priority, now=NOW)


def test_admitted_when_wait_plus_own_fits_the_deadline_less_the_slack():
    assert decide(2.0, 0.1, 10.0).deadline == NOW + 10.0
    # 50 ms left keeps 15 % (7.5 ms) back: 42.5 ms of work fits, 43 does not.
    assert decide(0.0375, 0.005, 0.05).wait_s == 0.0375
    with pytest.raises(Overloaded):
        decide(0.038, 0.005, 0.05)


def test_the_slack_is_a_share_of_what_is_left_between_the_reserve_and_its_cap():
    assert POLICY.slack_s(10.0) == pytest.approx(0.1)    # capped at max_slack_s
    assert POLICY.slack_s(0.2) == pytest.approx(0.03)    # 15 %
    assert POLICY.slack_s(0.02) == pytest.approx(0.005)  # at least the reserve
    with pytest.raises(ValueError):
        AdmissionPolicy(slack_fraction=1.0)


def test_a_50_ms_deadline_behind_2_s_of_work_is_refused_with_when_it_drains():
    with pytest.raises(Overloaded) as info:
        decide(2.0, 0.015, 0.05)
    err = info.value
    assert (err.status, err.reason) == ("RESOURCE_EXHAUSTED", "OVERLOADED")
    # Once 2.0 - (0.0425 - 0.015) s of the work ahead has drained, the same call fits.
    assert err.retry_after_s == pytest.approx(1.9725)
    assert err.metadata == {"estimated_wait_ms": "2000", "budget_ms": "42", "priority": "normal"}
    assert "its deadline" in err.message


def test_the_ceiling_bounds_a_long_deadline():
    decide(3.9, 0.1, 60.0)
    with pytest.raises(Overloaded) as info:
        decide(3.95, 0.1, 60.0)
    assert "4000 ms ceiling" in info.value.message
    assert info.value.retry_after_s == pytest.approx(0.05)
    unbounded = AdmissionPolicy(max_queue_delay_s=0.0)
    decide(30.0, 0.1, 60.0, policy=unbounded)


def test_no_deadline_means_the_default_one():
    admitted = decide(3.0, 0.1, None)
    assert admitted.deadline == NOW + POLICY.default_deadline_s
    short = AdmissionPolicy(max_queue_delay_s=0.0, default_deadline_s=1.0)
    with pytest.raises(Overloaded):
        decide(1.0, 0.1, None, policy=short)


def test_a_passed_deadline_is_deadline_too_short_not_overloaded():
    with pytest.raises(DeadlineTooShort):
        decide(0.0, 0.0, 0.0)
    with pytest.raises(DeadlineTooShort):
        decide(0.0, 0.0, -1.0)


def test_low_is_refused_first_under_the_same_pressure():
    # 2.5 s ahead, 10 s deadline: normal fits the 4 s ceiling, low only while the wait is
    # under half of it.
    decide(2.5, 0.1, 10.0, Priority.NORMAL)
    decide(2.5, 0.1, 10.0, Priority.HIGH)
    with pytest.raises(Overloaded) as info:
        decide(2.5, 0.1, 10.0, Priority.LOW)
    assert info.value.metadata["priority"] == "low"
    assert info.value.retry_after_s == pytest.approx(0.5)
    decide(1.9, 0.1, 10.0, Priority.LOW)
    # With a short deadline the fraction applies to the deadline's budget.
    with pytest.raises(Overloaded):
        decide(0.2, 0.01, 0.305, Priority.LOW)
    decide(0.2, 0.01, 0.305, Priority.NORMAL)


@pytest.mark.parametrize(("text", "want"), [("low", Priority.LOW), (" High ", Priority.HIGH),
                                            ("NORMAL", Priority.NORMAL)])
def test_priority_names(text, want):
    assert Priority.parse(text) is want


def test_unknown_priority_is_a_value_error():
    with pytest.raises(ValueError):
        Priority.parse("urgent")


def test_policy_refuses_nonsense():
    with pytest.raises(ValueError):
        AdmissionPolicy(max_queue_delay_s=-1)
    with pytest.raises(ValueError):
        AdmissionPolicy(low_fraction=0)


# --------------------------------------------------------------------------- generation


def estimator(step_s=0.05, completion=100, prefill_per_token=0.001) -> TtftEstimator:
    est = TtftEstimator()
    est.observe(prompt_tokens=100, completion_tokens=completion,
                prefill_s=100 * prefill_per_token, step_s=step_s)
    return est


def test_ttft_estimate_from_slots_and_rates():
    est = estimator()
    # A free slot: its own prefill + one step.
    assert est.wait_s(running=3, waiting=0, max_running=4) == 0.0
    assert est.own_s(200) == pytest.approx(0.2 + 0.05)
    # Full: a slot frees every 100 tokens x 50 ms / 4 sequences = 1.25 s; third in line.
    assert est.wait_s(running=4, waiting=2, max_running=4) == pytest.approx(3 * 1.25)
    assert TtftEstimator().wait_s(running=4, waiting=9, max_running=4) == 0.0  # unknown


def test_generation_gate_serves_a_burst_that_fits_and_refuses_one_that_cannot():
    gate = AdmissionGate(32, 256, AdmissionPolicy(max_queue_delay_s=30.0))
    gate.ttft = estimator(step_s=0.06, completion=100)  # a slot frees every 0.19 s
    for _ in range(64):  # 64 streams, 30 s deadlines: the 64th waits ~6 s
        gate.acquire(prompt_tokens=20, deadline=NOW + 30.0, now=NOW)
    assert gate.in_flight == 64 and gate.waiting == 32
    assert gate.estimated_ttft_s(20) == pytest.approx(33 * 0.1875 + 0.02 + 0.06)
    # A stream whose deadline cannot cover the estimated time to first token: at once.
    with pytest.raises(Overloaded) as info:
        gate.acquire(prompt_tokens=20, deadline=NOW + 1.0, now=NOW)
    # 1 s left keeps 100 ms back (the slack's cap): the work ahead must drain to 0.82 s.
    assert info.value.retry_after_s == pytest.approx(33 * 0.1875 - (0.9 - 0.08))
    assert gate.in_flight == 64  # nothing taken


def test_generation_gate_hard_bound_holds_whatever_the_deadline():
    gate = AdmissionGate(2, 1)
    for _ in range(3):
        gate.acquire(deadline=NOW + 60, now=NOW)
    with pytest.raises(Overloaded) as info:
        gate.acquire(deadline=NOW + 60, now=NOW)
    assert info.value.metadata["max_waiting"] == "1"
    gate.release()
    gate.acquire(deadline=NOW + 60, now=NOW)


class ScriptedEngine:
    """A Generator that emits ``tokens`` tokens, each after its asyncio.Event is set."""

    def __init__(self, tokens: int = 3) -> None:
        self.tokens = tokens
        self.steps: list[asyncio.Event] = []

    def healthy(self) -> bool:
        return True

    def prompt_token_ids(self, prompt, messages):
        return list(range(len(prompt.split())))

    async def generate(self, request_id, ids, params):
        for i in range(self.tokens):
            step = asyncio.Event()
            self.steps.append(step)
            await step.wait()
            yield TokenDelta(text=f"t{i}", token_ids=(i,))
        yield GenerationFinal("length", len(ids), self.tokens)


async def test_served_model_learns_rates_and_refuses_what_cannot_start_in_time():
    engine = ScriptedEngine(tokens=2)
    model = ServedModel(ModelSpec(name="m", max_running=1, max_waiting=4), engine)
    model.ready = True
    loop = asyncio.get_running_loop()

    async def run(request):
        async with contextlib.aclosing(model.stream(request, loop.time())) as events:
            return [e async for e in events]

    first = asyncio.create_task(run(GenerationRequest("a", prompt="one two three")))
    while not engine.steps:
        await asyncio.sleep(0)
    for _ in range(2):
        engine.steps[-1].set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    events = await first
    assert isinstance(events[-1], GenerationFinal)
    assert model.gate.ttft.known and model.gate.ttft.mean_completion == 2
    assert model.gate.in_flight == 0
    # Teach it slow steps, fill the one slot, and ask with a deadline too short to start.
    model.gate.ttft = estimator(step_s=1.0, completion=10)
    model.gate.in_flight = 1
    with pytest.raises(Overloaded):
        await run(GenerationRequest("b", prompt="hi", params=GenerationParams(),
                                    deadline=time.monotonic() + 0.5))
    assert model.gate.in_flight == 1 and len(engine.steps) == 2  # the engine saw nothing


def test_an_idle_hop_runs_a_large_request_whatever_its_estimate():
    # 16 s of its own work (a bulk ingest batch) with nothing ahead: admitted, even past
    # the ceiling and the deadline (dropped at the deadline if it really runs that long).
    assert decide(0.0, 16.0, 10.0).own_s == 16.0
    with pytest.raises(Overloaded):
        decide(0.001, 16.0, 10.0)  # anything ahead: the rule applies
