"""Dynamic batching of concurrent requests onto blocking model calls.

One component serves every batched hop (embedding, rerank). Callers ``submit`` the items
of one request; the batcher groups items of many requests into batches bounded by a
maximum size, a maximum wait and a token budget (padded tokens: rows x longest row),
grouping items of similar length so padding stays small, and runs each batch in a worker
thread off the event loop.

Lanes. An engine may run several batches at once (``BatchPolicy.lanes``: model
instances, e.g. one ONNX Runtime lane per CPU core); each lane has its own worker thread
and takes the next batch as soon as it is free, so no lane waits for another's batch to
end. An engine may also offer ``run_alone``: how to run a lone item when every lane is
idle and nothing else waits (e.g. on all cores at once, which is faster for one item but
slower in total than one item per core).

Lane depth. A lane may hold more than its running batch (``BatchPolicy.lane_depth``): with
depth 2, once every lane is busy the next batch is handed to a lane's worker thread ahead
of time, so the worker starts it the moment the running one ends instead of waiting for
the event loop to hand it over (measured here: ~2 ms of idle core per batch with 64
callers on one-text batches). Handed-over batches count as queued work for admission, and
a batch whose callers all left while it waited on its lane is skipped.

Invariants:
- every future handed out is resolved on every path (result, the batch's own exception,
  ``Overloaded``, ``DeadlineTooShort``, ``Unavailable`` at stop) or cancelled by its caller;
- items whose caller went away (cancelled) or whose deadline passed are dropped before
  compute;
- the queue never holds more than ``max_queue`` live items, nor (once a batch has been
  measured) more estimated work than ``max_queue_delay_s`` (``router.cost_model`` learns
  a batch's time from the batches that ran): admission of a request is all or nothing,
  and refusal is immediate;
- a batch that raises fails only its own items; the loop keeps running; at stop, waiting
  and running items fail with ``Unavailable``;
- the oldest waiting item is always in the next batch, so no item starves.

No grpc imports: this is policy, driven by unit tests without a network.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from router.cost_model import BatchCostModel
from router.errors import DeadlineTooShort, Overloaded, Unavailable

In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")

log = logging.getLogger(__name__)


# Longest pushback (RetryInfo) a refusal suggests, in seconds.
MAX_PUSHBACK_S = 1.0


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
    # Estimated wait before compute at most, in seconds; beyond it a request is refused
    # with Overloaded. The estimate is the batches handed to lanes ahead of time and those
    # the queued items will make (plus, see below, what is left of the running ones), each
    # costed by the fit of fixed + per-token time over recent batches, shared among the
    # lanes. 0 disables the bound; it applies once a batch has been measured.
    max_queue_delay_s: float = 0.0
    # What max_queue_delay_s bounds: the whole estimated wait of a new item, what is left
    # of the running batches included (True), or only the work queued behind them (False:
    # for batches longer than the bound, which would otherwise refuse whoever arrives
    # while one runs, even at light load).
    queue_delay_counts_running: bool = False
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
        if self.max_wait_s < 0 or self.max_queue_delay_s < 0:
            raise ValueError("max_wait_s and max_queue_delay_s must be >= 0")


@dataclass(frozen=True)
class BatchTiming:
    """How a request's items were served."""

    # Longest time any of its items waited in the queue, seconds.
    queue_s: float
    # Compute time of the batches that served its items, summed, seconds.
    compute_s: float
    # Largest batch that served one of its items.
    batch_size: int


class _Item(Generic[In, Out]):
    __slots__ = ("payload", "cost", "future", "enqueued", "deadline")

    def __init__(
        self, payload: In, cost: int, future: asyncio.Future, deadline: float | None
    ) -> None:
        self.payload = payload
        self.cost = cost
        self.future = future
        self.enqueued = time.monotonic()
        self.deadline = deadline


