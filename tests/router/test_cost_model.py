"""The batch cost model: an affine fit that separates per-call from per-token cost."""

from __future__ import annotations

import random

import pytest

from router.cost_model import MIN_FIT_SAMPLES, BatchCostModel


def test_unknown_until_a_batch_is_observed():
    model = BatchCostModel()
    assert not model.known
    assert model.predict_s(1000) == 0.0
    model.observe(0, 1.0)  # nonsense samples are ignored
    model.observe(100, 0.0)
    assert not model.known


def test_few_or_same_size_batches_give_a_proportional_estimate():
    model = BatchCostModel()
    for _ in range(3):
        model.observe(100, 0.02)
    assert model.fixed_s == 0.0
    assert model.predict_s(200) == pytest.approx(0.04)


def test_batches_of_different_sizes_separate_fixed_and_per_token_cost():
    """A CPU encoder: 10 ms per call plus 0.15 ms per padded token, with 5 % noise."""
    rng = random.Random(7)
    model = BatchCostModel()
    for _ in range(60):
        padded = rng.choice([60, 120, 250, 500, 800])
        model.observe(padded, (0.010 + 0.00015 * padded) * rng.uniform(0.95, 1.05))
    assert model.fixed_s == pytest.approx(0.010, abs=0.003)
    assert model.per_token_s == pytest.approx(0.00015, rel=0.1)
    # One batch of 80 tokens vs the same tokens split into four calls.
    assert model.predict_s(80) == pytest.approx(0.022, rel=0.15)
    assert model.predict_s(320, batches=4) > model.predict_s(320, batches=1)
    # A proportional model would have called 80 tokens 80/500 of a 500-token batch.
    assert model.predict_s(80) > 80 / 500 * model.predict_s(500) * 1.3


def test_clamps_keep_the_fit_physical():
    """Noise that suggests a negative fixed cost cannot make small batches free."""
    model = BatchCostModel()
    for padded in [100, 200, 300, 400] * MIN_FIT_SAMPLES:
        model.observe(padded, 0.0001 * padded - 0.002 if padded > 100 else 0.008)
    assert model.fixed_s >= 0.0
    assert model.per_token_s > 0.0
    assert model.predict_s(100) > 0.0


def test_window_forgets_old_batches():
    model = BatchCostModel(window=16)
    for _ in range(16):
        model.observe(100, 1.0)  # a slow period (another process had the cores)
    for _ in range(16):
        model.observe(100, 0.01)
    assert model.predict_s(100) == pytest.approx(0.01)


def test_sliding_window_fit_equals_a_fresh_fit_of_the_window():
    """The running sums forget evicted batches exactly."""
    rng = random.Random(3)
    samples = [(p, (0.004 + 0.0002 * p) * rng.uniform(0.8, 1.2))
               for p in (rng.randint(20, 400) for _ in range(100))]
    sliding = BatchCostModel(window=16)
    for padded, seconds in samples:
        sliding.observe(padded, seconds)
    fresh = BatchCostModel(window=16)
    for padded, seconds in samples[-16:]:
        fresh.observe(padded, seconds)
    assert sliding.fixed_s == pytest.approx(fresh.fixed_s, rel=1e-9, abs=1e-12)
    assert sliding.per_token_s == pytest.approx(fresh.per_token_s, rel=1e-9)
    assert sliding.fixed_s > 0
