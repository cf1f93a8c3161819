"""The operation state machine: records, events and the pure transition function.

An `Operation` is an immutable record with a `version` that increases on every transition.
`transition(record, event, config)` returns the next record or raises `StaleEvent` when the
event no longer applies (a report from a superseded attempt, a completion after a cancel).
Nothing here does I/O or keeps state. Today one scheduler process owns every record
(`store.py`, in memory) and applies transitions one at a time on its Trio thread; the version
is what a shared store's compare-and-set will check once several schedulers share records.

    CACHE_CHECK --hit--> COMPLETED
        |miss
        v
      QUEUED <--retryable failure / declined / worker lost--+
        |dispatch                                            |
        v                                                    |
     EXECUTING ---------------------------------------------+
        |finished (or retries exhausted)
        v
     COMPLETED  (also reached from any stage by Cancel)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Union

from grpclib.const import Status


class Stage(enum.IntEnum):
    """Values of build.bazel.remote.execution.v2.ExecutionStage.Value."""

    UNKNOWN = 0
    CACHE_CHECK = 1
    QUEUED = 2
    EXECUTING = 3
    COMPLETED = 4


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an operation ended; becomes the ExecuteResponse."""

    status: Status = Status.OK
    message: str = ""
    result: bytes = b""  # serialized ActionResult ("" when there is none)
    cached_result: bool = False
    # Serialized google.rpc.Status details (e.g. a PreconditionFailure) to attach.
    status_details: tuple[tuple[str, bytes], ...] = ()
    server_logs: tuple[tuple[str, bytes], ...] = ()  # name -> serialized LogFile


@dataclass(frozen=True, slots=True)
class Operation:
    name: str
    action_key: tuple[str, str, int, int]  # (instance, hash, size, digest function)
    version: int = 0
    stage: Stage = Stage.CACHE_CHECK
    priority: int = 0
    queue_key: tuple[tuple[str, str], ...] = ()
    do_not_cache: bool = False
    skip_cache_lookup: bool = False
    timeout_s: float = 0.0
    created_at: float = 0.0
    queued_at: float = 0.0
    queue_seq: int = 0  # FIFO order within a priority; assigned when (re)queued
    worker_id: str = ""
    attempt: int = 0
    retries: int = 0
    declines: int = 0  # attempts a worker declined (precondition script, draining)
    dispatched_at: float = 0.0
    last_progress_at: float = 0.0
    history: tuple[str, ...] = ()
    waiters: int = 0
    unwatched_since: float = 0.0  # when waiters last dropped to zero (0 while watched)
    completed_at: float = 0.0
    outcome: Outcome | None = None

    @property
    def done(self) -> bool:
        return self.stage is Stage.COMPLETED


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheChecked:
    now: float
    seq: int
    hit: Outcome | None = None


@dataclass(frozen=True, slots=True)
class Dispatched:
    worker_id: str
    now: float


@dataclass(frozen=True, slots=True)
class ProgressReported:
    worker_id: str
    attempt: int
    now: float


@dataclass(frozen=True, slots=True)
class Finished:
    """The worker's final report. Retryable failures requeue up to `max_retries`."""

    worker_id: str
    attempt: int
    now: float
    seq: int
    outcome: Outcome
    retryable: bool = False
    max_retries: int = 3


@dataclass(frozen=True, slots=True)
class Requeue:
    """The attempt is void without fault of the action: worker lost, declined, or stuck.

    `counts` says whether it uses up one of the action's retries; a decline does not, but
    declines are bounded by `max_declines` so an action no worker accepts ends.
    """

    worker_id: str
    attempt: int
    now: float
    seq: int
    reason: str
    counts: bool = True
    max_retries: int = 3
    max_declines: int = 100


@dataclass(frozen=True, slots=True)
class Cancel:
    now: float
    reason: str = "cancelled"
    status: Status = Status.CANCELLED


@dataclass(frozen=True, slots=True)
class WaiterAttached:
    now: float


@dataclass(frozen=True, slots=True)
class WaiterDetached:
    now: float


Event = Union[  # noqa: UP007
    CacheChecked,
    Dispatched,
    ProgressReported,
    Finished,
    Requeue,
    Cancel,
    WaiterAttached,
    WaiterDetached,
]


class StaleEvent(Exception):
    """The event does not apply to the record any more (it was superseded)."""


def _same_attempt(op: Operation, worker_id: str, attempt: int) -> None:
    if op.stage is not Stage.EXECUTING or op.worker_id != worker_id or op.attempt != attempt:
        raise StaleEvent(
            f"{op.name}: report from {worker_id} attempt {attempt} but the operation is "
            f"{op.stage.name} on {op.worker_id or '-'} attempt {op.attempt}"
        )


# Requeue notes kept per operation: the first ones explain a failure, the last ones its end.
HISTORY_LIMIT = 20