@dataclass(frozen=True)
class _Served(Generic[Out]):
    value: Out
    queue_s: float
    compute_s: float
    batch_size: int
    batch_id: int


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
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
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
        # When the last refused caller was told to come back (time.monotonic()): refusals
        # are handed consecutive return slots so they come back at the engine's pace.
        self._next_return = 0.0
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
        """Run ``fn(*args)`` on the (first lane's) batch thread, e.g. to load the model.

        OpenMP (torch's CPU threads) keeps one thread team per thread that runs parallel
        work; a model that has run on a second thread leaves that team contending with the
        batch thread's (measured here: single-text encodes 35 % slower). Loading and
        checking a model on the batch thread keeps all its work on one team.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executors[0], fn, *args)

    # -- submission ----------------------------------------------------------------

    async def submit(
        self,
        payloads: Sequence[In],
        costs: Sequence[int],
        deadline: float | None = None,
    ) -> tuple[list[Out], BatchTiming]:
        """Run ``payloads`` through batches and return their outputs in order.

        ``costs`` are the items' token counts. ``deadline`` is a ``time.monotonic()``
        instant after which items still waiting are dropped. Raises ``Overloaded`` at
        once when the queue cannot take every item.
        """
        if not self.healthy():
            raise Unavailable(f"{self.name} batcher is not running")
        if len(payloads) != len(costs):
            raise ValueError("one cost per payload")
        if len(self._queue) + len(payloads) > self.policy.max_queue:
            self._purge()
            if len(self._queue) + len(payloads) > self.policy.max_queue:
                raise Overloaded(
                    f"{self.name} queue is full",
                    metadata={"max_queue": self.policy.max_queue},
                    retry_after_s=self._pushback_s(self.estimated_delay_s(), costs),
                )
        self.check_admission(costs)
        loop = asyncio.get_running_loop()
        items = [
            _Item(p, max(1, int(c)), loop.create_future(), deadline)
            for p, c in zip(payloads, costs, strict=True)
        ]
        self._queue.extend(items)
        self._arrived.set()
        try:
            served: list[_Served[Out]] = (
                [await items[0].future] if len(items) == 1
                else await asyncio.gather(*(i.future for i in items))
            )
        except BaseException:
            for item in items:
                item.future.cancel()
            self._purge()
            raise
        batches: dict[int, float] = {s.batch_id: s.compute_s for s in served}
        timing = BatchTiming(
            queue_s=max(s.queue_s for s in served),
            compute_s=sum(batches.values()),
            batch_size=max(s.batch_size for s in served),
        )
        return [s.value for s in served], timing

    def check_admission(self, costs: Sequence[int] = ()) -> None:
        """Raise ``Overloaded`` (with pushback) when the estimated wait of a new item
        already exceeds ``max_queue_delay_s``; callers may use it to refuse before
        preparing a request (``costs`` unknown then: one item of the usual size).

        The wait counts the running batches only with ``queue_delay_counts_running``:
        otherwise a bound shorter than one batch would refuse whoever arrives while the
        engine is busy, even at light load."""
        if not self.policy.max_queue_delay_s:
            return
        running = self.policy.queue_delay_counts_running
        if self.estimated_delay_s(running=running) > self.policy.max_queue_delay_s:
            delay = self.estimated_delay_s()
            raise Overloaded(
                f"{self.name} is saturated: about {delay * 1000:.0f} ms of work is queued",
                metadata={"max_queue_delay_ms": round(self.policy.max_queue_delay_s * 1000)},
                retry_after_s=self._pushback_s(delay, costs),
            )

    def _pushback_s(self, delay_s: float, costs: Sequence[int] = ()) -> float:
        """How long a refused caller should wait before trying again (google.rpc.RetryInfo).

        Not the whole queue's drain time: told that, every refused caller would come back
        together once the queue is empty and leave the engine idle meanwhile. Each refusal
        gets the next return slot instead: the moment the queue is expected to be back
        under its bound, pushed back by the marginal compute of the callers refused
        before it, so refused callers return at about the pace the engine takes work.
        At least one batching wait, at most MAX_PUSHBACK_S.
        """
        now = time.monotonic()
        bound = self.policy.max_queue_delay_s
        ready = now + (max(0.0, delay_s - bound) if bound else delay_s)
        slot = max(ready, self._next_return)
        own = sum(max(1, int(c)) for c in costs) or self._item_cost
        # Its share of the per-call cost too: with a text per call that is most of it.
        calls = max(1, len(costs)) / self.policy.max_batch_size
        self._next_return = min(slot, now + MAX_PUSHBACK_S) + (
            own * self._padding * self.cost.per_token_s + calls * self.cost.fixed_s
        ) / self.policy.lanes
        return min(MAX_PUSHBACK_S, max(slot - now, self.policy.max_wait_s, 0.001))

    def estimated_delay_s(self, *, running: bool = True) -> float:
        """Expected wait of a newly queued item before its batch starts, in seconds: what
        is left of the running batches (unless ``running`` is False) plus the batches
        handed to lanes ahead of time and those the queued items will make, shared among
        the lanes."""
        if not self.cost.known:
            return 0.0
        live = [i.cost for i in self._queue if not i.future.done()]
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

    def _purge(self) -> None:
        self._queue = [i for i in self._queue if not i.future.done()]

    def _fail_all(self, exc: BaseException) -> None:
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(exc)
        self._queue.clear()

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
        """Remove and return the next batch: the oldest item plus the closest lengths."""
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
            self._queue = []
            return []
        oldest = live[0]
        by_closeness = sorted(live[1:], key=lambda i: (abs(i.cost - oldest.cost), i.enqueued))
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
        self._queue = [i for i in live if id(i) not in chosen]
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


def _run_timed(
    run: Callable[[list[In]], Sequence[Out]], batch: list[_Item[In, Out]]
) -> tuple[Sequence[Out], float, float] | None:
    """On the lane's thread: ``run`` the batch and time it where it actually runs (a batch
    handed over ahead of time waits on the lane first); None, without running, when every
    caller left meanwhile. Reading an asyncio future's ``done()`` from this thread is a
    read of its state, which only the event loop writes."""
    if all(item.future.done() for item in batch):
        return None
    started = time.monotonic()
    outputs = run([item.payload for item in batch])
    return outputs, started, time.monotonic()
