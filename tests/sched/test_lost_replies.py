"""A Redis write whose reply is lost: the scheduler sees StateUnavailable (Redis hung past
`timeout_s`), but Redis applies the write once it runs again. The scheduler must not leave the
record in a state nobody will move on. Found while writing tests/e2e/test_scheduler_ha.py
(/work/notes/ha-bugs.md, bugs 1 (fixed) and 6).

Redis is made to hang (SIGSTOP) right before one chosen write, and resumes after the write's
timeout; the scheduler's own recovery (dispatcher, timers) then runs for a minute of mock time.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from reexec.cas.action_cache import MemoryActionCache
from reexec.errors import Unavailable
from reexec.sched.config import SchedulerConfig, StateConfig
from reexec.sched.redis_state import RedisStateStore
from reexec.sched.scheduler import Scheduler
from reexec.sched.state import Stage
from tests.redis_server import RedisServer
from tests.sched.harness import drained, spec

TIMEOUT_S = 0.3


class Setup:
    def __init__(self, sched: Scheduler, store: RedisStateStore, redis: RedisServer) -> None:
        self.sched = sched
        self.store = store
        self.redis = redis
        self.clock = [1000.0]

    def hang_before(self, nursery: trio.Nursery, method: str, when: Any) -> list[bool]:
        """Make Redis hang right before the first call of store.`method` for which `when(*args)`
        holds, and run again after the call's timeout (so the write is applied late)."""
        original = getattr(self.store, method)
        hit: list[bool] = []

        async def wrapped(*args: Any, **kw: Any) -> Any:
            if not hit and when(*args):
                hit.append(True)
                self.redis.pause()

                async def resume() -> None:
                    await trio.sleep(TIMEOUT_S * 3)
                    self.redis.resume()

                nursery.start_soon(resume)
            return await original(*args, **kw)

        setattr(self.store, method, wrapped)
        return hit

    async def recover(self, rounds: int = 60) -> None:
        """What the scheduler's background tasks (monitor, dispatcher, cache checks) do for
        ~60 s of mock time once Redis is back."""
        await trio.sleep(TIMEOUT_S * 4)
        for _ in range(rounds):
            self.clock[0] += 1.0
            for worker in self.sched.workers.values():
                self.sched.worker_seen(worker)  # the worker keeps sending keepalives
            for step in (self.sched.check_timers, self._cache_checks, self.sched.dispatch_ready):
                try:
                    await step()
                except Unavailable:
                    pass

    async def _cache_checks(self) -> None:
        while True:
            try:
                op = self.sched._cache_checks_out.receive_nowait()
            except trio.WouldBlock:
                return
            await self.sched.check_cache(op)


@pytest.fixture
async def setup(redis_server: RedisServer, nursery: trio.Nursery) -> AsyncIterator[Setup]:
    settings = SchedulerConfig(
        worker_timeout_s=5.0,
        state=StateConfig(
            type="redis", url=redis_server.url, timeout_s=TIMEOUT_S, worker_lease_s=30.0
        ),
    )
    store = RedisStateStore(
        redis_server.url,
        key_prefix=f"t-{uuid.uuid4().hex[:6]}:",
        scheduler_id="A",
        timeout_s=TIMEOUT_S,
    )
    s = Setup(Scheduler(settings, MemoryActionCache(1 << 20), store), store, redis_server)
    s.sched._clock = lambda: s.clock[0]
    await nursery.start(store.run)
    yield s


async def test_dispatch_whose_reply_is_lost(setup: Setup, nursery: trio.Nursery) -> None:
    sched = setup.sched
    op, _ = await sched.submit(spec("lost-dispatch"))
    await sched.check_cache(op)
    send, inbox = trio.open_memory_channel[tuple[str, str, int]](math.inf)
    sched.register_worker("w1", [], 1, send)
    hit = setup.hang_before(
        nursery, "compare_and_set", lambda old, new: new.stage is Stage.EXECUTING
    )
    with pytest.raises(Unavailable):
        await sched.dispatch_ready()
    assert hit
    await setup.recover()
    record = await setup.store.get(op.name)
    assert record is not None
    starts = [m for m in drained(inbox) if m[0] == "start"]
    # Either the worker was told to run it, or it went back to the queue (and then to w1).
    assert starts and starts[-1][1] == op.name, (record.stage, record.worker_id, starts)


async def test_submit_whose_reply_is_lost(setup: Setup, nursery: trio.Nursery) -> None:
    """The create is applied after the client saw UNAVAILABLE: an operation in CACHE_CHECK
    whose check never ran, and the client's retry merges into it. The monitor's sweep of
    stuck cache checks (STUCK_CACHE_CHECK_S) moves it on."""
    sched = setup.sched
    await sched.submit(spec("warm-up"))  # the write script is loaded (else EVALSHA fails late)
    hit = setup.hang_before(nursery, "create", lambda op, **kw: True)
    with pytest.raises(Unavailable):
        await sched.submit(spec("lost-create"))
    assert hit
    # The client retries its Execute once Redis answers again.
    await trio.sleep(TIMEOUT_S * 4)
    op, merged = await sched.submit(spec("lost-create"))
    if not merged:
        await sched.check_cache(op)  # what _run_cache_checks does for a new operation
    await setup.recover()
    record = await setup.store.get(op.name)
    assert record is not None
    assert record.stage is not Stage.CACHE_CHECK, (merged, record.stage)
