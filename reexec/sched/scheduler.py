"""The scheduler core: applies transitions to operation records and keeps the indexes in step.

Everything that happens to an operation goes through `Scheduler.apply`, which runs the pure
`transition(record, event)` and stores the result, then updates the derived indexes (platform
queues, worker slots, timers), metrics and logs, and wakes the dispatcher. gRPC handlers,
worker streams and timers only feed events in and read records out.

How concurrency works today: one scheduler process owns every record. All of this runs on the
process's Trio thread, and `apply` never awaits between reading a record and storing the next
one, so transitions are serialised without locks. The record's version is checked on store
(a failure would be a bug and raises); it becomes a real compare-and-set, with retries, when
records move to a store shared by several schedulers. The queues, worker slots and timers are
this process's own indexes, rebuilt from records.

    Scheduler.run
    └─ nursery
       ├─ _run_dispatcher      matches queued operations to free workers
       ├─ _run_monitor         worker keepalive, stuck actions, unwatched actions, expiry
       └─ _run_cache_checks    one child task per new operation (AC lookup)
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from reexec.cas.action_cache import ActionCache, ActionKey
from reexec.cas.digest import Digest, DigestFunction
from reexec.errors import FailedPrecondition, ResourceExhausted
from reexec.sched.change_log import completion_label, log_change, observe_durations
from reexec.sched.config import SchedulerConfig
from reexec.sched.matching import QueueKey, matches, worker_properties
from reexec.sched.queue import PlatformQueues
from reexec.sched.state import (
    CacheChecked,
    Cancel,
    Dispatched,
    Event,
    Finished,
    Operation,
    Outcome,
    ProgressReported,
    Requeue,
    Stage,
    StaleEvent,
    WaiterAttached,
    WaiterDetached,
    transition,
)
from reexec.sched.store import OperationStore
from reexec.sched.workers import WorkerState, pick_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """What the Execution service validated, ready to become an operation."""

    instance: str
    digest: Digest
    priority: int
    queue_key: QueueKey
    do_not_cache: bool
    skip_cache_lookup: bool
    timeout_s: float

    @property
    def key(self) -> tuple[str, str, int, int]:
        d = self.digest
        return (self.instance, d.hash, d.size, int(d.function))


@dataclass
class SchedulerStats:
    executes: int = 0
    merged: int = 0
    cache_hits: int = 0
    dispatched: int = 0
    retries: int = 0
    completed: dict[str, int] = field(default_factory=dict)
    cancelled_unwatched: int = 0
    workers_lost: int = 0


def action_key_of(op: Operation) -> ActionKey:
    instance, h, size, fn = op.action_key
    return ActionKey(instance, Digest(h, size, DigestFunction(fn)))


class Scheduler:
    def __init__(self, settings: SchedulerConfig, ac: ActionCache) -> None:
        self.settings = settings
        self.ac = ac
        self.store = OperationStore()
        self.queues = PlatformQueues()
        self.workers: dict[str, WorkerState] = {}
        self.stats = SchedulerStats()
        self._seq = itertools.count(1)
        self._wake = trio.Event()
        self._unwatched: dict[str, float] = {}
        self._retained: deque[tuple[float, str]] = deque()
        # Called with (old, new) after every applied transition, on the Trio thread; must not
        # block or raise (e.g. the status endpoint's journal of recent operations).
        self.observers: list[Callable[[Operation, Operation], None]] = []
        # New operations whose cache check `run` starts (unbounded: one entry per submit,
        # consumed at once; submit is synchronous and must not block).
        self._cache_checks_in, self._cache_checks_out = trio.open_memory_channel[Operation](
            math.inf
        )
        # Monotonic `now` values become wall-clock timestamps through this offset.
        self._wall_offset = time.time() - trio.current_time()

    # -- clocks ---------------------------------------------------------------------------------

    def now(self) -> float:
        return trio.current_time()

    def wall(self, now: float) -> float:
        return now + self._wall_offset

    # -- applying events --------------------------------------------------------------------------

    def apply(self, name: str, event: Event) -> Operation | None:
        """Apply `event` to the named operation; None if the event was stale or the op is gone."""
        old = self.store.get(name)
        if old is None:
            return None
        try:
            new = transition(old, event)
        except StaleEvent as e:
            log.debug("stale event: %s", e)
            return None
        # Cannot fail while this process is the only writer and nothing awaits in between.
        if not self.store.compare_and_set(old, new):
            raise AssertionError(f"{name} changed during a transition")
        self._update_queues(old, new)
        if isinstance(event, Cancel):
            self._cancel_on_worker(old, new)
        self._track_watchers(old, new)
        self._record_metrics(old, new)
        log_change(old, new)
        for observe in self.observers:
            observe(old, new)
        return new

    # -- what follows one record change (each step reads old and new, nothing else) -------------

    def _update_queues(self, old: Operation, new: Operation) -> None:
        if new.stage is Stage.QUEUED and (
            old.stage is not Stage.QUEUED or old.queue_seq != new.queue_seq
        ):
            self.queues.push(new.queue_key, new.priority, new.queue_seq, new.name)
            self._wake.set()
        elif old.stage is Stage.QUEUED and new.stage is not Stage.QUEUED:
            self.queues.discard(new.name)

    def _cancel_on_worker(self, old: Operation, new: Operation) -> None:
        if old.stage is Stage.EXECUTING and (
            new.stage is not Stage.EXECUTING or new.attempt != old.attempt
        ):
            self._send_cancel(old)

    def _track_watchers(self, old: Operation, new: Operation) -> None:
        """Unwatched operations are cancelled after a while; completed ones expire."""
        if new.waiters == 0 and not new.done:
            self._unwatched.setdefault(new.name, new.unwatched_since)
        else:
            self._unwatched.pop(new.name, None)
        if new.done and not old.done:
            self._retained.append((new.completed_at, new.name))

    def _record_metrics(self, old: Operation, new: Operation) -> None:
        observe_durations(old, new)
        if new.retries > old.retries:
            self.stats.retries += 1
        if new.done and not old.done:
            label = completion_label(new)
            self.stats.completed[label] = self.stats.completed.get(label, 0) + 1

    # -- operations -------------------------------------------------------------------------------

    def submit(self, spec: ActionSpec) -> tuple[Operation, bool]:
        """A new operation for `spec` with one waiter, or the live one it merges into."""
        now = self.now()
        self.stats.executes += 1
        mergeable = not spec.do_not_cache
        if mergeable:
            live = self.store.live_for(spec.key)
            # A client that skips the cache must not be answered by the cache check of an
            # operation it would merge into: it waits for its own execution instead.
            if live is not None and spec.skip_cache_lookup and live.stage is Stage.CACHE_CHECK:
                live = None
            if live is not None:
                merged = self.apply(live.name, WaiterAttached(now))
                if merged is not None:
                    self.stats.merged += 1
                    return merged, True
        if self.store.live >= self.settings.max_live_operations:
            raise ResourceExhausted(
                f"the scheduler holds {self.store.live} unfinished operations "
                f"(scheduler.max_live_operations); retry later"
            )
        op = Operation(
            name=str(uuid.uuid4()),
            action_key=spec.key,
            priority=spec.priority,
            queue_key=spec.queue_key,
            do_not_cache=spec.do_not_cache,
            skip_cache_lookup=spec.skip_cache_lookup,
            timeout_s=spec.timeout_s,
            created_at=now,
            waiters=1,
        )
        self.store.create(op, mergeable=mergeable)
        # In the scheduler's tree, not the client's handler: a client that disconnects during
        # the lookup must not strand other clients merged into the same operation.
        self._cache_checks_in.send_nowait(op)
        return op, False

    async def check_cache(self, op: Operation) -> Operation | None:
        """Move a CACHE_CHECK operation on: to COMPLETED on a hit, else to QUEUED."""
        hit: Outcome | None = None
        if not op.skip_cache_lookup and not op.do_not_cache:
            try:
                data = await self.ac.get(action_key_of(op))
            except Exception:
                log.exception("action cache lookup failed for %s; executing instead", op.name)
                data = None
            if data is not None:
                hit = Outcome(result=data, cached_result=True)
                self.stats.cache_hits += 1
        return self.apply(op.name, CacheChecked(self.now(), next(self._seq), hit))

    def attach(self, name: str) -> Operation | None:
        return self.apply(name, WaiterAttached(self.now()))

    def detach(self, name: str) -> None:
        self.apply(name, WaiterDetached(self.now()))

    def cancel(self, name: str, reason: str = "cancelled by the client") -> Operation | None:
        return self.apply(name, Cancel(self.now(), reason))

    # -- tasks ------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the scheduler's background tasks: dispatcher, timers, cache checks."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_dispatcher)
            nursery.start_soon(self._run_monitor)
            nursery.start_soon(self._run_cache_checks)
            task_status.started()

    async def _run_cache_checks(self) -> None:
        async with trio.open_nursery() as checks:
            async for op in self._cache_checks_out:
                checks.start_soon(self.check_cache, op)

    # -- dispatch ---------------------------------------------------------------------------------

    async def _run_dispatcher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self.dispatch_ready()

    def wake(self) -> None:
        self._wake.set()

    def dispatch_ready(self) -> int:
        """Assign queued operations to free matching workers; returns how many were assigned."""
        count = 0
        now = self.now()
        rules = self.settings.rules
        while True:
            free = [w for w in self.workers.values() if w.free_slots(now) > 0]
            if not free:
                return count
            best: tuple[tuple[int, int, str], WorkerState] | None = None
            for key in self.queues.keys():
                head = self.queues.head(key)
                if head is None or (best is not None and head[:2] >= best[0][:2]):
                    continue
                worker = pick_worker(
                    [w for w in free if matches(key, w.properties, rules)], self.settings.allocation
                )
                if worker is not None:
                    best = (head, worker)
            if best is None:
                return count
            (_, _, name), worker = best
            op = self.apply(name, Dispatched(worker.worker_id, now))
            if op is None:
                self.queues.discard(name)
                continue
            worker.running.add((name, op.attempt))
            worker.last_assigned = now
            self.stats.dispatched += 1
            worker.outbox.send_nowait(("start", name, op.attempt))  # type: ignore[attr-defined]
            count += 1

    def _send_cancel(self, op: Operation) -> None:
        worker = self.workers.get(op.worker_id)
        if worker is not None and (op.name, op.attempt) in worker.running:
            try:
                worker.outbox.send_nowait(("cancel", op.name, op.attempt))  # type: ignore[attr-defined]
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    # -- workers ----------------------------------------------------------------------------------

    def register_worker(
        self,
        worker_id: str,
        properties: Sequence[tuple[str, str]],
        max_inflight: int,
        outbox: object,
    ) -> WorkerState:
        if worker_id in self.workers:
            raise FailedPrecondition(f"a worker with id {worker_id!r} is already connected")
        now = self.now()
        worker = WorkerState(
            worker_id=worker_id,
            properties=worker_properties(properties),
            max_inflight=max(1, max_inflight),
            connected_at=now,
            last_seen=now,
            outbox=outbox,
        )
        self.workers[worker_id] = worker
        log.info(
            "worker connected",
            extra={
                "worker": worker_id,
                "slots": worker.max_inflight,
                "properties": dict(properties),
            },
        )
        self._wake.set()
        return worker

    def cancel_stale_attempt(self, worker: WorkerState, name: str) -> None:
        """The worker says it still runs `name` from an earlier connection: tell it to stop."""
        worker.outbox.send_nowait(("cancel", name, 0))  # type: ignore[attr-defined]

    def worker_seen(self, worker: WorkerState) -> None:
        worker.last_seen = self.now()

    def worker_lost(self, worker: WorkerState, reason: str) -> None:
        """Forget a worker, close its stream and requeue (as a retry) everything it was running.

        Closing the stream matters: a worker dropped while its connection stays open (the
        scheduler stalled past the keepalive timeout) would otherwise never be offered work
        again. It reconnects and registers anew.
        """
        if self.workers.get(worker.worker_id) is not worker:
            return
        del self.workers[worker.worker_id]
        worker.disconnect(reason)
        if worker.running or not worker.going_away:
            self.stats.workers_lost += 1
            log.warning(
                "worker lost",
                extra={
                    "worker": worker.worker_id,
                    "reason": reason,
                    "running": len(worker.running),
                },
            )
        else:
            log.info("worker left after draining", extra={"worker": worker.worker_id})
        now = self.now()
        for name, attempt in sorted(worker.running):
            self.apply(
                name,
                Requeue(
                    worker.worker_id,
                    attempt,
                    now,
                    next(self._seq),
                    f"worker lost ({reason})",
                    max_retries=self.settings.max_job_retries,
                ),
            )
        worker.running.clear()

    def drain_worker(self, worker_id: str, reason: str = "requested by an operator") -> bool:
        """Give the worker no new work and ask it to finish, disconnect and exit."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        worker.going_away = True
        try:
            worker.outbox.send_nowait(("drain", reason, 0))  # type: ignore[attr-defined]
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        log.info("draining worker", extra={"worker": worker_id, "reason": reason})
        return True

    def worker_going_away(self, worker: WorkerState) -> None:
        worker.going_away = True
        log.info("worker going away", extra={"worker": worker.worker_id})

    def progress(self, worker: WorkerState, name: str, attempt: int) -> None:
        self.worker_seen(worker)
        self.apply(name, ProgressReported(worker.worker_id, attempt, self.now()))

    def finished(
        self, worker: WorkerState, name: str, attempt: int, outcome: Outcome, retryable: bool
    ) -> Operation | None:
        self._release(worker, name, attempt)
        return self.apply(
            name,
            Finished(
                worker.worker_id,
                attempt,
                self.now(),
                next(self._seq),
                outcome,
                retryable=retryable,
                max_retries=self.settings.max_job_retries,
            ),
        )

    def declined(self, worker: WorkerState, name: str, attempt: int, reason: str) -> None:
        self._release(worker, name, attempt)
        worker.paused_until = self.now() + self.settings.decline_pause_s
        self.apply(
            name,
            Requeue(
                worker.worker_id,
                attempt,
                self.now(),
                next(self._seq),
                f"declined: {reason}",
                counts=False,
                max_retries=self.settings.max_job_retries,
                max_declines=self.settings.max_declines,
            ),
        )

    def release(self, worker: WorkerState, name: str, attempt: int) -> None:
        """Free the slot of an attempt the worker will never report on."""
        worker.running.discard((name, attempt))
        self._wake.set()

    def _release(self, worker: WorkerState, name: str, attempt: int) -> None:
        self.worker_seen(worker)
        worker.running.discard((name, attempt))
        self._wake.set()

    # -- timers -----------------------------------------------------------------------------------

    async def _run_monitor(self, tick_s: float | None = None) -> None:
        tick = tick_s or max(0.05, min(1.0, self.settings.worker_timeout_s / 4))
        while True:
            await trio.sleep(tick)
            self.check_timers()

    def check_timers(self) -> None:
        s = self.settings
        now = self.now()
        for worker in list(self.workers.values()):
            if now - worker.last_seen > s.worker_timeout_s:
                self.worker_lost(worker, f"no keepalive for {s.worker_timeout_s:g}s")
            elif worker.paused_until and now >= worker.paused_until:
                worker.paused_until = 0.0
                self._wake.set()
        if s.max_action_executing_timeout_s > 0:
            for worker in list(self.workers.values()):
                for name, attempt in list(worker.running):
                    op = self.store.get(name)
                    if op is None or op.stage is not Stage.EXECUTING or op.attempt != attempt:
                        continue
                    if now - op.last_progress_at > s.max_action_executing_timeout_s:
                        self._send_cancel(op)
                        self.apply(
                            name,
                            Requeue(
                                worker.worker_id,
                                attempt,
                                now,
                                next(self._seq),
                                f"no progress for {s.max_action_executing_timeout_s:g}s",
                                max_retries=s.max_job_retries,
                            ),
                        )
        if s.client_action_timeout_s > 0:
            for name, since in list(self._unwatched.items()):
                # Entries exist only while waiters == 0, so `since` is the detach time even
                # when that was 0.0 (a clock that starts at zero).
                if now - since > s.client_action_timeout_s:
                    self.stats.cancelled_unwatched += 1
                    self.apply(
                        name,
                        Cancel(now, f"no client waited for {s.client_action_timeout_s:g}s"),
                    )
        while self._retained and now - self._retained[0][0] > s.retain_completed_for_s:
            _, name = self._retained.popleft()
            op = self.store.get(name)
            if op is not None and op.done:
                self.store.delete(op)

    # -- introspection ----------------------------------------------------------------------------

    def queue_depths(self) -> dict[QueueKey, int]:
        return self.queues.depths()

    def operations_by_stage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.store:
            out[op.stage.name] = out.get(op.stage.name, 0) + 1
        return out
