"""How long a batch takes, learnt from the batches that ran: ``seconds = fixed + per_token * padded``.

The batcher uses it to estimate how long queued work will wait (admission and pushback)
and when the running batch will end. One proportional cost per token misjudges both ends
on a CPU: a lone short text pays a fixed cost per call (Python dispatch, thread wake-ups,
tokenisation) that a batch shares, so a per-token cost learnt from small batches
overstates big ones and the other way round. An affine fit over recent batches of
different sizes separates the two.

No grpc imports: policy, unit-tested without a network.
"""

from __future__ import annotations

from collections import deque

import numpy as np

# Batches remembered for the fit.
WINDOW = 128
# Samples needed before the affine fit is trusted; fewer give the proportional estimate.
MIN_FIT_SAMPLES = 8
# The fit needs batches of different sizes: largest padded / smallest at least this.
MIN_SPREAD = 1.5


class BatchCostModel:
    """Online estimate of a batch's compute time from its padded token count."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.fixed_s = 0.0
        self.per_token_s = 0.0

    @property
    def known(self) -> bool:
        """True once at least one batch has been measured."""
        return bool(self._samples)

    def observe(self, padded_tokens: int, seconds: float) -> None:
        """Record one batch: its padded tokens (rows x longest row) and compute time."""
        if padded_tokens <= 0 or seconds <= 0:
            return
        self._samples.append((padded_tokens, seconds))
        self._refit()

    def predict_s(self, padded_tokens: int, batches: int = 1) -> float:
        """Seconds to run ``padded_tokens`` in ``batches`` calls; 0 while nothing is known."""
        if not self.known or padded_tokens <= 0:
            return 0.0
        return max(0, batches) * self.fixed_s + padded_tokens * self.per_token_s

    def _refit(self) -> None:
        tokens = np.fromiter((s[0] for s in self._samples), dtype=np.float64)
        seconds = np.fromiter((s[1] for s in self._samples), dtype=np.float64)
        proportional = float(np.median(seconds / tokens))
        if len(tokens) < MIN_FIT_SAMPLES or tokens.max() < MIN_SPREAD * tokens.min():
            self.fixed_s, self.per_token_s = 0.0, proportional
            return
        slope, intercept = np.polyfit(tokens, seconds, 1)
        if slope <= 0:  # noise swamped the size effect: keep the proportional estimate
            self.fixed_s, self.per_token_s = 0.0, proportional
            return
        # A call cannot cost less than nothing, nor more than the cheapest call measured.
        fixed = float(min(max(intercept, 0.0), seconds.min()))
        # Refit the slope through the clamped intercept so the line still meets the data.
        per_token = float(np.sum((seconds - fixed) * tokens) / np.sum(tokens * tokens))
        self.fixed_s, self.per_token_s = fixed, max(per_token, 0.0)
