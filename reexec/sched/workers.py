"""Connected workers as the scheduler sees them: capacity, properties, liveness. No I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from reexec.sched.matching import WorkerProperties

AllocationStrategy = Literal["least_recently_used", "most_recently_used"]


@dataclass(eq=False)
class WorkerState:
    worker_id: str
    properties: WorkerProperties
    max_inflight: int
    connected_at: float
    last_seen: float
    # (operation name, attempt) pairs assigned to the worker and not yet reported back.
    running: set[tuple[str, int]] = field(default_factory=set)
    # True while the attempts it brought along are being adopted (not all in `running` yet).
    adopting: bool = False
    # Attempts of `running` the worker was told to cancel (told once).
    cancelled: set[tuple[str, int]] = field(default_factory=set)
    last_assigned: float = 0.0
    going_away: bool = False
    paused_until: float = 0.0  # after a decline, no new work for a moment
    # Outgoing messages; the connection's sender task drains it.
    outbox: object = None
    # Closes the worker's stream with the given reason (set by the connection that owns it).
    disconnect: Callable[[str], None] = field(default=lambda reason: None)

    def free_slots(self, now: float) -> int:
        # While its attempts are being adopted `running` is incomplete: a start sent now would
        # find the slots taken and be declined (seen in tests/e2e/test_scheduler_ha.py).
        if self.going_away or self.adopting or now < self.paused_until:
            return 0
        return max(self.max_inflight - len(self.running), 0)


def pick_worker(candidates: list[WorkerState], strategy: AllocationStrategy) -> WorkerState | None:
    """Among matching workers with a free slot, the least (or most) recently assigned one."""
    if not candidates:
        return None
    if strategy == "most_recently_used":
        return max(candidates, key=lambda w: (w.last_assigned, w.worker_id))
    return min(candidates, key=lambda w: (w.last_assigned, w.worker_id))
