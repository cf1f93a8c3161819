"""A Scheduler driven directly (no gRPC), with workers whose outboxes the test reads."""

from __future__ import annotations

import math
from typing import Any

import trio

from reexec.cas.action_cache import MemoryActionCache
from reexec.cas.digest import Digest, DigestFunction
from reexec.sched.config import SchedulerConfig
from reexec.sched.matching import QueueKey
from reexec.sched.scheduler import ActionSpec, Scheduler
from reexec.sched.state import Operation
from reexec.sched.workers import WorkerState


def digest(tag: str) -> Digest:
    return Digest((tag.encode().hex() * 64)[:64], len(tag), DigestFunction.SHA256)


def spec(
    tag: str,
    *,
    priority: int = 0,
    queue_key: QueueKey = (),
    do_not_cache: bool = False,
    skip_cache_lookup: bool = False,
    instance: str = "",
    timeout_s: float = 60.0,
) -> ActionSpec:
    return ActionSpec(
        instance=instance,
        digest=digest(tag),
        priority=priority,
        queue_key=queue_key,
        do_not_cache=do_not_cache,
        skip_cache_lookup=skip_cache_lookup,
        timeout_s=timeout_s,
    )


class Harness:
    def __init__(self, **settings: Any) -> None:
        self.ac = MemoryActionCache(1 << 20)
        self.s = Scheduler(SchedulerConfig(**settings), self.ac)
        self.inboxes: dict[str, trio.MemoryReceiveChannel[tuple[str, str, int]]] = {}

    def worker(
        self, worker_id: str, props: list[tuple[str, str]] | None = None, max_inflight: int = 1
    ) -> WorkerState:
        send, receive = trio.open_memory_channel[tuple[str, str, int]](math.inf)
        w = self.s.register_worker(worker_id, props or [], max_inflight, send)
        self.inboxes[worker_id] = receive
        return w

    def sent(self, worker_id: str) -> list[tuple[str, str, int]]:
        """Everything the scheduler put in the worker's outbox since the last call."""
        out = []
        inbox = self.inboxes[worker_id]
        while True:
            try:
                out.append(inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out

    async def submit(self, tag: str, **kw: Any) -> tuple[Operation, bool]:
        """Execute as the service does: submit, then the cache check for a new operation."""
        op, merged = await self.s.submit(spec(tag, **kw))
        if not merged:
            await self.s.check_cache(op)
        current = self.s.store.get_now(op.name)
        assert current is not None
        return current, merged

    def get(self, name: str) -> Operation:
        op = self.s.store.get_now(name)
        assert op is not None, f"{name} is gone"
        return op


def drained(inbox: trio.MemoryReceiveChannel) -> list[tuple[str, str, int]]:
    """Everything waiting in a worker's outbox (read from its receiving end)."""
    out = []
    while True:
        try:
            out.append(inbox.receive_nowait())
        except trio.WouldBlock:
            return out
