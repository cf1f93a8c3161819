"""A bounded journal of recent operations and per-minute series, fed by `Scheduler.observers`.

The scheduler forgets a completed operation once it expires; people debugging a build want it
afterwards, and the web UI's plots want the last hour. `Journal.observe(old, new)` keeps one
`Entry` per operation (a summary plus the serialized ActionResult, never blobs) and per-minute
`Bucket`s of executions, queue waits, execution times and queue depth.

Bounds, all enforced on insert: at most `max_operations` entries and `max_bytes` of their
estimated size (the oldest entry goes first, running or not); an ActionResult larger than
`max_result_bytes` is dropped from its entry (`result_dropped`); buckets older than
`window_s` are pruned and each bucket keeps at most `max_samples` waits and durations (later
samples in a busy minute are counted but not kept, so its percentiles describe its first ones).

Pure bookkeeping: no I/O, no clock of its own. Times come from the records (the scheduler's
monotonic clock) and become wall-clock seconds through `wall`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from reexec import fastpb
from reexec.sched.state import Operation, Stage

_ENTRY_OVERHEAD = 600  # bytes per entry besides its strings: the object, the dict slot


@dataclass(frozen=True, slots=True)
class Entry:
    """What the journal remembers of one operation (wall-clock seconds; 0 = not yet)."""

    name: str
    instance: str
    action_hash: str
    action_size: int
    digest_function: int
    stage: Stage
    worker_id: str = ""
    last_worker_id: str = ""
    attempt: int = 0
    retries: int = 0
    declines: int = 0
    history: tuple[str, ...] = ()
    queue_key: tuple[tuple[str, str], ...] = ()
    priority: int = 0
    created_at: float = 0.0
    queued_at: float = 0.0
    dispatched_at: float = 0.0
    completed_at: float = 0.0
    status: int = 0  # google.rpc.Code of the outcome
    message: str = ""
    exit_code: int | None = None
    cached: bool = False
    result: bytes = b""  # serialized ActionResult
    result_dropped: bool = False

    @property
    def outcome(self) -> str:
        """One word for lists and filters: running, cached, ok, failed (exit != 0) or error."""
        if self.stage is not Stage.COMPLETED:
            return "running"
        if self.status != 0:
            return "error"
        if self.cached:
            return "cached"
        return "failed" if self.exit_code else "ok"

    @property
    def failed(self) -> bool:
        return self.outcome in ("failed", "error")

    def cost(self) -> int:
        return (
            _ENTRY_OVERHEAD
            + len(self.name)
            + len(self.instance)
            + len(self.action_hash)
            + len(self.message)
            + len(self.result)
            + sum(len(h) for h in self.history)
        )


@dataclass(slots=True)
class Bucket:
    """One minute of activity."""

    minute: int  # wall-clock seconds // 60
    completed: int = 0
    executed: int = 0  # completed after running on a worker (not cache hits, not cancels)
    queue_waits: list[float] = field(default_factory=list)
    exec_times: list[float] = field(default_factory=list)
    max_depth: int = 0


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank percentile (0 < p <= 100) of `values`, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _exit_code(result: bytes) -> int | None:
    if not result:
        return None
    msg = fastpb.ActionResult()
    try:
        msg.MergeFromString(result)
    except Exception:
        return None
    return msg.exit_code


class Journal:
    def __init__(
        self,
        *,
        max_operations: int = 10_000,
        max_bytes: int = 64 << 20,
        max_result_bytes: int = 256 << 10,
        window_s: float = 3600.0,
        max_samples: int = 2_000,
        wall: Callable[[float], float] = lambda t: t,
    ) -> None:
        self.max_operations = max_operations
        self.max_bytes = max_bytes
        self.max_result_bytes = max_result_bytes
        self.window_s = window_s
        self.max_samples = max_samples
        self._wall = wall
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # oldest first
        self._bytes = 0
        self._buckets: OrderedDict[int, Bucket] = OrderedDict()  # oldest minute first
        self._queued: set[str] = set()
        self.evicted = 0

    # -- feeding ------------------------------------------------------------------------------

    def observe(self, old: Operation, new: Operation) -> None:
        """Record a transition; never raises on any pair of records of one operation."""
        previous = self._entries.get(new.name)
        entry = self._entry(new, previous)
        if previous is not None:
            self._bytes -= previous.cost()
            self._entries[new.name] = entry
        else:
            self._entries[new.name] = entry
        self._bytes += entry.cost()
        self._count(old, new, entry)
        self._evict()

    def _entry(self, op: Operation, previous: Entry | None) -> Entry:
        instance, h, size, fn = op.action_key
        w = self._wall
        outcome = op.outcome if op.done else None
        result = outcome.result if outcome is not None else b""
        dropped = len(result) > self.max_result_bytes
        return Entry(
            name=op.name,
            instance=instance,
            action_hash=h,
            action_size=size,
            digest_function=fn,
            stage=op.stage,
            worker_id=op.worker_id,
            last_worker_id=op.worker_id or (previous.last_worker_id if previous else ""),
            attempt=op.attempt,
            retries=op.retries,
            declines=op.declines,
            history=op.history,
            queue_key=op.queue_key,
            priority=op.priority,
            created_at=w(op.created_at) if op.created_at else 0.0,
            queued_at=w(op.queued_at) if op.queued_at else 0.0,
            dispatched_at=w(op.dispatched_at) if op.dispatched_at else 0.0,
            completed_at=w(op.completed_at) if op.done and op.completed_at else 0.0,
            status=int(outcome.status.value) if outcome is not None else 0,
            message=outcome.message if outcome is not None else "",
            exit_code=_exit_code(result),
            cached=outcome.cached_result if outcome is not None else False,
            result=b"" if dropped else result,
            result_dropped=dropped,
        )

    def _count(self, old: Operation, new: Operation, entry: Entry) -> None:
        if new.stage is Stage.QUEUED:
            self._queued.add(new.name)
        else:
            self._queued.discard(new.name)
        if new.stage is Stage.QUEUED and old.stage is not Stage.QUEUED:
            bucket = self._bucket(entry.queued_at)
            bucket.max_depth = max(bucket.max_depth, len(self._queued))
        if new.done and not old.done:
            bucket = self._bucket(entry.completed_at)
            bucket.completed += 1
            ran = old.stage is Stage.EXECUTING and not entry.cached and entry.status == 0
            if ran:
                bucket.executed += 1
                if len(bucket.exec_times) < self.max_samples:
                    bucket.exec_times.append(max(0.0, new.completed_at - new.dispatched_at))
        if new.stage is Stage.EXECUTING and old.stage is Stage.QUEUED:
            bucket = self._bucket(entry.dispatched_at)
            if len(bucket.queue_waits) < self.max_samples:
                bucket.queue_waits.append(max(0.0, new.dispatched_at - old.queued_at))

    def _bucket(self, at: float) -> Bucket:
        minute = int(at // 60)
        bucket = self._buckets.get(minute)
        if bucket is None:
            bucket = self._buckets[minute] = Bucket(minute)
            # Records arrive in time order on one clock, so new minutes come last.
            horizon = minute - math.ceil(self.window_s / 60)
            while self._buckets:
                first = next(iter(self._buckets))
                if first > horizon:
                    break
                del self._buckets[first]
        return bucket

    def _evict(self) -> None:
        while self._entries and (
            len(self._entries) > self.max_operations or self._bytes > self.max_bytes
        ):
            name, entry = self._entries.popitem(last=False)
            self._bytes -= entry.cost()
            self._queued.discard(name)
            self.evicted += 1

    # -- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def newest_first(self) -> Iterator[Entry]:
        return reversed(self._entries.values())

    def by_action(self, action_hash: str, action_size: int) -> list[Entry]:
        """Every retained operation of one Action digest, newest first."""
        return [
            e
            for e in self.newest_first()
            if e.action_hash == action_hash and e.action_size == action_size
        ]

    def buckets(self, now: float) -> list[Bucket]:
        """One bucket per minute of the window ending at `now` (wall seconds), oldest first;
        minutes without activity are empty buckets."""
        last = int(now // 60)
        first = last - math.ceil(self.window_s / 60) + 1
        return [self._buckets.get(m) or Bucket(m) for m in range(first, last + 1)]


__all__ = ["Bucket", "Entry", "Journal", "percentile"]
