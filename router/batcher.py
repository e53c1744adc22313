"""Dynamic batching of concurrent requests onto blocking model calls.

One component serves every batched hop (embedding, rerank). Callers ``submit`` the items
of one request; the batcher groups items of many requests into batches bounded by a
maximum size, a maximum wait and a token budget (padded tokens: rows x longest row),
grouping items of similar length so padding stays small, and runs each batch in a worker
thread off the event loop.

Lanes. An engine may run several batches at once (``BatchPolicy.lanes``: e.g. one ONNX
Runtime lane per CPU core), each on its own worker thread, taking the next batch as soon
as it is free. ``run_alone`` (optional) runs a lone item when every lane is idle and
nothing else waits (e.g. on all cores at once). With ``lane_depth`` 2 the next batch is
handed to a busy lane's thread ahead of time, so it starts the moment the running one
ends (measured here: ~2 ms of idle core per one-text batch otherwise); handed-over
batches count as queued work, and one whose callers all left is skipped.

Invariants:
- every future handed out is resolved on every path (result, the batch's own exception,
  ``Overloaded``, ``DeadlineTooShort``, ``Unavailable`` at stop) or cancelled by its caller;
- items whose caller went away (cancelled) or whose deadline passed are dropped before
  compute; a request whose batches run late is answered ``Overloaded`` before its
  caller's deadline (``_guard``), never left to end DEADLINE_EXCEEDED;
- the queue never holds more than ``max_queue`` live items nor ``max_queue_tokens``
  tokens (hard bounds); a request is admitted only when its estimated completion (the
  wait for the work ahead plus its own compute, from ``router.cost_model``, which learns
  a batch's time from the batches that ran) fits its deadline and ``max_queue_delay_s``
  (``router.admission.admit``): admission of a request is all or nothing, and refusal
  is immediate;
- a batch that raises fails only its own items; the loop keeps running; at stop, waiting
  and running items fail with ``Unavailable``;
- the oldest waiting item of the highest priority class waiting is always in the next
  batch, so no item starves within its class (low items wait while higher ones queue;
  their deadlines bound how long).

No grpc imports: this is policy, driven by unit tests without a network.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from router.admission import MIN_RETRY_S, Priority, admit
from router.batch_policy import BatchPolicy, BatchTiming, deadline_guard
from router.batch_policy import Item as _Item
from router.batch_policy import Served as _Served
from router.batch_policy import run_timed as _run_timed
from router.cost_model import BatchCostModel
from router.errors import DeadlineTooShort, Overloaded, Unavailable

__all__ = ["BatchPolicy", "BatchTiming", "DynamicBatcher"]

In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")

log = logging.getLogger(__name__)


class DynamicBatcher(Generic[In, Out]):
    """Batches items from concurrent callers onto ``run_batch``.

    ``run_batch`` is blocking; it is called in a lane's worker thread with a list of
    payloads and must return one output per payload, in order. With several lanes it is
    called from several threads at once. ``run_alone``, when given, runs a batch of one
    item while every other lane is held idle.
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[In]], Sequence[Out]],
        policy: BatchPolicy,
        run_alone: Callable[[list[In]], Sequence[Out]] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._run_batch = run_batch
        self._run_alone = run_alone
        self._queue: list[_Item[In, Out]] = []
        # Tokens (costs) of the items in _queue, dropped ones until purged: the hard bound.
        self._queued_tokens = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._admission = policy.admission
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}-{lane}")
            for lane in range(policy.lanes)
        ]
        # Predicted compute (s) of the batches each lane holds, oldest (running) first;
        # whether a lone item runs alone, holding every lane; the batches' tasks.
        self._lane_work: list[list[float]] = [[] for _ in range(policy.lanes)]
        self._held_alone = False
        self._running: set[asyncio.Task] = set()
        self._stopping = False
        self._batches = 0
        self._last_batch_size = 0
        # Compute time of a batch as learnt from the batches that ran (fixed + per token).
        self.cost = BatchCostModel()
        # Padded tokens / real tokens of recent batches, smoothed: queued items are counted
        # in real tokens, batches pay for padded ones.
        self._padding = 1.0
        # Real tokens of one item, smoothed: the cost of a request not yet tokenised.
        self._item_cost = 1.0
        # When each lane is expected to be done with all it holds (time.monotonic()); 0: idle.
        self._running_until = [0.0] * policy.lanes
        # Observers (metrics): called with (batch_size, padded_tokens, compute_s).
        self.on_batch: Callable[[int, int, float], None] | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    def healthy(self) -> bool:
        """True while the batching loop runs."""
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def queued(self) -> int:
        """Items waiting (including ones whose caller left but are not purged yet)."""
        return len(self._queue)

    async def stop(self) -> None:
        """Stop the loop; every waiting or running item fails with Unavailable."""
        self._stopping = True
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._fail_all(Unavailable(f"{self.name} is shutting down"))
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)

    async def run_in_worker(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the (first lane's) batch thread, e.g. to load the model:
        OpenMP keeps a thread team per calling thread, and a second team left by a loader
        thread slowed encodes 35 % here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executors[0], fn, *args)

    # -- submission ----------------------------------------------------------------

    async def submit(
        self,
        payloads: Sequence[In],
        costs: Sequence[int],
        deadline: float | None = None,
        priority: Priority = Priority.NORMAL,
    ) -> tuple[list[Out], BatchTiming]:
        """Run ``payloads`` through batches and return their outputs in order.

        ``costs`` are the items' token counts. ``deadline`` is a ``time.monotonic()``
        instant (None: the policy's default deadline from now) after which items still
        waiting are dropped. Raises ``Overloaded`` at once when the queue cannot take
        every item or the request cannot finish in time (``check_admission``).
        """
        if not self.healthy():
            raise Unavailable(f"{self.name} batcher is not running")
        if len(payloads) != len(costs):
            raise ValueError("one cost per payload")
        self._check_hard_bounds(costs)
        admitted = self.check_admission(costs, deadline=deadline, priority=priority)
        loop = asyncio.get_running_loop()
        items = [
            _Item(p, max(1, int(c)), loop.create_future(), admitted.deadline, priority)
            for p, c in zip(payloads, costs, strict=True)
        ]
        self._queue.extend(items)
        self._queued_tokens += sum(i.cost for i in items)
        self._arrived.set()
        guards = self._guard(items, deadline, admitted.own_s, priority)
        try:
            served: list[_Served[Out]] = await asyncio.gather(*(i.future for i in items))
        except BaseException:
            for item in items:
                item.future.cancel()
            self._purge()
            raise
        finally:
            for timer in guards:
                timer.cancel()
        batches: dict[int, float] = {s.batch_id: s.compute_s for s in served}
        timing = BatchTiming(
            queue_s=max(s.queue_s for s in served),
            compute_s=sum(batches.values()),
            batch_size=max(s.batch_size for s in served),
        )
        return [s.value for s in served], timing

    def _guard(
        self, items: list[_Item[In, Out]], deadline: float | None, own_s: float, priority: Priority,
    ) -> list[asyncio.TimerHandle]:
        """The timers that answer a request before its deadline when its batches run late
        (``router.batch_policy.deadline_guard``)."""
        if deadline is None:
            return []

        def shed(late: list[_Item[In, Out]], why: str) -> None:
            error = Overloaded(f"{self.name} {why}",
                               retry_after_s=max(0.001, self.estimated_delay_s(priority=priority)))
            for item in late:
                item.future.set_exception(error)
            self._purge()

        return deadline_guard(items, deadline - time.monotonic(), own_s, self._admission, shed)

    def _check_hard_bounds(self, costs: Sequence[int]) -> None:
        """Refuse (Overloaded) a request the queue cannot hold: items or tokens."""
        tokens = sum(max(1, int(c)) for c in costs)
        max_tokens = self.policy.max_queue_tokens

        def over() -> str | None:
            if len(self._queue) + len(costs) > self.policy.max_queue:
                return f"{self.name} queue is full ({self.policy.max_queue} items)"
            if max_tokens and self._queued_tokens + tokens > max_tokens and self._queue:
                return f"{self.name} queue is full ({max_tokens} tokens)"
            return None

        if over() is None:
            return
        self._purge()
        message = over()
        if message is None:
            return
        live = len(self._queue)
        # Pushback: the time for enough of the work ahead to drain to make room.
        share = min(1.0, len(costs) / max(1, live))
        raise Overloaded(
            message,
            metadata={"max_queue": self.policy.max_queue, "max_queue_tokens": max_tokens},
            retry_after_s=max(MIN_RETRY_S, self.estimated_delay_s() * share),
        )

    def check_admission(
        self,
        costs: Sequence[int] = (),
        *,
        deadline: float | None = None,
        priority: Priority = Priority.NORMAL,
        items: int = 1,
    ):
        """Admit (return ``router.admission.Admitted``, with the effective deadline) or
        refuse at once: ``Overloaded`` with pushback when the estimated wait for the work
        ahead plus the request's own compute does not fit what is left of its deadline
        (less the reserve) and ``max_queue_delay_s``; ``DeadlineTooShort`` when the
        deadline already passed. Callers may use it to refuse before preparing a request
        (``costs`` unknown then: ``items`` of the usual size)."""
        return admit(
            self.name, self._admission,
            wait_s=self.estimated_delay_s(priority=priority),
            own_s=self.estimated_compute_s(costs, items=items),
            deadline=deadline, priority=priority,
        )

    def estimated_compute_s(self, costs: Sequence[int] = (), *, items: int = 1) -> float:
        """Expected compute of a request of items costing ``costs`` tokens (empty: ``items``
        of the usual size) once its turn comes: its batches shared among the lanes, at
        least one item's run."""
        if not self.cost.known:
            return 0.0
        sizes = [max(1, int(c)) for c in costs] or [max(1, round(self._item_cost))] * items
        padded = sum(sizes) * self._padding
        batches = max(-(-len(sizes) // self.policy.max_batch_size),
                      -(-int(padded) // self.policy.token_budget))
        one = self.cost.predict_s(max(1, int(max(sizes) * self._padding)))
        return max(one, self.cost.predict_s(int(padded), batches) / self.policy.lanes)

    def estimated_delay_s(
        self, *, running: bool = True, priority: Priority = Priority.LOW
    ) -> float:
        """Expected wait of a newly queued item of ``priority`` before its batch starts, in
        seconds: what is left of the running batches (unless ``running`` is False) plus
        the batches handed to lanes ahead of time and those the queued items of its class
        and above will make, shared among the lanes. (The default, LOW, counts every
        queued item.)"""
        if not self.cost.known:
            return 0.0
        live = [i.cost for i in self._queue if not i.future.done() and i.priority >= priority]
        now = time.monotonic()
        lanes = self.policy.lanes
        if running:
            left = [max(0.0, until - now) for until in self._running_until]
            ahead = min(left) if lanes > 1 and not live else sum(left) / lanes
        else:
            ahead = sum(sum(work[1:]) for work in self._lane_work) / lanes
        if not live:
            return ahead
        padded = sum(live) * self._padding
        batches = max(-(-len(live) // self.policy.max_batch_size),
                      -(-int(padded) // self.policy.token_budget))
        return ahead + self.cost.predict_s(int(padded), batches) / lanes

    # -- the loop ------------------------------------------------------------------

    def _set_queue(self, items: list[_Item[In, Out]]) -> None:
        self._queue = items
        self._queued_tokens = sum(i.cost for i in items)

    def _purge(self) -> None:
        self._set_queue([i for i in self._queue if not i.future.done()])

    def _fail_all(self, exc: BaseException) -> None:
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(exc)
        self._set_queue([])

    def _batch_full(self) -> bool:
        live = [i.cost for i in self._queue if not i.future.done()]
        if len(live) >= self.policy.max_batch_size:
            return True
        return max(live, default=0) * len(live) >= self.policy.token_budget

    async def _loop(self) -> None:
        try:
            while True:
                await self._arrived.wait()
                self._arrived.clear()
                self._purge()
                if not self._queue or self._open_lane() is None:
                    continue  # a lane coming free sets _arrived again
                await self._wait_for_company()
                batch = self._take_batch()
                if batch:
                    self._dispatch(batch)
                if self._queue and self._open_lane() is not None:
                    self._arrived.set()
        except asyncio.CancelledError:
            raise
        except BaseException:  # a bug in the loop itself: fail everyone, report unhealthy
            log.exception("batcher %s loop died", self.name)
            self._fail_all(Unavailable(f"{self.name} batcher failed"))
            raise

    def _open_lane(self) -> int | None:
        """The lane the next batch goes to: an idle one, else (lane_depth > 1) the lane
        expected to be free first among those with room; None when none can take it."""
        if self._held_alone:
            return None
        idle = [lane for lane, work in enumerate(self._lane_work) if not work]
        if idle:
            return idle[0]
        room = [lane for lane, work in enumerate(self._lane_work)
                if len(work) < self.policy.lane_depth]
        return min(room, key=lambda lane: self._running_until[lane], default=None)

    def _dispatch(self, batch: list[_Item[In, Out]]) -> None:
        """Hand ``batch`` to a lane; a lone item on an idle engine with nothing else
        waiting runs alone (``run_alone``), holding every lane."""
        lane = self._open_lane()
        assert lane is not None
        alone = (
            self._run_alone is not None
            and len(batch) == 1
            and not any(self._lane_work)
            and not any(not i.future.done() for i in self._queue)
        )
        padded = len(batch) * max(i.cost for i in batch)
        predicted = self.cost.predict_s(padded)
        now = time.monotonic()
        held = list(range(self.policy.lanes)) if alone else [lane]
        self._held_alone = alone
        for held_lane in held:
            self._lane_work[held_lane].append(predicted)
            self._running_until[held_lane] = max(now, self._running_until[held_lane]) + predicted
        # The lane's thread gets the batch now, not when the task first runs.
        run = self._run_alone if alone and self._run_alone is not None else self._run_batch
        work = asyncio.get_running_loop().run_in_executor(
            self._executors[lane], _run_timed, run, batch
        )
        self._batches += 1
        self._last_batch_size = len(batch)
        task = asyncio.create_task(
            self._run(batch, work, alone, self._batches), name=f"batch-{self.name}"
        )
        self._running.add(task)

        def release(done: asyncio.Task) -> None:
            self._running.discard(done)
            if done.cancelled():  # stop(), perhaps before the task ran: callers must not hang
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(Unavailable(f"{self.name} is shutting down"))
            now = time.monotonic()
            for held_lane in held:
                work = self._lane_work[held_lane]
                work.pop(0)
                self._running_until[held_lane] = now + sum(work) if work else 0.0
            if alone:
                self._held_alone = False
            self._arrived.set()

        task.add_done_callback(release)

    async def _wait_for_company(self) -> None:
        """Give the oldest item up to max_wait to be joined, unless the batch is full or
        the previous batch ran alone (no sign of concurrent callers)."""
        if self._last_batch_size <= 1:
            return
        oldest = self._queue[0].enqueued
        while not self._batch_full():
            remaining = oldest + self.policy.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Item[In, Out]]:
        """Remove and return the next batch: the oldest item of the highest priority
        waiting, plus the closest lengths (higher classes first)."""
        now = time.monotonic()
        live: list[_Item[In, Out]] = []
        for item in self._queue:
            if item.future.done():
                continue
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(
                    DeadlineTooShort(f"deadline passed while queued in {self.name}")
                )
                continue
            live.append(item)
        if not live:
            self._set_queue([])
            return []
        top = max(i.priority for i in live)
        oldest = next(i for i in live if i.priority == top)  # live is in arrival order
        by_closeness = sorted(
            (i for i in live if i is not oldest),
            key=lambda i: (-i.priority, abs(i.cost - oldest.cost), i.enqueued),
        )
        batch = [oldest]
        longest = oldest.cost
        for item in by_closeness:
            if len(batch) >= self.policy.max_batch_size:
                break
            new_longest = max(longest, item.cost)
            if new_longest * (len(batch) + 1) > self.policy.token_budget:
                continue
            batch.append(item)
            longest = new_longest
        chosen = {id(i) for i in batch}
        self._set_queue([i for i in live if id(i) not in chosen])
        return batch

    async def _run(
        self,
        batch: list[_Item[In, Out]],
        work: asyncio.Future[tuple[Sequence[Out], float, float] | None],
        alone: bool,
        batch_id: int,
    ) -> None:
        padded = len(batch) * max(i.cost for i in batch)
        real = sum(i.cost for i in batch)
        try:
            timed = await work
            if timed is None:
                return  # every caller left while the batch waited on its lane
            outputs, started, ended = timed
            if len(outputs) != len(batch):
                raise RuntimeError(
                    f"{self.name}: run_batch returned {len(outputs)} outputs for {len(batch)}"
                )
        except Exception as exc:  # the batch's own failure: only its callers see it
            log.error("batch of %d in %s failed: %r", len(batch), self.name, exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        compute_s = ended - started
        if not alone:
            # A lone item on every core is faster than a lane's share: learning from it
            # would understate the time of queued work, which runs in lanes.
            self.cost.observe(padded, compute_s)
            self._padding = 0.8 * self._padding + 0.2 * (padded / real)
            self._item_cost = 0.8 * self._item_cost + 0.2 * (real / len(batch))
        if self.on_batch is not None:
            self.on_batch(len(batch), padded, compute_s)
        for item, value in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(
                    _Served(value, started - item.enqueued, compute_s, len(batch), batch_id)
                )
