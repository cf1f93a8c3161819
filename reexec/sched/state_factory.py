"""Builds the scheduler state store a config names."""

from __future__ import annotations

import os
import socket
import uuid

from reexec.sched.config import StateConfig
from reexec.sched.memory_state import MemoryStateStore
from reexec.sched.state_store import StateStore


def scheduler_id() -> str:
    """Names this scheduler process in leases and change messages (unique per start)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def build_state_store(config: StateConfig) -> StateStore:
    if config.type == "memory":
        return MemoryStateStore(scheduler_id())
    # Imported here: coredis is only needed by schedulers that share state.
    from reexec.sched.redis_state import RedisStateStore

    return RedisStateStore(
        config.url,
        key_prefix=config.key_prefix,
        scheduler_id=scheduler_id(),
        timeout_s=config.timeout_s,
    )
