"""Status-aware circuit breaker per replica.

What counts is the replica's fault, not the caller's: bad input (INVALID_ARGUMENT,
NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION), refused credentials (PERMISSION_DENIED,
UNAUTHENTICATED) and the caller's own CANCELLED never count, so a client sending bad
requests cannot open every breaker of a fleet. UNAVAILABLE, INTERNAL, UNKNOWN and a
DEADLINE_EXCEEDED the replica caused (it had a fair share of the deadline) count.
RESOURCE_EXHAUSTED is pushback: it lowers the replica's weight and honours its RetryInfo
(see ``Endpoint.push_back``) but never opens the breaker.

States: CLOSED -> OPEN on ``consecutive`` failures in a row or a failure rate of at least
``failure_rate`` over the last ``window_s`` (with ``min_calls`` calls in it); OPEN ->
HALF_OPEN after ``open_s``; HALF_OPEN lets ``trials`` calls through at once: all
succeeding closes it, any failing opens it again. No grpc imports, no clock of its own.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How one finished attempt counts for the breaker."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"  # the caller's doing (bad input, cancel): says nothing of the replica
    PUSHBACK = "pushback"  # RESOURCE_EXHAUSTED: lower weight, do not open


class State(enum.Enum):
    """Breaker states (named as in BreakerState of router_service.proto)."""

    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


NEVER_COUNT = frozenset({
    "OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION",
    "PERMISSION_DENIED", "UNAUTHENTICATED", "OUT_OF_RANGE", "UNIMPLEMENTED", "ABORTED",
})
REPLICA_FAULTS = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DATA_LOSS"})


def classify(code: str, *, caller_cancelled: bool = False, fair_deadline: bool = True,
             reason: str | None = None) -> Outcome:
    """The breaker outcome of an attempt that ended with status ``code`` (a
    ``grpc.StatusCode`` name). ``caller_cancelled``: the caller (or a winning hedge) ended
    it. ``fair_deadline``: the attempt had at least the replica's usual latency to answer,
    so a DEADLINE_EXCEEDED is the replica's fault. ``reason``: the ErrorInfo reason (a
    replica refusing a too-short deadline up front, DEADLINE_TOO_SHORT, is not a fault)."""
    if code == "OK":
        return Outcome.SUCCESS
    if code == "CANCELLED":
        return Outcome.IGNORED if caller_cancelled else Outcome.FAILURE
    if code == "RESOURCE_EXHAUSTED":
        return Outcome.PUSHBACK
    if code == "DEADLINE_EXCEEDED":
        if caller_cancelled or not fair_deadline or reason == "DEADLINE_TOO_SHORT":
            return Outcome.IGNORED
        return Outcome.FAILURE
    if code in REPLICA_FAULTS:
        return Outcome.FAILURE
    return Outcome.IGNORED  # NEVER_COUNT and anything unknown to this table


class CircuitBreaker:
    """One replica's breaker. ``allows(now)`` before picking, ``acquire(now)`` when a call
    is sent (counts half-open trials), ``record(outcome, now)`` when it ends."""

    def __init__(
        self,
        *,
        consecutive: int = 5,
        failure_rate: float = 0.5,
        window_s: float = 10.0,
        min_calls: int = 20,
        open_s: float = 1.0,
        max_open_s: float = 30.0,
        trials: int = 2,
        on_transition: Callable[[State, State], None] | None = None,
    ) -> None:
        self.consecutive = consecutive
        self.failure_rate = failure_rate
        self.window_s = window_s
        self.min_calls = min_calls
        self.open_s = open_s
        self.max_open_s = max_open_s
        self.trials = trials
        self.on_transition = on_transition
        self.state = State.CLOSED
        self.opened = 0  # times opened since the last full close: the cool-down doubles
        self._run = 0  # consecutive failures
        self._window: deque[tuple[float, bool]] = deque()  # (when, failed)
        self._open_until = 0.0
        self._trials_out = 0
        self._trial_successes = 0

    def allows(self, now: float) -> bool:
        """True when a call may be sent to the replica now (OPEN turns HALF_OPEN once its
        cool-down is over; HALF_OPEN allows ``trials`` calls at once)."""
        if self.state is State.OPEN:
            if now < self._open_until:
                return False
            self._move(State.HALF_OPEN)
            self._trials_out = self._trial_successes = 0
        if self.state is State.HALF_OPEN:
            return self._trials_out < self.trials
        return True

    def acquire(self, now: float) -> None:
        """A call is being sent (after ``allows``): in HALF_OPEN it is a trial."""
        if self.state is State.HALF_OPEN:
            self._trials_out += 1

    def record(self, outcome: Outcome, now: float) -> None:
        """Count one finished call."""
        if self.state is State.HALF_OPEN and outcome is not Outcome.IGNORED:
            self._trials_out = max(0, self._trials_out - 1)
            if outcome is Outcome.FAILURE:
                self._open(now)
                return
            if outcome is Outcome.SUCCESS:
                self._trial_successes += 1
                if self._trial_successes >= self.trials:
                    self.opened = 0
                    self._run = 0
                    self._window.clear()
                    self._move(State.CLOSED)
            return
        if self.state is State.HALF_OPEN:
            self._trials_out = max(0, self._trials_out - 1)
            return
        if outcome is Outcome.IGNORED or outcome is Outcome.PUSHBACK:
            return
        failed = outcome is Outcome.FAILURE
        self._window.append((now, failed))
        while self._window and self._window[0][0] < now - self.window_s:
            self._window.popleft()
        self._run = self._run + 1 if failed else 0
        if self.state is not State.CLOSED or not failed:
            return
        if self._run >= self.consecutive:
            self._open(now)
            return
        if len(self._window) >= self.min_calls:
            rate = sum(f for _, f in self._window) / len(self._window)
            if rate >= self.failure_rate:
                self._open(now)

    def _open(self, now: float) -> None:
        cool = min(self.max_open_s, self.open_s * (2 ** self.opened))
        self.opened += 1
        self._open_until = now + cool
        self._run = 0
        self._window.clear()
        self._move(State.OPEN)

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        if old is not new:
            log.info("breaker %s -> %s", old.value, new.value)
            if self.on_transition is not None:
                self.on_transition(old, new)
