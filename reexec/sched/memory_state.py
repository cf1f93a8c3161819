"""MemoryStateStore: the scheduler's state in this process's memory (`type = "memory"`).

The embedded default of `reexecd serve`: nothing to deploy, nothing survives a restart. Only the
owning process writes, and no method awaits between reading and writing, so a compare-and-set
here fails only when two tasks of this process interleave a read and a write of one record
(which the scheduler retries exactly as it would with Redis).
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Callable

import trio

from reexec.sched.matching import QueueKey
from reexec.sched.queue import PlatformQueues
from reexec.sched.state import Operation
from reexec.sched.state_store import (
    ActionKeyTuple,
    Change,
    IndexChange,
    QueueHead,
    WorkerLease,
    index_change,
)


class MemoryStateStore:
    shared = False

    def __init__(self, scheduler_id: str = "local") -> None:
        self.scheduler_id = scheduler_id
        self._ops: dict[str, Operation] = {}
        self._live_by_key: dict[ActionKeyTuple, str] = {}
        self._changed: dict[str, trio.Event] = {}
        self._live = 0
        self._seq = 0
        self._queues = PlatformQueues()
        self._unwatched: dict[str, float] = {}
        self._completed: list[tuple[float, str]] = []  # heap; stale entries skipped
        self._executing: dict[str, str] = {}
        self._checking: dict[str, float] = {}
        self._leases: dict[str, WorkerLease] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def on_change(self, callback: Callable[[Change], None]) -> None:
        pass  # no other process writes here

    async def sync(self) -> None:
        pass  # changes take effect at once

    # -- records ----------------------------------------------------------------------------

    async def get(self, name: str) -> Operation | None:
        return self._ops.get(name)

    def get_now(self, name: str) -> Operation | None:
        """The record without awaiting (for synchronous readers in tests and status)."""
        return self._ops.get(name)

    async def create(self, op: Operation, *, mergeable: bool) -> bool:
        if op.name in self._ops:
            return False
        self._ops[op.name] = op
        if mergeable and op.action_key not in self._live_by_key:
            self._live_by_key[op.action_key] = op.name
        self._index(op, index_change(None, op))
        self._notify(op.name)
        return True

    async def compare_and_set(self, expected: Operation, new: Operation) -> bool:
        current = self._ops.get(expected.name)
        if current is None or current.version != expected.version:
            return False
        self._ops[new.name] = new
        self._index(new, index_change(current, new))
        self._notify(new.name)
        return True

    async def delete(self, op: Operation) -> bool:
        current = self._ops.get(op.name)
        if current is None or current.version != op.version:
            return False
        del self._ops[op.name]
        self._live -= not current.done
        if self._live_by_key.get(op.action_key) == op.name:
            del self._live_by_key[op.action_key]
        self._queues.discard(op.name)
        self._unwatched.pop(op.name, None)
        self._executing.pop(op.name, None)
        self._checking.pop(op.name, None)
        self._notify(op.name)
        return True

    def _index(self, op: Operation, ix: IndexChange) -> None:
        name = op.name
        if ix.queue_remove is not None:
            self._queues.discard(name)
        if ix.queue_add is not None:
            key, priority, seq = ix.queue_add
            self._queues.push(key, priority, seq, name)
        if ix.release_live and self._live_by_key.get(op.action_key) == name:
            del self._live_by_key[op.action_key]
        self._live += ix.live_delta
        if ix.unwatched_clear:
            self._unwatched.pop(name, None)
        if ix.unwatched_since is not None:
            self._unwatched[name] = ix.unwatched_since
        if ix.completed_at is not None:
            heapq.heappush(self._completed, (ix.completed_at, name))
        if ix.executing_clear:
            self._executing.pop(name, None)
        if ix.executing_worker is not None:
            self._executing[name] = ix.executing_worker
        if ix.checking_clear:
            self._checking.pop(name, None)
        if ix.checking_since is not None:
            self._checking[name] = ix.checking_since

    def _notify(self, name: str) -> None:
        event = self._changed.pop(name, None)
        if event is not None:
            event.set()

    async def wait_changed(self, op: Operation) -> Operation | None:
        current = self._ops.get(op.name)
        while current is not None and current.version == op.version:
            event = self._changed.get(op.name)
            if event is None:
                event = self._changed[op.name] = trio.Event()
            await event.wait()
            current = self._ops.get(op.name)
        return current

    async def live_for(self, key: ActionKeyTuple) -> Operation | None:
        name = self._live_by_key.get(key)
        return self._ops.get(name) if name else None

    @property
    def live(self) -> int:
        """Unfinished operations, without awaiting."""
        return self._live

    async def live_count(self) -> int:
        return self._live

    async def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def count(self) -> int:
        return len(self._ops)

    async def operations(self) -> AsyncIterator[Operation]:
        for op in list(self._ops.values()):
            yield op

    def snapshot(self) -> list[Operation]:
        return list(self._ops.values())

    def stage_counts_now(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self._ops.values():
            out[op.stage.name] = out.get(op.stage.name, 0) + 1
        return out

    async def stage_counts(self) -> dict[str, int]:
        return self.stage_counts_now()

    @property
    def queues(self) -> PlatformQueues:
        """The platform queues (read-only use: tests and introspection)."""
        return self._queues

    def depths_now(self) -> dict[QueueKey, int]:
        return self._queues.depths()

    # -- indexes ----------------------------------------------------------------------------

    async def queue_heads(self) -> list[QueueHead]:
        heads = []
        for key in self._queues.keys():
            head = self._queues.head(key)
            if head is not None:
                heads.append(QueueHead(key, head[0], head[1], head[2], head[2]))
        return heads

    async def queue_discard(self, head: QueueHead) -> None:
        op = self._ops.get(head.name)
        if op is None or op.queue_seq != head.seq or op.done:
            self._queues.discard(head.name)

    async def queue_depths(self) -> dict[QueueKey, int]:
        return self._queues.depths()

    async def unwatched_before(self, t: float) -> list[str]:
        return [name for name, since in self._unwatched.items() if since < t]

    async def completed_before(self, t: float) -> list[str]:
        out = []
        heap = self._completed
        while heap and heap[0][0] < t:
            _, name = heapq.heappop(heap)
            op = self._ops.get(name)
            if op is not None and op.done:
                out.append(name)
        return out

    async def checking_before(self, t: float) -> list[str]:
        return [name for name, since in self._checking.items() if since < t]

    async def executing(self) -> dict[str, str]:
        return dict(self._executing)

    # -- worker leases ----------------------------------------------------------------------

    async def put_leases(self, leases: list[WorkerLease]) -> None:
        for lease in leases:
            self._leases[lease.worker_id] = lease

    async def drop_lease(self, worker_id: str) -> None:
        lease = self._leases.get(worker_id)
        if lease is not None and lease.scheduler_id == self.scheduler_id:
            del self._leases[worker_id]

    async def forget_lease(self, lease: WorkerLease) -> None:
        if self._leases.get(lease.worker_id) == lease:
            del self._leases[lease.worker_id]

    async def leases(self) -> dict[str, WorkerLease]:
        return dict(self._leases)
