"""The settings the scheduler core runs with (built from `SchedulerConfig.settings()`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reexec.sched.matching import PropertyModifier, Rule
from reexec.sched.workers import AllocationStrategy


@dataclass(frozen=True)
class SchedulerSettings:
    rules: Mapping[str, Rule] = field(default_factory=dict)
    modifiers: Sequence[PropertyModifier] = ()
    allocation: AllocationStrategy = "least_recently_used"
    worker_timeout_s: float = 5.0
    client_action_timeout_s: float = 60.0
    max_action_executing_timeout_s: float = 0.0
    retain_completed_for_s: float = 60.0
    max_job_retries: int = 3
    max_declines: int = 100
    max_live_operations: int = 100_000
    max_action_timeout_s: float = 1200.0
    default_action_timeout_s: float = 600.0
    decline_pause_s: float = 1.0
