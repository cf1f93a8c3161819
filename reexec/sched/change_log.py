"""What one operation change means to operators: a log line per lifecycle event, and the
queue-wait and execution-time histograms. Called by `Scheduler.apply` after each transition."""

from __future__ import annotations

import logging

from reexec.metrics import EXECUTION_DURATION, QUEUE_WAIT
from reexec.sched.state import Operation, Stage

# The scheduler's logger: these lines are the scheduler's, and operators filter on its name.
log = logging.getLogger("reexec.sched.scheduler")


def completion_label(op: Operation) -> str:
    """ "cached" or the final status name of a completed operation."""
    assert op.outcome is not None
    return "cached" if op.outcome.cached_result else op.outcome.status.name


def observe_durations(old: Operation, new: Operation) -> None:
    if new.stage is Stage.EXECUTING and old.stage is Stage.QUEUED:
        QUEUE_WAIT.observe(new.dispatched_at - old.queued_at)
    if new.done and old.stage is Stage.EXECUTING:
        EXECUTION_DURATION.observe(new.completed_at - old.dispatched_at)


def log_change(old: Operation, new: Operation) -> None:
    """One INFO line per lifecycle event: queued, requeued, dispatched, completed."""
    base = {"operation": new.name, "action": f"{new.action_key[1]}/{new.action_key[2]}"}
    if new.stage is Stage.QUEUED and old.stage is not Stage.QUEUED:
        reason = {"reason": new.history[-1]} if new.history and old.stage is Stage.EXECUTING else {}
        log.info(
            "operation queued" if old.stage is Stage.CACHE_CHECK else "operation requeued",
            extra={
                **base,
                "priority": new.priority,
                "queue": ",".join(f"{k}={v}" for k, v in new.queue_key) or "default",
                **reason,
            },
        )
    elif new.stage is Stage.EXECUTING and old.stage is Stage.QUEUED:
        log.info(
            "operation dispatched",
            extra={
                **base,
                "worker": new.worker_id,
                "attempt": new.attempt,
                "queued_s": round(new.dispatched_at - old.queued_at, 3),
            },
        )
    elif new.done and not old.done:
        executing = (
            {"executing_s": round(new.completed_at - old.dispatched_at, 3)}
            if old.stage is Stage.EXECUTING
            else {}
        )
        log.info(
            "operation completed",
            extra={
                **base,
                "status": completion_label(new),
                "worker": old.worker_id or "-",
                "attempts": new.attempt,
                "seconds": round(new.completed_at - new.created_at, 3),
                **executing,
            },
        )
