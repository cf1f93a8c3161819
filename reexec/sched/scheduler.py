"""The scheduler core: applies transitions to operation records kept in a state store.

Everything that happens to an operation goes through `Scheduler.apply`: read the record, run
the pure `transition(record, event)`, and write the result with a compare-and-set on the
record's version (`StateStore.compare_and_set`, which updates the queues and other indexes in
the same atomic step). When the compare-and-set fails (another task of this process, or another
scheduler sharing the Redis store, wrote the record in between) apply re-reads and re-applies,
up to MAX_CAS_ATTEMPTS; conflicts are counted (`stats.conflicts`, a metric). gRPC handlers,
worker streams and timers only feed events in and read records out.

What a scheduler keeps for itself: the streams of the workers connected to it (their slots and
running attempts), which it publishes to the store as leases so other schedulers can tell a
worker that moved (it brings its attempts along) from one whose scheduler died (its attempts are
requeued when the lease expires). Changes written by other schedulers arrive as change
messages: they wake the dispatcher and cancel attempts our workers run that were superseded.

    Scheduler.run
    └─ nursery
       ├─ StateStore.run       connections and the change listener (Redis)
       ├─ _run_dispatcher      matches queued operations to free local workers
       ├─ _run_monitor         keepalives, leases, stuck and unwatched actions, expiry
       └─ _run_cache_checks    one child task per new operation (AC lookup)
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from reexec.cas.action_cache import ActionCache, ActionKey
from reexec.cas.digest import Digest, DigestFunction
from reexec.errors import FailedPrecondition, ResourceExhausted, Unavailable
from reexec.metrics import SCHEDULER_CAS_CONFLICTS as CAS_CONFLICTS
from reexec.metrics import SCHEDULER_CAS_EXHAUSTED as CAS_GAVE_UP
from reexec.sched.action_blobs import ActionBlobs
from reexec.sched.change_log import completion_label, log_change, observe_durations
from reexec.sched.config import SchedulerConfig
from reexec.sched.matching import QueueKey, matches, worker_properties
from reexec.sched.memory_state import MemoryStateStore
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
from reexec.sched.state_store import Change, QueueHead, StateStore, StateUnavailable, WorkerLease
from reexec.sched.workers import WorkerState, pick_worker

log = logging.getLogger(__name__)

# A transition that loses this many compare-and-sets in a row gives up (UNAVAILABLE): the
# record is being rewritten faster than we can read it, which only a bug or a storm causes.
MAX_CAS_ATTEMPTS = 50

# An operation still in CACHE_CHECK this long after it was created lost its check.
STUCK_CACHE_CHECK_S = 30.0

# Records this process wrote or read last, for synchronous readers (status); bounded.
RECENT_RECORDS = 50_000


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
    conflicts: int = 0
    adopted: int = 0
    leases_expired: int = 0


@dataclass
class SharedView:
    """What the monitor last read of the shared state (for synchronous status readers)."""

    queue_depths: dict[QueueKey, int] = field(default_factory=dict)
    operations_by_stage: dict[str, int] = field(default_factory=dict)
    leases: dict[str, WorkerLease] = field(default_factory=dict)
    read_at: float = 0.0
    available: bool = True


def action_key_of(op: Operation) -> ActionKey:
    instance, h, size, fn = op.action_key
    return ActionKey(instance, Digest(h, size, DigestFunction(fn)))


class Scheduler:
    def __init__(
        self,
        settings: SchedulerConfig,
        ac: ActionCache,
        store: StateStore | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.settings = settings
        self.ac = ac
        self.store: StateStore = store if store is not None else MemoryStateStore()
        self.store.on_change(self._on_remote_change)
        self.workers: dict[str, WorkerState] = {}
        self.stats = SchedulerStats()
        self.view = SharedView()
        self._wake = trio.Event()
        self._recent: OrderedDict[str, Operation] = OrderedDict()
        # Action and Command bytes of validated Executes, taken when their start is built.
        self.action_blobs = ActionBlobs()
        self._lease_checked_at = -math.inf
        # Cache checks this process runs now (so the stuck-check sweep does not repeat them).
        self._checking: set[str] = set()
        # Called with (old, new) after every transition this process applied, on the Trio
        # thread; must not block or raise (e.g. the status endpoint's journal).
        self.observers: list[Callable[[Operation, Operation], None]] = []
        # New operations whose cache check `run` starts (unbounded: one entry per submit,
        # consumed at once).
        self._cache_checks_in, self._cache_checks_out = trio.open_memory_channel[Operation](
            math.inf
        )
        # Records carry wall-clock seconds (several processes share them); `now` follows
        # `clock` (Trio's, so tests can use a mock clock) shifted to the wall clock once.
        self._clock = clock
        self._wall_offset = time.time() - clock()

    @property
    def shared(self) -> bool:
        return self.store.shared

    # -- clocks ---------------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock() + self._wall_offset

    def wall(self, now: float) -> float:
        return now

    # -- applying events --------------------------------------------------------------------------

    async def apply(self, name: str, event: Event) -> Operation | None:
        """Apply `event` to the named operation; None if the event was stale or the op is gone.

        A real compare-and-set: when the record changed between our read and our write, read
        it again and apply the event to what is there now (it may have become stale)."""
        # With a shared store, first try the record as this process last wrote or read it
        # (saves a round trip when no one else wrote it since, the common case); a stale
        # copy only costs a failed compare-and-set, and nothing is concluded from it.
        cached = self._recent.get(name) if self.store.shared else None
        for _ in range(MAX_CAS_ATTEMPTS):
            if cached is not None:
                old, cached, fresh = cached, None, False
            else:
                fresh = True
                got = await self.store.get(name)
                if got is None:
                    self._recent.pop(name, None)
                    return None
                old = got
            try:
                new = transition(old, event)
            except StaleEvent as e:
                if not fresh:
                    continue
                log.debug("stale event: %s", e)
                self._remember(old)
                return None
            if await self.store.compare_and_set(old, new):
                break
            # Lost to another writer (since our read, or since our cached copy).
            self.stats.conflicts += 1
            CAS_CONFLICTS.inc()
        else:
            CAS_GAVE_UP.inc()
            raise Unavailable(
                f"operation {name} changed {MAX_CAS_ATTEMPTS} times during one transition; retry"
            )
        self._after_change(old, new, event)
        return new

    def _after_change(self, old: Operation, new: Operation, event: Event) -> None:
        self._remember(new)
        if new.stage is Stage.QUEUED and (
            old.stage is not Stage.QUEUED or old.queue_seq != new.queue_seq
        ):
            self._wake.set()
        if isinstance(event, Cancel):
            self._cancel_on_worker(old, new)
        observe_durations(old, new)
        if new.retries > old.retries:
            self.stats.retries += 1
        if new.done and not old.done:
            label = completion_label(new)
            self.stats.completed[label] = self.stats.completed.get(label, 0) + 1
        log_change(old, new)
        for observe in self.observers:
            observe(old, new)

    def _remember(self, op: Operation) -> None:
        recent = self._recent
        recent[op.name] = op
        recent.move_to_end(op.name)
        while len(recent) > RECENT_RECORDS:
            recent.popitem(last=False)

    def peek(self, name: str) -> Operation | None:
        """The record as this process last saw it, without awaiting (status, web UI)."""
        if isinstance(self.store, MemoryStateStore):
            return self.store.get_now(name)
        return self._recent.get(name)

    def _cancel_on_worker(self, old: Operation, new: Operation) -> None:
        if old.stage is Stage.EXECUTING and (
            new.stage is not Stage.EXECUTING or new.attempt != old.attempt
        ):
            self._send_cancel(old.name, old.worker_id, old.attempt)

    def _on_remote_change(self, change: Change) -> None:
        """Another scheduler changed a record (or the listener missed messages: name "")."""
        if not change.name or change.stage is Stage.QUEUED:
            self._wake.set()
        if not change.name:
            return
        known = self._recent.get(change.name)
        if known is not None and change.version <= known.version:
            # Older than what we wrote or read ourselves: messages from other schedulers
            # arrive late (our dispatch may already be past a requeue they announce).
            return
        for worker in self.workers.values():
            for name, attempt in worker.running:
                if name != change.name:
                    continue
                if (
                    change.stage is not Stage.EXECUTING
                    or change.worker_id != worker.worker_id
                    or change.attempt != attempt
                ):
                    # Cancelled or requeued elsewhere: stop the attempt our worker runs.
                    self._send_cancel(name, worker.worker_id, attempt)

    # -- operations -------------------------------------------------------------------------------

    async def submit(self, spec: ActionSpec) -> tuple[Operation, bool]:
        """A new operation for `spec` with one waiter, or the live one it merges into."""
        now = self.now()
        self.stats.executes += 1
        mergeable = not spec.do_not_cache
        if mergeable:
            live = await self.store.live_for(spec.key)
            # A client that skips the cache must not be answered by the cache check of an
            # operation it would merge into: it waits for its own execution instead.
            if live is not None and spec.skip_cache_lookup and live.stage is Stage.CACHE_CHECK:
                live = None
            if live is not None:
                merged = await self.apply(live.name, WaiterAttached(now))
                if merged is not None:
                    self.stats.merged += 1
                    return merged, True
        live_count = await self.store.live_count()
        if live_count >= self.settings.max_live_operations:
            raise ResourceExhausted(
                f"the scheduler holds {live_count} unfinished operations "
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
        await self.store.create(op, mergeable=mergeable)
        self._remember(op)
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
            except Unavailable as e:
                log.warning("action cache unavailable for %s; executing instead: %s", op.name, e)
                data = None
            except Exception:
                log.exception("action cache lookup failed for %s; executing instead", op.name)
                data = None
            if data is not None:
                hit = Outcome(result=data, cached_result=True)
                self.stats.cache_hits += 1
        seq = 0 if hit is not None else await self.store.next_seq()
        return await self.apply(op.name, CacheChecked(self.now(), seq, hit))

    async def attach(self, name: str) -> Operation | None:
        return await self.apply(name, WaiterAttached(self.now()))

    async def detach(self, name: str) -> None:
        await self.apply(name, WaiterDetached(self.now()))

    async def cancel(self, name: str, reason: str = "cancelled by the client") -> Operation | None:
        return await self.apply(name, Cancel(self.now(), reason))

    # -- tasks ------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the scheduler's background tasks: state store, dispatcher, timers, cache checks."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)
            nursery.start_soon(self._run_dispatcher)
            nursery.start_soon(self._run_monitor)
            nursery.start_soon(self._run_cache_checks)
            task_status.started()

    async def _run_cache_checks(self) -> None:
        async with trio.open_nursery() as checks:
            async for op in self._cache_checks_out:
                checks.start_soon(self._check_cache_logged, op)

    async def _check_cache_logged(self, op: Operation) -> None:
        self._checking.add(op.name)
        try:
            delay = 0.1
            for _ in range(8):  # ~25 s; then the monitor's stuck-check sweep takes over
                try:
                    await self.check_cache(op)
                    return
                except Unavailable as e:
                    log.warning("cache check of %s not recorded: %s", op.name, e.message)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._checking.discard(op.name)

    # -- dispatch ---------------------------------------------------------------------------------

    async def _run_dispatcher(self) -> None:
        # A shared store also polls: a change message lost while the listener reconnected
        # must not leave an operation queued while our workers idle.
        poll = 1.0 if self.shared else math.inf
        delay = 0.1
        while True:
            with trio.move_on_after(poll):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.dispatch_ready()
                delay = 0.1
            except Unavailable as e:
                log.debug("dispatch paused: %s", e.message)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def dispatch_ready(self) -> int:
        """Assign queued operations to free matching local workers; returns how many.

        Claiming is the QUEUED -> EXECUTING compare-and-set: when two schedulers pick the same
        head, one wins and the other sees a stale event and looks again."""
        count = 0
        rules = self.settings.rules
        while True:
            now = self.now()
            free = [w for w in self.workers.values() if w.free_slots(now) > 0]
            if not free:
                return count
            best: tuple[QueueHead, WorkerState] | None = None
            for head in await self.store.queue_heads():
                if best is not None and (head.priority, head.seq) >= (
                    best[0].priority,
                    best[0].seq,
                ):
                    continue
                worker = pick_worker(
                    [w for w in free if matches(head.key, w.properties, rules)],
                    self.settings.allocation,
                )
                if worker is not None:
                    best = (head, worker)
            if best is None:
                return count
            head, worker = best
            op = await self.apply(head.name, Dispatched(worker.worker_id, now))
            if op is None:
                await self.store.queue_discard(head)
                continue
            if self.workers.get(worker.worker_id) is not worker:
                # The worker went away while we claimed: give the attempt back at once.
                await self._requeue(op, "worker left during dispatch", counts=False)
                continue
            worker.running.add((head.name, op.attempt))
            worker.last_assigned = now
            self.stats.dispatched += 1
            worker.outbox.send_nowait(("start", head.name, op.attempt))  # type: ignore[attr-defined]
            count += 1

    def _send_cancel(self, name: str, worker_id: str, attempt: int) -> None:
        worker = self.workers.get(worker_id)
        key = (name, attempt)
        if worker is not None and key in worker.running and key not in worker.cancelled:
            worker.cancelled.add(key)
            try:
                worker.outbox.send_nowait(("cancel", name, attempt))  # type: ignore[attr-defined]
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    async def _requeue(self, op: Operation, reason: str, *, counts: bool = True) -> None:
        await self.apply(
            op.name,
            Requeue(
                op.worker_id,
                op.attempt,
                self.now(),
                await self.store.next_seq(),
                reason,
                counts=counts,
                max_retries=self.settings.max_job_retries,
                max_declines=self.settings.max_declines,
            ),
        )

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

    async def adopt(
        self,
        worker: WorkerState,
        attempts: Sequence[tuple[str, int]],
        pending: Sequence[str] = (),
    ) -> list[str]:
        """The worker says it still runs these attempts: keep the ones the state says are its
        current attempts (it moved here from another scheduler, or reconnected within its
        lease), and return the names it must cancel (requeued or finished meanwhile).
        `attempt` 0 means "unknown" (an older worker): the record's attempt is taken.

        With shared state, attempts the records assign to this worker that it neither runs
        nor holds a result of (`pending`) are requeued: it lost them (restarted, or its
        result was not recorded), and nobody else will report them."""
        worker.adopting = True
        try:
            return await self._adopt(worker, attempts, pending)
        finally:
            worker.adopting = False
            self._wake.set()  # its free slots are known now

    async def _adopt(
        self,
        worker: WorkerState,
        attempts: Sequence[tuple[str, int]],
        pending: Sequence[str],
    ) -> list[str]:
        stale = []
        if self.shared:
            known = {name for name, _ in attempts} | set(pending)
            for name, worker_id in (await self.store.executing()).items():
                if worker_id != worker.worker_id or name in known:
                    continue
                op = await self.store.get(name)
                if op is not None and op.stage is Stage.EXECUTING and op.worker_id == worker_id:
                    await self._requeue(op, f"worker {worker_id} came back without it")
        for name, attempt in attempts:
            op = await self.store.get(name)
            if (
                op is not None
                and op.stage is Stage.EXECUTING
                and op.worker_id == worker.worker_id
                and attempt in (0, op.attempt)
            ):
                worker.running.add((name, op.attempt))
                self._remember(op)
                self.stats.adopted += 1
                log.info(
                    "worker brought its running attempt along",
                    extra={"worker": worker.worker_id, "operation": name, "attempt": op.attempt},
                )
            else:
                stale.append(name)
        await self._publish_leases([worker])
        return stale

    def cancel_stale_attempt(self, worker: WorkerState, name: str) -> None:
        """The worker says it still runs `name` from an earlier connection: tell it to stop."""
        worker.outbox.send_nowait(("cancel", name, 0))  # type: ignore[attr-defined]

    def worker_seen(self, worker: WorkerState) -> None:
        worker.last_seen = self.now()

    async def worker_lost(self, worker: WorkerState, reason: str, *, silent: bool = False) -> None:
        """Forget a worker, close its stream and deal with what it was running.

        Closing the stream matters: a worker dropped while its connection stays open (the
        scheduler stalled past the keepalive timeout) would otherwise never be offered work
        again. It reconnects and registers anew.

        With this process's own state (memory), or when the worker fell `silent`, its attempts
        are requeued now (as retries). With shared state, a worker whose connection merely
        ended keeps its attempts for the lease time: it may reconnect to any scheduler and
        report them; the lease check requeues them if it does not.
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
        running = sorted(worker.running)
        worker.running.clear()
        worker.cancelled.clear()
        if self.shared:
            holder = (await self.store.leases()).get(worker.worker_id)
            if (
                holder is not None
                and holder.scheduler_id not in ("", self.store.scheduler_id)
                and holder.until >= self.now()
            ):
                # It registered with another scheduler meanwhile (we stalled, or its stream to
                # us broke): its attempts went with it. Requeueing them would run them twice.
                log.info(
                    "worker moved to another scheduler with its attempts",
                    extra={"worker": worker.worker_id, "scheduler": holder.scheduler_id},
                )
                return
        if self.shared and not silent:
            await self.store.put_leases(
                [
                    WorkerLease(
                        worker.worker_id,
                        "",
                        self.now() + self.settings.state.worker_lease_s,
                        worker.max_inflight,
                        len(running),
                    )
                ]
            )
            return
        if self.shared:
            await self.store.drop_lease(worker.worker_id)
        now = self.now()
        for name, attempt in running:
            await self.apply(
                name,
                Requeue(
                    worker.worker_id,
                    attempt,
                    now,
                    await self.store.next_seq(),
                    f"worker lost ({reason})",
                    max_retries=self.settings.max_job_retries,
                ),
            )

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

    async def progress(self, worker: WorkerState, name: str, attempt: int) -> None:
        self.worker_seen(worker)
        await self.apply(name, ProgressReported(worker.worker_id, attempt, self.now()))

    async def finished(
        self, worker: WorkerState, name: str, attempt: int, outcome: Outcome, retryable: bool
    ) -> Operation | None:
        # The slot is freed once the report is recorded (or found stale): until then the
        # attempt still counts as the worker's, so no check takes it for a lost one.
        try:
            return await self.apply(
                name,
                Finished(
                    worker.worker_id,
                    attempt,
                    self.now(),
                    await self.store.next_seq() if retryable else 0,
                    outcome,
                    retryable=retryable,
                    max_retries=self.settings.max_job_retries,
                ),
            )
        finally:
            self._release(worker, name, attempt)

    async def declined(self, worker: WorkerState, name: str, attempt: int, reason: str) -> None:
        worker.paused_until = self.now() + self.settings.decline_pause_s
        try:
            await self.apply(
                name,
                Requeue(
                    worker.worker_id,
                    attempt,
                    self.now(),
                    await self.store.next_seq(),
                    f"declined: {reason}",
                    counts=False,
                    max_retries=self.settings.max_job_retries,
                    max_declines=self.settings.max_declines,
                ),
            )
        finally:
            self._release(worker, name, attempt)

    def release(self, worker: WorkerState, name: str, attempt: int) -> None:
        """Free the slot of an attempt the worker will never report on."""
        worker.running.discard((name, attempt))
        worker.cancelled.discard((name, attempt))
        self._wake.set()

    def _release(self, worker: WorkerState, name: str, attempt: int) -> None:
        self.worker_seen(worker)
        worker.running.discard((name, attempt))
        worker.cancelled.discard((name, attempt))
        self._wake.set()

    # -- timers -----------------------------------------------------------------------------------

    async def _run_monitor(self, tick_s: float | None = None) -> None:
        tick = tick_s or max(0.05, min(1.0, self.settings.worker_timeout_s / 4))
        while True:
            await trio.sleep(tick)
            try:
                await self.check_timers()
            except Unavailable as e:
                self.view.available = False
                log.debug("timers paused: %s", e.message)

    async def check_timers(self) -> None:
        s = self.settings
        now = self.now()
        for worker in list(self.workers.values()):
            if now - worker.last_seen > s.worker_timeout_s:
                await self.worker_lost(
                    worker, f"no keepalive for {s.worker_timeout_s:g}s", silent=True
                )
            elif worker.paused_until and now >= worker.paused_until:
                worker.paused_until = 0.0
                self._wake.set()
        if s.max_action_executing_timeout_s > 0:
            for worker in list(self.workers.values()):
                for name, attempt in list(worker.running):
                    op = await self.store.get(name)
                    if op is None or op.stage is not Stage.EXECUTING or op.attempt != attempt:
                        continue
                    if now - op.last_progress_at > s.max_action_executing_timeout_s:
                        self._send_cancel(name, worker.worker_id, attempt)
                        await self._requeue(
                            op, f"no progress for {s.max_action_executing_timeout_s:g}s"
                        )
        if s.client_action_timeout_s > 0:
            for name in await self.store.unwatched_before(now - s.client_action_timeout_s):
                cancelled = await self.apply(
                    name, Cancel(now, f"no client waited for {s.client_action_timeout_s:g}s")
                )
                # Another scheduler may have cancelled it first: counted once, by the winner.
                self.stats.cancelled_unwatched += cancelled is not None
        # A record left in CACHE_CHECK (its check died with the scheduler that ran it, or
        # could not record its result) is checked again here; several schedulers doing so at
        # once is harmless: the first CacheChecked wins, the others are stale.
        for name in await self.store.checking_before(now - STUCK_CACHE_CHECK_S):
            if name in self._checking:
                continue
            op = await self.store.get(name)
            if op is not None and op.stage is Stage.CACHE_CHECK:
                log.info("checking the cache again for %s (its check never finished)", name)
                self._checking.add(name)
                self._cache_checks_in.send_nowait(op)
        for name in await self.store.completed_before(now - s.retain_completed_for_s):
            op = await self.store.get(name)
            if op is not None and op.done:
                await self.store.delete(op)
                self._recent.pop(name, None)
        if self.shared:
            await self._publish_leases(list(self.workers.values()))
            if now - self._lease_checked_at >= 1.0:
                self._lease_checked_at = now
                await self._expire_leases(now)
            await self._refresh_view(now)

    async def _publish_leases(self, workers: list[WorkerState]) -> None:
        if not self.shared:
            return
        until = self.now() + self.settings.state.worker_lease_s
        await self.store.put_leases(
            [
                WorkerLease(
                    w.worker_id,
                    self.store.scheduler_id,
                    until,
                    w.max_inflight,
                    len(w.running),
                    tuple(sorted((k, v) for k, vs in w.properties.items() for v in vs)),
                )
                for w in workers
                if self.workers.get(w.worker_id) is w
            ]
        )

    async def _expire_leases(self, now: float) -> None:
        """Requeue what workers without a live lease were running (their scheduler died, or
        they did not come back within the lease), and what the records assign to one of our
        workers that it was never given (a dispatch write applied after its reply was lost:
        Redis answered too late, we gave up, it wrote anyway)."""
        executing = await self.store.executing()
        if not executing:
            return
        leases = await self.store.leases()
        settled = now - 2 * self.settings.state.timeout_s  # no write of ours is still in flight
        for name, worker_id in executing.items():
            worker = self.workers.get(worker_id)
            if worker is not None:
                if worker.adopting or any(n == name for n, _ in worker.running):
                    continue
                op = await self.store.get(name)
                if (
                    op is not None
                    and op.stage is Stage.EXECUTING
                    and op.worker_id == worker_id
                    and op.dispatched_at < settled
                    and (name, op.attempt) not in worker.running
                ):
                    await self._requeue(
                        op, f"worker {worker_id} was never given this attempt", counts=False
                    )
                continue
            lease = leases.get(worker_id)
            if lease is not None and lease.until >= now:
                continue
            op = await self.store.get(name)
            if op is None or op.stage is not Stage.EXECUTING or op.worker_id != worker_id:
                continue
            self.stats.leases_expired += 1
            owner = (
                f" (held by scheduler {lease.scheduler_id})" if lease and lease.scheduler_id else ""
            )
            await self._requeue(op, f"worker {worker_id}'s lease expired{owner}")

    async def _refresh_view(self, now: float) -> None:
        if now - self.view.read_at < 1.0:
            return
        self.view = SharedView(
            queue_depths=await self.store.queue_depths(),
            operations_by_stage=await self.store.stage_counts(),
            leases=await self.store.leases(),
            read_at=now,
            available=True,
        )

    # -- introspection (synchronous: for status and metrics) --------------------------------------

    def queue_depths(self) -> dict[QueueKey, int]:
        if isinstance(self.store, MemoryStateStore):
            return self.store.depths_now()
        return self.view.queue_depths

    def operations_by_stage(self) -> dict[str, int]:
        if isinstance(self.store, MemoryStateStore):
            return self.store.stage_counts_now()
        return self.view.operations_by_stage

    def queued(self) -> int:
        return sum(self.queue_depths().values())


__all__ = ["ActionSpec", "Scheduler", "SchedulerStats", "StateUnavailable", "action_key_of"]
