"""The retry budget: retries <= floor + ratio x requests, whatever happens."""

from __future__ import annotations

from hypothesis import given, strategies as st

from router.retry_budget import RetryBudget


@given(st.lists(st.booleans(), max_size=500), st.floats(0, 1), st.integers(0, 20))
def test_granted_retries_never_exceed_the_budget(events, ratio, floor):
    budget = RetryBudget(ratio=ratio, floor=floor)
    for is_request in events:
        if is_request:
            budget.on_request()
        else:
            budget.try_acquire()
    assert budget.granted <= floor + ratio * budget.requests + 1e-9


def test_floor_then_ratio():
    budget = RetryBudget(ratio=0.2, floor=2)
    assert budget.try_acquire() and budget.try_acquire()
    assert not budget.try_acquire()
    for _ in range(5):
        budget.on_request()
    assert budget.try_acquire() and not budget.try_acquire()
