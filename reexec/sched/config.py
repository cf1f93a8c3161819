"""Configuration of the scheduler, and the settings the scheduler core runs with.

`SchedulerConfig` is both what a config file says and what the scheduler core runs with: the
core reads its fields, plus a few properties derived from them (parsed property modifiers), so
no other type mirrors its fields.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from reexec.configtypes import ConfigStruct
from reexec.sched.matching import PropertyModifier, Rule
from reexec.sched.workers import AllocationStrategy


class NameValue(ConfigStruct):
    name: str
    value: str


class PropertyModifierConfig(ConfigStruct):
    """Exactly one of: add (when absent), remove (by name), replace (when present)."""

    add: NameValue | None = None
    remove: str | None = None
    replace: NameValue | None = None

    def modifier(self) -> PropertyModifier | None:
        if self.add is not None:
            return PropertyModifier("add", self.add.name, self.add.value)
        if self.replace is not None:
            return PropertyModifier("replace", self.replace.name, self.replace.value)
        if self.remove is not None:
            return PropertyModifier("remove", self.remove)
        return None


PropertyRuleName = Literal["exact", "minimum", "priority", "ignore"]

# What REAPI clients send without being asked (BuildStream: OSFamily, ISA, unixUID, unixGID,
# network), plus the worker's confinement mode. Workers offer their own OSFamily, ISA and
# confinement; unixUID, unixGID and network are not matched, the worker honours them.
DEFAULT_PLATFORM_PROPERTIES: dict[str, PropertyRuleName] = {
    "OSFamily": "exact",
    "ISA": "exact",
    "confinement": "exact",
    "unixUID": "ignore",
    "unixGID": "ignore",
    "network": "ignore",
}


StateStoreType = Literal["memory", "redis"]


class StateConfig(ConfigStruct):
    """Where operation records, queues and worker leases live (`[scheduler.state]`)."""

    type: StateStoreType = "memory"
    """memory: this process only, lost on restart (the default of `reexecd serve`).
    redis: shared by every scheduler given the same url and key_prefix; survives restarts."""
    url: str = ""
    """redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///path/redis.sock?db=N."""
    key_prefix: str = "reexec:"
    """Prefix of every key, so several deployments can share one Redis."""
    timeout_s: float = 5.0
    """A Redis call slower than this fails: clients get UNAVAILABLE and retry."""
    worker_lease_s: float = 30.0
    """How long a worker's running actions wait for it after its connection ends (it may
    reconnect to any scheduler and report them); then they are requeued."""


class SchedulerConfig(ConfigStruct):
    enabled: bool = True
    """Run the scheduler (Execution service). Off: a cache-only server."""
    supported_platform_properties: dict[str, PropertyRuleName] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_PLATFORM_PROPERTIES)
    )
    """Platform property name -> exact | minimum | priority | ignore; others are refused.
    Replaces the default as a whole when set."""
    allocation_strategy: AllocationStrategy = "least_recently_used"
    worker_timeout_s: float = 5.0
    """A worker silent this long is dropped (its stream closed) and its actions requeued."""
    client_action_timeout_s: float = 60.0
    """An action no client has waited on for this long is cancelled (0: never)."""
    max_action_executing_timeout_s: float = 0.0
    """An executing action with no progress report for this long is requeued (0: off)."""
    retain_completed_for_s: float = 60.0
    """Completed operations stay visible to WaitExecution / GetOperation this long."""
    max_job_retries: int = 3
    """Infrastructure failures are retried on another worker this many times."""
    max_declines: int = 100
    """An action declined by workers (precondition script, draining) this many times fails
    with FAILED_PRECONDITION instead of being offered forever."""
    max_live_operations: int = 100_000
    """Operations not yet completed (checking the cache, queued or executing), across all
    clients; an Execute beyond it is RESOURCE_EXHAUSTED (each costs about 1 KiB of memory)."""
    max_action_timeout_s: float = 1200.0
    """Actions asking for a longer timeout are refused (INVALID_ARGUMENT)."""
    default_action_timeout_s: float = 600.0
    """Timeout of actions that set none (capped by max_action_timeout_s)."""
    property_modifier: list[PropertyModifierConfig] = msgspec.field(default_factory=list)
    """Rewrites of every action's platform properties, applied in order before queueing."""
    worker_token_file: str | None = None
    """A file holding the secret a worker must present to register (its `worker.token_file`).
    Unset: `reexecd serve` makes a random one for its local worker, so no client can register
    as a worker; `reexecd scheduler` accepts any worker and warns about it at start."""

    state: StateConfig = msgspec.field(default_factory=StateConfig)
    """The scheduler state store (see StateConfig)."""

    decline_pause_s: float = 1.0
    """A worker that declined an action gets no new work for this long."""

    # What the core reads, derived from the fields above (no copy of them anywhere else).

    @property
    def rules(self) -> dict[str, Rule]:
        return self.supported_platform_properties

    @property
    def modifiers(self) -> tuple[PropertyModifier, ...]:
        return tuple(m for c in self.property_modifier if (m := c.modifier()) is not None)

    @property
    def allocation(self) -> AllocationStrategy:
        return self.allocation_strategy
