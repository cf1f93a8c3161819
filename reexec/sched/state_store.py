"""The scheduler state store: where operation records, queues and worker leases live.

Two implementations share this interface: `MemoryStateStore` (one process, the embedded
default of `reexecd serve`) and `RedisStateStore` (several scheduler processes share one
Redis). A record is written only by `compare_and_set(expected, new)`, which succeeds iff the
stored version is still `expected.version`; the scheduler re-reads and re-applies the pure
transition when it fails. The derived indexes (platform queues, the in-flight dedup index,
unwatched and completed operations, executing operations, the live count) are updated in the
same atomic step from the (old, new) pair, as computed by `index_change` below, so they can
never disagree with the records.

Nothing here knows about workers' streams: a scheduler keeps its own connected workers and
only publishes their leases here so other schedulers can tell a worker that moved from one
whose scheduler died.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import trio

from reexec.errors import Unavailable
from reexec.sched.matching import QueueKey
from reexec.sched.state import Operation, Stage

ActionKeyTuple = tuple[str, str, int, int]


class StateUnavailable(Unavailable):
    """The shared state store cannot be reached; clients get UNAVAILABLE and retry."""


@dataclass(frozen=True, slots=True)
class QueueHead:
    """The operation to run next from one platform queue."""

    key: QueueKey
    priority: int
    seq: int
    name: str
    token: object  # what `queue_discard` needs to drop this entry (store-specific)


@dataclass(frozen=True, slots=True)
class WorkerLease:
    """A worker as every scheduler sharing the store sees it."""

    worker_id: str
    scheduler_id: str  # "" while the worker is between connections
    until: float  # wall-clock seconds; past it, its executing operations are requeued
    slots: int = 0
    running: int = 0
    properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Change:
    """A record changed (published to every scheduler sharing the store)."""

    name: str
    version: int
    stage: Stage
    worker_id: str
    attempt: int
    origin: str  # scheduler id of the writer


@dataclass(frozen=True, slots=True)
class IndexChange:
    """How the derived indexes follow one record change. Pure data, computed from (old, new)."""

    queue_remove: tuple[QueueKey, int, int] | None = None  # (key, priority, seq) of old entry
    queue_add: tuple[QueueKey, int, int] | None = None
    release_live: bool = False  # drop the dedup entry if it still names this operation
    live_delta: int = 0
    unwatched_since: float | None = None  # set (watch timer starts)
    unwatched_clear: bool = False
    completed_at: float | None = None
    executing_worker: str | None = None  # set executing[name] = worker
    executing_clear: bool = False
    checking_since: float | None = None  # entered CACHE_CHECK (a check must finish it)
    checking_clear: bool = False


def index_change(old: Operation | None, new: Operation) -> IndexChange:
    """The index updates that turn the indexes of `old` into those of `new`."""
    old_queued = old is not None and old.stage is Stage.QUEUED
    new_queued = new.stage is Stage.QUEUED
    queue_remove = queue_add = None
    if old_queued and old is not None and (not new_queued or old.queue_seq != new.queue_seq):
        queue_remove = (old.queue_key, old.priority, old.queue_seq)
    if new_queued and (not old_queued or old is None or old.queue_seq != new.queue_seq):
        queue_add = (new.queue_key, new.priority, new.queue_seq)
    old_done = old is not None and old.done
    live_delta = int(not new.done) - (0 if old is None else int(not old.done))
    watched_now = new.waiters > 0 or new.done
    old_unwatched = old is not None and old.waiters == 0 and not old.done
    old_exec = old is not None and old.stage is Stage.EXECUTING
    new_exec = new.stage is Stage.EXECUTING
    return IndexChange(
        queue_remove=queue_remove,
        queue_add=queue_add,
        release_live=new.done and not old_done,
        live_delta=live_delta,
        unwatched_since=None if watched_now or old_unwatched else new.unwatched_since,
        unwatched_clear=watched_now and (old is None or old_unwatched),
        completed_at=new.completed_at if new.done and not old_done else None,
        executing_worker=new.worker_id
        if new_exec and (not old_exec or old is None or old.worker_id != new.worker_id)
        else None,
        executing_clear=old_exec and not new_exec,
        checking_since=new.created_at
        if new.stage is Stage.CACHE_CHECK and (old is None or old.stage is not Stage.CACHE_CHECK)
        else None,
        checking_clear=old is not None
        and old.stage is Stage.CACHE_CHECK
        and new.stage is not Stage.CACHE_CHECK,
    )


# -- records on the wire (Redis) -------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Operation)


def encode_operation(op: Operation) -> bytes:
    return _encoder.encode(op)


def decode_operation(data: bytes) -> Operation:
    return _decoder.decode(data)


class StateStore(Protocol):
    """What the scheduler core needs from its state. Every method may raise StateUnavailable."""

    # True when other processes write the same state (records can change under us, workers
    # of other schedulers execute operations, and a worker may move here with its attempts).
    shared: bool
    scheduler_id: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own connections and the change listener until cancelled."""
        ...

    def on_change(self, callback: Callable[[Change], None]) -> None:
        """Call `callback` for changes written by other processes (never for our own)."""
        ...

    async def get(self, name: str) -> Operation | None: ...

    async def create(self, op: Operation, *, mergeable: bool) -> bool:
        """Insert a new record; with `mergeable`, index it for in-flight deduplication."""
        ...

    async def compare_and_set(self, expected: Operation, new: Operation) -> bool: ...

    async def delete(self, op: Operation) -> bool: ...

    async def live_for(self, key: ActionKeyTuple) -> Operation | None: ...

    async def live_count(self) -> int: ...

    async def next_seq(self) -> int: ...

    async def wait_changed(self, op: Operation) -> Operation | None:
        """Wait until the record moves past `op.version`; None if it was deleted."""
        ...

    async def queue_heads(self) -> list[QueueHead]: ...

    async def queue_discard(self, head: QueueHead) -> None: ...

    async def queue_depths(self) -> dict[QueueKey, int]: ...

    async def unwatched_before(self, t: float) -> list[str]: ...

    async def completed_before(self, t: float) -> list[str]: ...

    async def checking_before(self, t: float) -> list[str]:
        """Operations in CACHE_CHECK since before `t` (their check may have died with the
        scheduler that ran it)."""
        ...

    async def executing(self) -> dict[str, str]:
        """name -> worker id of every executing operation."""
        ...

    async def put_leases(self, leases: list[WorkerLease]) -> None: ...

    async def drop_lease(self, worker_id: str) -> None:
        """Forget the worker's lease if this scheduler holds it."""
        ...

    async def leases(self) -> dict[str, WorkerLease]: ...

    def operations(self) -> AsyncIterator[Operation]:
        """Every record (for listing and status; may be slow on a large store)."""
        ...

    async def count(self) -> int: ...

    async def stage_counts(self) -> dict[str, int]:
        """Records by stage name."""
        ...

    async def forget_lease(self, lease: WorkerLease) -> None:
        """Remove an expired lease, whoever held it."""
        ...
