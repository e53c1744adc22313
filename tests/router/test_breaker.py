"""The status-aware breaker: the caller's errors never open it, the replica's do."""

from __future__ import annotations

import pytest

from router.breaker import CircuitBreaker, Outcome, State, classify

CALLER_CODES = ["INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
                "UNAUTHENTICATED", "FAILED_PRECONDITION"]


@pytest.mark.parametrize("code", CALLER_CODES)
def test_repeated_caller_errors_never_open_the_breaker(code):
    breaker = CircuitBreaker(consecutive=3, min_calls=5)
    for i in range(1000):
        breaker.record(classify(code), float(i) * 0.001)
        assert breaker.allows(float(i) * 0.001)
    assert breaker.state is State.CLOSED


def test_callers_cancel_is_ignored_but_a_replica_cancel_counts():
    assert classify("CANCELLED", caller_cancelled=True) is Outcome.IGNORED
    assert classify("CANCELLED") is Outcome.FAILURE


def test_deadline_exceeded_counts_only_when_the_replica_had_a_fair_deadline():
    assert classify("DEADLINE_EXCEEDED", fair_deadline=True) is Outcome.FAILURE
    assert classify("DEADLINE_EXCEEDED", fair_deadline=False) is Outcome.IGNORED
    assert classify("DEADLINE_EXCEEDED", reason="DEADLINE_TOO_SHORT") is Outcome.IGNORED


def test_resource_exhausted_is_pushback_and_never_opens():
    breaker = CircuitBreaker(consecutive=2, min_calls=2)
    for i in range(50):
        breaker.record(classify("RESOURCE_EXHAUSTED"), float(i))
    assert breaker.state is State.CLOSED


@pytest.mark.parametrize("code", ["UNAVAILABLE", "INTERNAL"])
def test_consecutive_replica_failures_open_then_half_open_trials_close(code):
    moves = []
    breaker = CircuitBreaker(consecutive=3, open_s=1.0, trials=2,
                             on_transition=lambda a, b: moves.append((a, b)))
    for _ in range(3):
        breaker.record(classify(code), 0.0)
    assert breaker.state is State.OPEN and not breaker.allows(0.5)
    assert breaker.allows(1.0) and breaker.state is State.HALF_OPEN
    breaker.acquire(1.0)
    breaker.acquire(1.0)
    assert not breaker.allows(1.0), "only `trials` calls at once while half-open"
    breaker.record(Outcome.SUCCESS, 1.1)
    breaker.record(Outcome.SUCCESS, 1.1)
    assert breaker.state is State.CLOSED
    assert moves == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN),
                     (State.HALF_OPEN, State.CLOSED)]


def test_a_failed_trial_reopens_for_longer():
    breaker = CircuitBreaker(consecutive=1, open_s=1.0)
    breaker.record(Outcome.FAILURE, 0.0)
    assert breaker.allows(1.0)
    breaker.acquire(1.0)
    breaker.record(Outcome.FAILURE, 1.0)
    assert breaker.state is State.OPEN
    assert not breaker.allows(2.5), "second opening lasts 2 s"
    assert breaker.allows(3.0)


def test_failure_rate_over_the_window_opens_without_a_run():
    breaker = CircuitBreaker(consecutive=100, failure_rate=0.5, min_calls=10, window_s=10)
    for i in range(20):  # alternate: never 2 failures in a row, 50 % failing
        breaker.record(Outcome.FAILURE if i % 2 else Outcome.SUCCESS, i * 0.1)
    assert breaker.state is State.OPEN


def test_old_failures_leave_the_window():
    breaker = CircuitBreaker(consecutive=100, failure_rate=0.5, min_calls=10, window_s=1)
    for i in range(9):
        breaker.record(Outcome.FAILURE, 0.0)
    for i in range(12):
        breaker.record(Outcome.SUCCESS, 5.0)
    breaker.record(Outcome.FAILURE, 5.0)
    assert breaker.state is State.CLOSED
