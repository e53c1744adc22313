"""How long a batch takes, learnt from the batches that ran: ``seconds = fixed + per_token * padded``.

The batcher uses it to estimate how long queued work will wait (admission and pushback)
and when the running batch will end. One proportional cost per token misjudges both ends
on a CPU: a lone short text pays a fixed cost per call (Python dispatch, thread wake-ups,
tokenisation) that a batch shares, so a per-token cost learnt from small batches
overstates big ones and the other way round. An affine fit over recent batches of
different sizes separates the two.

The fit runs after every batch on the event loop, so it keeps running sums over the
window (O(1) per batch) instead of re-solving a least-squares problem over every sample.

No grpc imports: policy, unit-tested without a network.
"""

from __future__ import annotations

import statistics
from collections import deque

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
        # Running sums over the window: tokens, seconds, tokens^2, tokens*seconds.
        self._sums = [0.0, 0.0, 0.0, 0.0]
        self._observed = 0
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
        if len(self._samples) == self._samples.maxlen:
            self._add(*self._samples[0], sign=-1.0)
        self._samples.append((padded_tokens, seconds))
        self._add(padded_tokens, seconds, sign=1.0)
        self._observed += 1
        if self._observed % self._samples.maxlen == 0:  # shed the updates' rounding
            self._sums = [0.0, 0.0, 0.0, 0.0]
            for tokens, secs in self._samples:
                self._add(tokens, secs, sign=1.0)
        self._refit()

    def predict_s(self, padded_tokens: int, batches: int = 1) -> float:
        """Seconds to run ``padded_tokens`` in ``batches`` calls; 0 while nothing is known."""
        if not self.known or padded_tokens <= 0:
            return 0.0
        return max(0, batches) * self.fixed_s + padded_tokens * self.per_token_s

    def _add(self, tokens: float, seconds: float, sign: float) -> None:
        sums = self._sums
        sums[0] += sign * tokens
        sums[1] += sign * seconds
        sums[2] += sign * tokens * tokens
        sums[3] += sign * tokens * seconds

    def _proportional(self) -> None:
        self.fixed_s = 0.0
        self.per_token_s = statistics.median(s / t for t, s in self._samples)

    def _refit(self) -> None:
        n = len(self._samples)
        if n < MIN_FIT_SAMPLES:
            self._proportional()
            return
        lo = min(t for t, _ in self._samples)
        if max(t for t, _ in self._samples) < MIN_SPREAD * lo:
            self._proportional()
            return
        st, ss, stt, sts = self._sums
        spread = n * stt - st * st
        slope = (n * sts - st * ss) / spread if spread > 0 else 0.0
        if slope <= 0:  # noise swamped the size effect: keep the proportional estimate
            self._proportional()
            return
        intercept = (ss - slope * st) / n
        # A call cannot cost less than nothing, nor more than the cheapest call measured.
        fixed = min(max(intercept, 0.0), min(s for _, s in self._samples))
        # Refit the slope through the clamped intercept so the line still meets the data.
        self.fixed_s, self.per_token_s = fixed, max((sts - fixed * st) / stt, 0.0)
