"""The batching policy (bounds of a batch, of the queue and of admission), the timing a
request's items report, the queue's item types and the deadline guard that answers a
late request; used by ``router.batcher``.

No grpc imports: policy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from router.admission import AdmissionPolicy, Priority

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class BatchPolicy:
    """Bounds of a batch and of the queue in front of it."""

    max_batch_size: int = 64
    # How long the oldest item may wait for company while the engine is idle, in seconds.
    # Applies only while traffic is concurrent (the previous batch held more than one
    # item): a lone caller on an idle engine is dispatched at once.
    max_wait_s: float = 0.002
    # Padded tokens per batch at most: len(batch) * max(cost in batch). A single item
    # over the budget still runs, alone.
    token_budget: int = 16384
    # Live items waiting at most; beyond this a request is refused with Overloaded.
    max_queue: int = 1024
    # Queued tokens (the items' costs) at most: the memory the queue holds; 0: no bound.
    max_queue_tokens: int = 0
    # Ceiling on a new request's estimated completion (the wait for the work ahead of it,
    # what is left of the running batches included, plus its own compute; each batch
    # costed by the fit of fixed + per-token time over recent batches, shared among the
    # lanes), seconds; 0: only the deadline bounds. It applies once a batch has been
    # measured. See router.admission.
    max_queue_delay_s: float = 0.0
    # Deadline of a request that brings none, seconds (its items are dropped then too).
    default_deadline_s: float = 10.0
    # Kept back from a deadline for the answer's way back, seconds.
    deadline_reserve_s: float = 0.005
    # Low priority is admitted only while the wait ahead is under this fraction of the
    # ceiling (or of its deadline budget).
    low_fraction: float = 0.5
    # Batches that may run at once, each on its own worker thread (engine instances).
    lanes: int = 1
    # Batches a lane may hold: the running one, plus (depth - 1) handed to its worker
    # thread ahead of time. 1 keeps every batch on the loop until a lane is free (best
    # grouping); 2 keeps the lanes fed when each batch is short (one text per call).
    lane_depth: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.token_budget < 1:
            raise ValueError("batch size, queue and token budget must be positive")
        if self.lanes < 1 or self.lane_depth < 1:
            raise ValueError("lanes and lane_depth must be at least 1")
        if self.max_wait_s < 0 or self.max_queue_tokens < 0:
            raise ValueError("max_wait_s and max_queue_tokens must be >= 0")
        self.admission  # noqa: B018 - validates the admission knobs

    @property
    def admission(self) -> AdmissionPolicy:
        """The admission rule's knobs (validated there)."""
        return AdmissionPolicy(
            max_queue_delay_s=self.max_queue_delay_s, default_deadline_s=self.default_deadline_s,
            reserve_s=self.deadline_reserve_s, low_fraction=self.low_fraction,
        )


@dataclass(frozen=True)
class BatchTiming:
    """How a request's items were served."""

    # Longest time any of its items waited in the queue, seconds.
    queue_s: float
    # Compute time of the batches that served its items, summed, seconds.
    compute_s: float
    # Largest batch that served one of its items.
    batch_size: int


class Item(Generic[In, Out]):
    """One queued item: payload, token cost, the caller's future, deadline, priority."""

    __slots__ = ("payload", "cost", "future", "enqueued", "deadline", "priority", "started")

    def __init__(
        self, payload: In, cost: int, future: asyncio.Future, deadline: float | None,
        priority: Priority = Priority.NORMAL,
    ) -> None:
        self.payload = payload
        self.cost = cost
        self.future = future
        self.enqueued = time.monotonic()
        self.deadline = deadline
        self.priority = priority
        #: Set on the lane's thread when its batch starts (a batch handed to a busy lane
        #: ahead of time has not): until then the item can still be shed unrun.
        self.started = False


@dataclass(frozen=True)
class Served(Generic[Out]):
    """What an item's future resolves to: its output and how it was served."""

    value: Out
    queue_s: float
    compute_s: float
    batch_size: int
    batch_id: int


def run_timed(
    run: Callable[[list[In]], Sequence[Out]], batch: list[Item[In, Out]]
) -> tuple[Sequence[Out], float, float] | None:
    """On the lane's thread: ``run`` the batch and time it where it actually runs (a batch
    handed over ahead of time waits on the lane first); None, without running, when every
    caller left meanwhile. Reading an asyncio future's ``done()`` from this thread is a
    read of its state, which only the event loop writes."""
    if all(item.future.done() for item in batch):
        return None
    for item in batch:
        item.started = True
    started = time.monotonic()
    outputs = run([item.payload for item in batch])
    return outputs, started, time.monotonic()


def deadline_guard(
    items: list[Item[In, Out]], left_s: float, own_s: float, admission: AdmissionPolicy,
    shed: Callable[[list[Item[In, Out]], str], None],
) -> list[asyncio.TimerHandle]:
    """Timers that answer a request ``left_s`` from its deadline when its batches run late
    (``shed`` fails the given items ``Overloaded``, with pushback: an answer, not
    DEADLINE_EXCEEDED at the caller):

    * items not started (queued, or handed to a busy lane) when only their own compute
      (``own_s``) and half the slack (``AdmissionPolicy.slack_s``) remain are shed unrun;
    * a request still unanswered when only a third of the slack (at least the reserve)
      remains is answered then; its running batch's result is dropped.

    A request admitted on an idle hop although its estimate did not fit (the idle rule)
    starts at once, so only the second mark applies to it."""
    slack = admission.slack_s(left_s)
    loop = asyncio.get_running_loop()

    def refuse(why: str, unstarted_only: bool) -> None:
        late = [i for i in items if not i.future.done() and not (unstarted_only and i.started)]
        if late:
            shed(late, why)

    timers = []
    shed_in = left_s - own_s - slack / 2
    if shed_in > 0:
        timers.append(loop.call_later(
            shed_in, refuse, "could not start the request before its deadline", True))
    answer_in = left_s - max(admission.reserve_s, slack / 3)
    if answer_in > 0:
        timers.append(loop.call_later(
            answer_in, refuse, "could not finish the request before its deadline", False))
    return timers