def _noted(history: tuple[str, ...], note: str) -> tuple[str, ...]:
    """`history` plus `note`, at most HISTORY_LIMIT entries: the first half, a marker, and the
    most recent ones (an action declined forever must not grow its record forever)."""
    history = (*history, note)
    if len(history) <= HISTORY_LIMIT:
        return history
    half = HISTORY_LIMIT // 2
    return (*history[:half], _ELIDED, *history[-(HISTORY_LIMIT - half - 1) :])


_ELIDED = "..."


def _requeued(
    op: Operation, now: float, seq: int, note: str, event: Requeue | Finished
) -> Operation:
    history = _noted(op.history, note)
    counts = not isinstance(event, Requeue) or event.counts
    retries = op.retries + (1 if counts else 0)
    declines = op.declines + (0 if counts else 1)
    if counts and retries > event.max_retries:
        return _failed(
            op,
            now,
            history,
            Status.UNAVAILABLE,
            f"gave up after {event.max_retries} retries: " + "; ".join(history),
            retries=retries,
        )
    if isinstance(event, Requeue) and declines > event.max_declines:
        return _failed(
            op,
            now,
            history,
            Status.FAILED_PRECONDITION,
            f"declined by workers {declines} times; last: {note}",
            declines=declines,
        )
    return replace(
        op,
        stage=Stage.QUEUED,
        worker_id="",
        retries=retries,
        declines=declines,
        history=history,
        queued_at=now,
        queue_seq=seq,
    )


def _failed(
    op: Operation,
    now: float,
    history: tuple[str, ...],
    status: Status,
    message: str,
    **counts: int,
) -> Operation:
    return replace(
        op,
        stage=Stage.COMPLETED,
        worker_id="",
        history=history,
        completed_at=now,
        outcome=Outcome(status=status, message=message),
        **counts,
    )


def transition(op: Operation, event: Event) -> Operation:
    """The record after `event`, with the version bumped. Raises StaleEvent if inapplicable."""
    new = _next(op, event)
    return replace(new, version=op.version + 1)


def _next(op: Operation, event: Event) -> Operation:
    match event:
        case WaiterAttached():
            return replace(op, waiters=op.waiters + 1, unwatched_since=0.0)
        case WaiterDetached(now=now):
            if op.waiters <= 0:
                raise StaleEvent(f"{op.name}: no waiter to detach")
            waiters = op.waiters - 1
            return replace(op, waiters=waiters, unwatched_since=now if waiters == 0 else 0.0)

    if op.done:
        raise StaleEvent(f"{op.name} is already completed")

    match event:
        case CacheChecked(now=now, seq=seq, hit=hit):
            if op.stage is not Stage.CACHE_CHECK:
                raise StaleEvent(f"{op.name}: cache check result in stage {op.stage.name}")
            if hit is not None:
                return replace(op, stage=Stage.COMPLETED, completed_at=now, outcome=hit)
            return replace(op, stage=Stage.QUEUED, queued_at=now, queue_seq=seq)
        case Dispatched(worker_id=worker_id, now=now):
            if op.stage is not Stage.QUEUED:
                raise StaleEvent(f"{op.name}: dispatch in stage {op.stage.name}")
            return replace(
                op,
                stage=Stage.EXECUTING,
                worker_id=worker_id,
                attempt=op.attempt + 1,
                dispatched_at=now,
                last_progress_at=now,
            )
        case ProgressReported(worker_id=worker_id, attempt=attempt, now=now):
            _same_attempt(op, worker_id, attempt)
            return replace(op, last_progress_at=now)
        case Finished(
            worker_id=w, attempt=a, now=now, seq=seq, outcome=outcome, retryable=retryable
        ):
            _same_attempt(op, w, a)
            if retryable:
                note = f"attempt {a} on {w}: {outcome.status.name}: {outcome.message}"
                return _requeued(op, now, seq, note, event)
            return replace(op, stage=Stage.COMPLETED, completed_at=now, outcome=outcome)
        case Requeue(worker_id=w, attempt=a, now=now, seq=seq, reason=reason):
            _same_attempt(op, w, a)
            return _requeued(op, now, seq, f"attempt {a} on {w}: {reason}", event)
        case Cancel(now=now, reason=reason, status=status):
            return replace(
                op,
                stage=Stage.COMPLETED,
                completed_at=now,
                outcome=Outcome(status=status, message=reason),
            )
    raise TypeError(f"unknown event {event!r}")


__all__ = [
    "CacheChecked",
    "Cancel",
    "Dispatched",
    "Event",
    "Finished",
    "Operation",
    "Outcome",
    "ProgressReported",
    "Requeue",
    "Stage",
    "StaleEvent",
    "WaiterAttached",
    "WaiterDetached",
    "transition",
]
