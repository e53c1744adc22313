"""One service's replicas and the policy that runs a call on them: admission (bounded in
flight, hopeless deadlines refused up front), picking, breaker and outlier bookkeeping,
retries within the budget and hedging.

The forwarding layer gives ``ReplicaSet.run`` an ``attempt(endpoint, timeout_s)``
coroutine that sends the call to one replica and raises ``AttemptError`` (a status code
name, ErrorInfo reason, RetryInfo pushback) when the replica answers with an error.
Retries and hedges go to a replica not tried yet, only when ``replay`` allows it (an
idempotent RPC, or a stream before its first message), only on replica-side failures,
after a jittered backoff, within the retry budget and within the caller's deadline. The
first successful attempt wins; every other is cancelled. No grpc imports.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from router.balancer import Balancer
from router.breaker import CircuitBreaker, Outcome, classify
from router.deadlines import forward_timeout_s, remaining_s
from router.endpoints import Endpoint
from router.errors import DeadlineTooShort, Overloaded, Unavailable
from router.hedging import HedgePolicy
from router.outlier import OutlierDetector
from router.retry_budget import RetryBudget

log = logging.getLogger(__name__)

#: Codes a retry on another replica may fix (RESOURCE_EXHAUSTED only when its pushback
#: fits the deadline).
RETRYABLE = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "RESOURCE_EXHAUSTED"})
OUTLIER_PERIOD_S = 0.05


class AttemptError(Exception):
    """One attempt's error answer: what the router judges, plus the original (``cause``)
    that is relayed to the caller when no retry fixes it."""

    def __init__(self, code: str, *, reason: str | None = None,
                 retry_after_s: float | None = None, cause: Any = None) -> None:
        super().__init__(f"{code} {reason or ''}".strip())
        self.code = code
        self.reason = reason or ""
        self.retry_after_s = retry_after_s
        self.cause = cause


@dataclass
class Win:
    """The attempt that won: its value, and for a kept-open stream the bookkeeping
    ``ReplicaSet.finish_stream`` must close."""

    value: Any
    endpoint: Endpoint
    token: int
    units: int
    attempts: int


@dataclass(frozen=True)
class Limits:
    """Per-service admission and retry settings."""

    max_in_flight: int = 256
    max_attempts: int = 3
    reserve_s: float = 0.005
    default_timeout_s: float = 30.0
    backoff_s: float = 0.002
    max_backoff_s: float = 0.05
    overload_retry_after_s: float = 0.05


class ReplicaSet:
    """The replicas of one service and the policy objects shared by its calls."""

    def __init__(
        self,
        service: str,
        *,
        balancer: Balancer | None = None,
        budget: RetryBudget | None = None,
        hedge: HedgePolicy | None = None,
        outlier: OutlierDetector | None = None,
        limits: Limits = Limits(),
        breaker_factory: Callable[[], CircuitBreaker] = CircuitBreaker,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.service = service
        self.balancer = balancer or Balancer()
        self.budget = budget or RetryBudget()
        self.hedge = hedge or HedgePolicy()
        self.outlier = outlier or OutlierDetector()
        self.limits = limits
        self.breaker_factory = breaker_factory
        self.clock = clock
        self.rng = rng or random.Random()
        self.endpoints: dict[str, Endpoint] = {}
        self.in_flight = 0
        self.refused = 0
        self._outlier_at = 0.0
        #: Hooks for metrics: (endpoint, code, seconds) per finished attempt;
        #: (endpoint, "retry" | "hedge") per extra attempt.
        self.on_attempt: Callable[[Endpoint, str, float], None] | None = None
        self.on_retry: Callable[[Endpoint, str], None] | None = None

    # -- membership ----------------------------------------------------------------
    def add(self, address: str) -> Endpoint:
        """The endpoint for ``address``, created (health unknown) when new."""
        ep = self.endpoints.get(address)
        if ep is None:
            ep = Endpoint(self.service, address, self.breaker_factory())
            self.endpoints[address] = ep
        ep.active = True
        return ep

    def remove(self, address: str) -> Endpoint | None:
        """Take ``address`` out (calls in flight on it finish); returns it."""
        ep = self.endpoints.pop(address, None)
        if ep is not None:
            ep.active = False
        return ep

    def healthy(self) -> list[Endpoint]:
        """Active replicas whose health check says SERVING."""
        return [ep for ep in self.endpoints.values() if ep.active and ep.healthy is True]

    def candidates(self, now: float, exclude: Sequence[Endpoint] = ()) -> list[Endpoint]:
        """Replicas the balancer may pick now, not in ``exclude``; when ejections and
        pushback leave none, every healthy replica whose breaker allows a call."""
        eps = [ep for ep in self.endpoints.values() if ep not in exclude]
        live = [ep for ep in eps if ep.in_rotation(now)]
        return live or [ep for ep in eps if ep.usable(now)]

    # -- one call ------------------------------------------------------------------
    def admit(self, deadline: float | None, units: int) -> list[Endpoint]:
        """Refuse before any forwarding: over the in-flight bound (OVERLOADED with
        pushback), no healthy replica (UNAVAILABLE / CIRCUIT_OPEN), or a deadline no
        replica's estimate can meet (DEADLINE_TOO_SHORT). Returns the candidates."""
        if self.in_flight >= self.limits.max_in_flight:
            self.refused += 1
            raise Overloaded(f"router: {self.in_flight} calls to {self.service} in flight",
                             retry_after_s=self.limits.overload_retry_after_s)
        now = self.clock()
        cands = self.candidates(now)
        if not cands:
            healthy = self.healthy()
            self.refused += 1
            if healthy:
                raise Unavailable(f"router: every breaker of {self.service} is open",
                                  reason="CIRCUIT_OPEN")
            raise Unavailable(f"router: no healthy replica of {self.service}")
        left = remaining_s(deadline, now=now)
        estimate = self.balancer.estimate_s(cands, units)
        if left is not None and (left <= 0 or (estimate is not None and left < estimate)):
            self.refused += 1
            raise DeadlineTooShort(
                f"router: {max(0.0, left) * 1e3:.1f} ms left, the fastest replica of "
                f"{self.service} needs ~{(estimate or 0) * 1e3:.1f} ms",
                metadata={"estimate_ms": f"{(estimate or 0) * 1e3:.1f}"})
        return cands

    async def run(
        self,
        attempt: Callable[[Endpoint, float | None], Awaitable[Any]],
        *,
        deadline: float | None,
        units: int = 1,
        replay: bool = False,
        hedge: bool = False,
        first_message: bool = False,
        keep_open: bool = False,
        discard: Callable[[Any], None] | None = None,
    ) -> Win:
        """Run the call (see the module doc). ``first_message``: the attempt returns once
        a stream's first message came (its latency is a time to first message);
        ``keep_open``: the winner stays counted in flight until ``finish_stream``;
        ``discard``: called with the value of an attempt that succeeded too but lost
        the race (to close its stream)."""
        cands = self.admit(deadline, units)
        self.budget.on_request()
        self.in_flight += 1
        if deadline is None:
            deadline = self.clock() + self.limits.default_timeout_s
        first = self.balancer.pick(cands, units, self.clock())
        assert first is not None  # admit saw candidates
        if not self._hedge_armed(hedge and replay, first_message):
            return await self._run_serial(attempt, first, deadline, units, replay,
                                          first_message=first_message, keep_open=keep_open)
        tried: list[Endpoint] = []
        running: dict[asyncio.Task, tuple[Endpoint, int, float | None]] = {}

        def launch(ep: Endpoint) -> None:
            now = self.clock()
            timeout = forward_timeout_s(deadline, reserve_s=self.limits.reserve_s, now=now)
            ep.breaker.acquire(now)
            token = ep.start(now)
            tried.append(ep)
            running[asyncio.ensure_future(attempt(ep, timeout))] = (ep, token, timeout)

        launch(first)
        hedged = False  # armed: _hedge_armed said so
        started = self.clock()
        last: BaseException | None = None
        won = False
        try:
            while running:
                timeout = None
                if not hedged:
                    delay = self.hedge.delay_s(self.healthy, started, first=first_message)
                    if delay is None:
                        hedged = True
                    else:
                        timeout = max(0.0, started + delay - self.clock())
                done, _ = await asyncio.wait(running, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    hedged = True
                    self._check_outliers(force=True)
                    other = self._another(tried, units)
                    if other is not None and self.budget.try_acquire():
                        other.hedges += 1
                        if self.on_retry is not None:
                            self.on_retry(other, "hedge")
                        launch(other)
                    continue
                for task in done:
                    ep, token, given = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        win = Win(task.result(), ep, token, units, len(tried))
                        won = True
                        self._settle(ep, token, units, None, given, keep_open=keep_open,
                                     first_message=first_message)
                        if running:  # a race won: judge the losers by their calls' age now,
                            self._check_outliers(force=True)  # before they are cancelled
                        return win
                    self._settle(ep, token, units, exc, given)
                    last = exc
                if running:
                    continue  # a hedge is still out: it may still win
                retry_after = self._retry_delay(last, len(tried), deadline, replay)
                if retry_after is None:
                    break
                other = self._another(tried, units)
                if other is None or not self.budget.try_acquire():
                    break
                other.retries += 1
                if self.on_retry is not None:
                    self.on_retry(other, "retry")
                await asyncio.sleep(retry_after)
                launch(other)
            assert last is not None
            raise last
        finally:
            for task, (ep, token, _given) in running.items():
                if task.done() and not task.cancelled() and task.exception() is None:
                    if discard is not None:
                        discard(task.result())
                task.cancel()
                # a cancelled loser: its time so far is a (censored) latency sample. The
                # first attempt outrun by a hedge went unanswered past the hedge delay and
                # a whole other call: evidence of a hang. A hedge that lost is not (its
                # replica was merely not first), nor is a caller who left.
                ep.finish(token, self.clock(), units=units, sample=True,
                          answered=False if won and ep is tried[0] else None)
                ep.breaker.record(Outcome.IGNORED, self.clock())
            if not (keep_open and won):
                self.in_flight -= 1

    def finish_stream(self, win: Win, error: BaseException | None, *, caller_cancelled: bool) -> None:
        """Close the bookkeeping of a kept-open stream once it ended."""
        self.in_flight -= 1
        now = self.clock()
        win.endpoint.finish(win.token, now, units=win.units, ok=error is None, sample=False)
        if isinstance(error, AttemptError):
            win.endpoint.breaker.record(
                classify(error.code, caller_cancelled=caller_cancelled, reason=error.reason), now)
        # success was recorded at the first message

    # -- internals -----------------------------------------------------------------
    def _hedge_armed(self, hedgeable: bool, first_message: bool) -> bool:
        """True when this call may be hedged: a hedgeable call, hedging on, a delay
        known, and another replica to send the hedge to."""
        return (hedgeable and self.hedge.enabled and len(self.endpoints) > 1
                and self.hedge.delay_s(self.healthy, self.clock(), first=first_message) is not None)

    async def _run_serial(self, attempt, ep: Endpoint, deadline: float, units: int,  # noqa: ANN001
                          replay: bool, *, first_message: bool, keep_open: bool) -> Win:
        """``run`` without a hedge: one attempt at a time, awaited in the caller's own
        task (no task, no wait set per attempt); the same admission, settling, retry
        and budget rules as the hedged path. ``in_flight`` was counted by ``run``."""
        tried: list[Endpoint] = []
        won = False
        try:
            while True:
                now = self.clock()
                given = forward_timeout_s(deadline, reserve_s=self.limits.reserve_s, now=now)
                ep.breaker.acquire(now)
                token = ep.start(now)
                tried.append(ep)
                try:
                    value = await attempt(ep, given)
                except asyncio.CancelledError:
                    # the caller left: a censored latency sample, not the replica's fault
                    ep.finish(token, self.clock(), units=units, sample=True, answered=None)
                    ep.breaker.record(Outcome.IGNORED, self.clock())
                    raise
                except Exception as exc:  # noqa: BLE001 - judged below, re-raised when final
                    self._settle(ep, token, units, exc, given)
                    retry_after = self._retry_delay(exc, len(tried), deadline, replay)
                    other = self._another(tried, units) if retry_after is not None else None
                    if other is None or not self.budget.try_acquire():
                        raise
                    other.retries += 1
                    if self.on_retry is not None:
                        self.on_retry(other, "retry")
                    await asyncio.sleep(retry_after)
                    ep = other
                    continue
                won = True
                self._settle(ep, token, units, None, given, keep_open=keep_open,
                             first_message=first_message)
                return Win(value, ep, token, units, len(tried))
        finally:
            if not (keep_open and won):
                self.in_flight -= 1

    def _another(self, tried: list[Endpoint], units: int) -> Endpoint | None:
        now = self.clock()
        cands = [ep for ep in self.candidates(now, exclude=tried)]
        return self.balancer.pick(cands, units, now)

    def _retry_delay(self, exc: BaseException | None, attempts: int, deadline: float,
                     replay: bool) -> float | None:
        """Backoff before a retry, or None when this error is not retried."""
        if not replay or not isinstance(exc, AttemptError) or exc.code not in RETRYABLE:
            return None
        if attempts >= self.limits.max_attempts:
            return None
        backoff = min(self.limits.max_backoff_s, self.limits.backoff_s * 2 ** (attempts - 1))
        delay = self.rng.uniform(0, backoff)  # full jitter
        if exc.code == "RESOURCE_EXHAUSTED":
            delay = max(delay, exc.retry_after_s or 0.0)
        left = remaining_s(deadline, now=self.clock())
        if left is not None and delay + self.limits.reserve_s >= left:
            return None
        return delay

    def _settle(self, ep: Endpoint, token: int, units: int, exc: BaseException | None,
                given: float | None, *, keep_open: bool = False,
                first_message: bool = False) -> None:
        now = self.clock()
        elapsed = now - ep._started.get(token, now)
        if exc is None:
            if keep_open:  # a stream's first message: its latency is the TTFT
                ep.answered(token)
                ep.first_message.add(elapsed)
                ep.observe(elapsed, units, now=now)
                ep.breaker.record(Outcome.SUCCESS, now)
            else:
                ep.finish(token, now, units=units)
                ep.breaker.record(Outcome.SUCCESS, now)
            code = "OK"
        else:
            code = exc.code if isinstance(exc, AttemptError) else "INTERNAL"
            reason = exc.reason if isinstance(exc, AttemptError) else ""
            usual = (ep.ewma_per_unit_s or 0.0) * units
            fair = given is None or given >= 2 * usual
            outcome = classify(code, fair_deadline=fair, reason=reason)
            timed_out = outcome is Outcome.FAILURE and code == "DEADLINE_EXCEEDED"
            ep.finish(token, now, units=units, ok=outcome is not Outcome.FAILURE,
                      sample=timed_out, answered=not timed_out)
            if outcome is Outcome.PUSHBACK:
                ep.push_back(now, exc.retry_after_s if isinstance(exc, AttemptError) else None)
            ep.breaker.record(outcome, now)
        if self.on_attempt is not None:
            self.on_attempt(ep, code, elapsed)
        self._check_outliers()

    def _check_outliers(self, *, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._outlier_at >= OUTLIER_PERIOD_S:
            self._outlier_at = now
            self.outlier.evaluate(list(self.endpoints.values()), now)
