"""Admission by deadline: admit work when it can finish in time, refuse at once when not.

Every hop gates its queue with the same rule (:func:`admit`): a request is admitted when
its estimated completion -- the estimated wait for the work ahead of it plus its own
estimated compute, both from the hop's cost model -- fits

* what is left of its deadline minus a slack (the answer's way back and the lateness of a
  loaded machine: 15 % of what is left, 5-100 ms, ``AdmissionPolicy.slack_s``), and
* the hop's ceiling ``max_queue_delay_s`` (a few seconds of work: a burst queues, a
  backlog that would only grow is refused).

A request without a deadline gets the hop's default deadline. A refusal is immediate
(nothing waits) and says, as pushback, when the work ahead will have drained enough for
the same request to fit. Hard bounds (items, tokens held) are checked by the queues
themselves; this module only decides by time.

Priority (``x-backbone-priority``): queues serve the oldest first within a class and the
classes high > normal > low. Under pressure low is refused first: a low request is
admitted only while the wait ahead of it is under ``low_fraction`` of the ceiling. A high
request's wait counts only the work of its own class and above (it goes ahead of queued
normal and low work), so it may take a slot ahead of them.

The generation hop's gate in front of the engine's waiting queue (:class:`AdmissionGate`)
applies the same rule to an estimated time to first token (:class:`TtftEstimator`).

No grpc imports: policy, unit-tested with fake clocks.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from router.errors import DeadlineTooShort, Overloaded

# Shortest pushback a refusal suggests, seconds.
MIN_RETRY_S = 0.001


class Priority(enum.IntEnum):
    """A request's class; higher is served first. Unknown names are the caller's error."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @classmethod
    def parse(cls, text: str) -> Priority:
        """``low``/``normal``/``high`` (any case, surrounding blanks ignored); ValueError
        on anything else."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(text) from None


@dataclass(frozen=True)
class AdmissionPolicy:
    """The admission rule's knobs, one per hop (see the hops' config sections)."""

    # Ceiling on a request's estimated completion (wait + own compute), seconds; 0: no
    # ceiling (only the deadline bounds).
    max_queue_delay_s: float = 4.0
    # Deadline given to a request that has none, seconds.
    default_deadline_s: float = 10.0
    # Kept back from the deadline for the answer's way back, seconds.
    reserve_s: float = 0.005
    # Kept back for lateness as well (see ``slack_s``): this share of what is left of the
    # deadline, at most ``max_slack_s``.
    slack_fraction: float = 0.15
    max_slack_s: float = 0.1
    # Low-priority work is admitted only while the wait ahead is under this fraction of
    # the ceiling (or of its own deadline budget, whichever is smaller).
    low_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.max_queue_delay_s < 0 or self.default_deadline_s <= 0 or self.reserve_s < 0:
            raise ValueError("max_queue_delay_s and reserve_s must be >= 0, "
                             "default_deadline_s > 0")
        if not 0 < self.low_fraction <= 1:
            raise ValueError("low_fraction must be in (0, 1]")
        if not 0 <= self.slack_fraction < 1 or self.max_slack_s < 0:
            raise ValueError("slack_fraction must be in [0, 1), max_slack_s >= 0")

    def slack_s(self, left_s: float) -> float:
        """What a request with ``left_s`` of its deadline left must keep back: the reserve,
        or ``slack_fraction`` of what is left (at most ``max_slack_s``) when that is more.
        A loaded machine starts batches and fires timers late; an admission that spent
        the whole budget on the estimate left nothing for that, and the request ended
        with DEADLINE_EXCEEDED instead of an answer (0.1-0.6 % of requests at 3x overload
        with 200 ms deadlines, before this)."""
        return max(self.reserve_s, min(self.slack_fraction * left_s, self.max_slack_s))


@dataclass(frozen=True)
class Admitted:
    """An admission: the deadline the work runs under and what was estimated."""

    deadline: float
    wait_s: float
    own_s: float


def admit(
    name: str,
    policy: AdmissionPolicy,
    *,
    wait_s: float,
    own_s: float,
    deadline: float | None,
    priority: Priority = Priority.NORMAL,
    now: float | None = None,
    what: str = "work",
) -> Admitted:
    """Admit or refuse a request whose work ahead is estimated at ``wait_s`` and its own
    compute at ``own_s`` (seconds); ``deadline`` is a ``time.monotonic()`` instant or None.

    Raises ``DeadlineTooShort`` when the deadline has already passed and ``Overloaded``
    (with ``retry_after_s``: when the work ahead will have drained enough for this request
    to fit) when the estimated completion does not fit the deadline budget or the ceiling;
    never waits. Returns the effective deadline otherwise.
    """
    now = time.monotonic() if now is None else now
    if deadline is None:
        deadline = now + policy.default_deadline_s
    left = deadline - now
    if left <= 0:
        raise DeadlineTooShort(f"the deadline passed before {name} could queue the {what}")
    budget = left - policy.slack_s(left)
    ceiling = policy.max_queue_delay_s
    if ceiling:
        budget = min(budget, ceiling)
    wait_s, own_s = max(0.0, wait_s), max(0.0, own_s)
    fits = wait_s + own_s <= budget + 1e-9  # float slack: exactly the budget fits
    if priority is Priority.LOW:
        # Low is refused first: only admitted while the queue is short.
        wait_budget = policy.low_fraction * budget
        fits = fits and wait_s <= wait_budget
        allowed = min(budget - own_s, wait_budget)
    else:
        allowed = budget - own_s
    if not fits and wait_s == 0 and priority is not Priority.LOW:
        # Nothing is ahead: an idle hop runs the work at once. The estimate of a large
        # request (a bulk ingest batch) is the least reliable one, and work still running
        # at its deadline is dropped anyway.
        fits = True
    if fits:
        return Admitted(deadline=deadline, wait_s=wait_s, own_s=own_s)
    # Pushback: once the work ahead has drained to what this request could afford.
    retry = max(MIN_RETRY_S, wait_s - max(0.0, allowed))
    over = "its deadline" if not ceiling or left - policy.slack_s(left) < ceiling else (
        f"the {ceiling * 1000:.0f} ms ceiling"
    )
    raise Overloaded(
        f"{name} cannot finish the {what} in time: about {wait_s * 1000:.0f} ms of work is "
        f"ahead and it takes about {own_s * 1000:.0f} ms, over {over}"
        + (" (low priority)" if priority is Priority.LOW else ""),
        metadata={
            "estimated_wait_ms": round(wait_s * 1000),
            "budget_ms": round(max(0.0, budget) * 1000),
            "priority": priority.name.lower(),
        },
        retry_after_s=retry,
    )


# --------------------------------------------------------------------------- generation


class TtftEstimator:
    """Time to first token of a new request, learnt from the requests that ran.

    The engine runs at most ``max_running`` sequences; the rest wait. A new request that
    finds a free slot waits only for its prefill (``prefill_s_per_token`` x its prompt
    tokens) and one decode step; one that queues waits for a slot: with ``k`` requests
    ahead of it in the waiting queue and the running ones each ``mean_completion``
    tokens long, a slot frees about every ``mean_completion x step_s / max_running``
    seconds, so it waits ``(k + 1)`` of those. Rates are smoothed over recent requests
    (``observe``); before any request has run the estimate is 0 (nothing to go on: only
    the hard bound holds).
    """

    # Weight of a new observation in the moving averages.
    ALPHA = 0.2

    def __init__(self) -> None:
        self.prefill_s_per_token = 0.0
        self.step_s = 0.0
        self.mean_completion = 0.0
        self._seen = False

    @property
    def known(self) -> bool:
        """True once one request has been observed."""
        return self._seen

    def observe(
        self, *, prompt_tokens: int, completion_tokens: int, prefill_s: float | None,
        step_s: float | None,
    ) -> None:
        """Record a finished request: its prefill time (only when it did not queue: first
        token time less a step), its time per output token, its length."""
        a = self.ALPHA if self._seen else 1.0
        if prefill_s is not None and prompt_tokens > 0 and prefill_s > 0:
            rate = prefill_s / prompt_tokens
            self.prefill_s_per_token = (
                rate if not self.prefill_s_per_token
                else (1 - self.ALPHA) * self.prefill_s_per_token + self.ALPHA * rate
            )
        if step_s is not None and step_s > 0:
            self.step_s = step_s if not self.step_s else (1 - self.ALPHA) * self.step_s + self.ALPHA * step_s
        if completion_tokens > 0:
            self.mean_completion = (1 - a) * self.mean_completion + a * completion_tokens
        self._seen = True

    def wait_s(self, *, running: int, waiting: int, max_running: int) -> float:
        """Estimated wait for a slot of a request arriving now."""
        if running + waiting < max_running or not self._seen:
            return 0.0
        interval = self.mean_completion * self.step_s / max(1, max_running)
        return (waiting + 1) * interval

    def own_s(self, prompt_tokens: int) -> float:
        """Estimated prefill and first decode step of a prompt of ``prompt_tokens``."""
        if not self._seen:
            return 0.0
        return prompt_tokens * self.prefill_s_per_token + self.step_s


class AdmissionGate:
    """Bounds the requests in one generation engine and admits by time to first token.

    ``max_running`` run at once, up to ``max_waiting`` more wait (the hard bound); a
    request is admitted only when its estimated time to first token (``TtftEstimator``)
    fits its deadline and the ceiling (``admit``). ``acquire`` never waits: it raises at
    once. Every successful ``acquire`` is matched by exactly one ``release``.
    """

    def __init__(
        self, max_running: int, max_waiting: int, policy: AdmissionPolicy | None = None,
    ) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.capacity = max_running + max_waiting
        self.in_flight = 0
        self.policy = policy or AdmissionPolicy(max_queue_delay_s=0.0, default_deadline_s=3600.0)
        self.ttft = TtftEstimator()

    @property
    def running(self) -> int:
        """Admitted requests the engine runs now (at most ``max_running``)."""
        return min(self.in_flight, self.max_running)

    @property
    def waiting(self) -> int:
        """Admitted requests beyond what the engine runs at once."""
        return max(0, self.in_flight - self.max_running)

    def estimated_ttft_s(self, prompt_tokens: int) -> float:
        """Estimated time to first token of a request of ``prompt_tokens`` arriving now."""
        return self.ttft.wait_s(
            running=self.running, waiting=self.waiting, max_running=self.max_running
        ) + self.ttft.own_s(prompt_tokens)

    def acquire(
        self, *, prompt_tokens: int = 0, deadline: float | None = None,
        priority: Priority = Priority.NORMAL, now: float | None = None,
    ) -> Admitted:
        """Take a slot or raise ``Overloaded`` (hard bound, or the estimated time to first
        token does not fit) / ``DeadlineTooShort`` (deadline already passed)."""
        wait = self.ttft.wait_s(
            running=self.running, waiting=self.waiting, max_running=self.max_running
        )
        if self.in_flight >= self.capacity:
            raise Overloaded(
                f"generation queue is full ({self.max_waiting} waiting)",
                metadata={"max_waiting": self.max_waiting, "max_running": self.max_running},
                retry_after_s=max(MIN_RETRY_S, wait / max(1, self.waiting + 1)),
            )
        admitted = admit(
            "generation", self.policy, wait_s=wait, own_s=self.ttft.own_s(prompt_tokens),
            deadline=deadline, priority=priority, now=now, what="first token",
        )
        self.in_flight += 1
        return admitted

    def release(self) -> None:
        """Give a slot back."""
        assert self.in_flight > 0, "release without acquire"
        self.in_flight -= 1
