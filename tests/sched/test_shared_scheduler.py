"""Two schedulers sharing one Redis state store, driven directly (no gRPC).

What sharing adds to one scheduler: a worker moves between schedulers with its running
attempts, a scheduler that dies leaves its workers' attempts to the lease, a cancel on one
scheduler stops the attempt on the other's worker, and a client on either sees every change.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from reexec.cas.action_cache import MemoryActionCache
from reexec.sched.config import SchedulerConfig, StateConfig
from reexec.sched.redis_state import RedisStateStore
from reexec.sched.scheduler import Scheduler
from reexec.sched.state import Outcome, Stage
from reexec.sched.workers import WorkerState
from tests.sched.harness import drained, spec


@dataclass
class Pair:
    a: Scheduler
    b: Scheduler
    clock: list[float]

    def tick(self, dt: float) -> None:
        self.clock[0] += dt


@pytest.fixture
async def pair(redis_url: str, nursery: trio.Nursery) -> AsyncIterator[Pair]:
    prefix = f"t-{uuid.uuid4().hex[:6]}:"
    clock = [1000.0]
    settings = SchedulerConfig(
        worker_timeout_s=5.0, state=StateConfig(type="redis", url=redis_url, worker_lease_s=30.0)
    )
    ac = MemoryActionCache(1 << 20)
    out = []
    for sid in ("A", "B"):
        store = RedisStateStore(redis_url, key_prefix=prefix, scheduler_id=sid)
        sched = Scheduler(settings, ac, store, clock=lambda: clock[0])
        await nursery.start(store.run)
        out.append(sched)
    yield Pair(out[0], out[1], clock)


def connect(s: Scheduler, wid: str) -> tuple[WorkerState, trio.MemoryReceiveChannel]:
    send, receive = trio.open_memory_channel[tuple[str, str, int]](math.inf)
    return s.register_worker(wid, [], 1, send), receive


async def settle(*ss: Scheduler) -> None:
    for s in ss:
        await s.store.sync()  # type: ignore[attr-defined]


async def queued_op(s: Scheduler, tag: str = "a") -> str:
    op, _ = await s.submit(spec(tag))
    await s.check_cache(op)
    return op.name


async def test_execute_on_one_wait_on_the_other(pair: Pair) -> None:
    name = await queued_op(pair.a)
    w, inbox = connect(pair.b, "w1")  # the only worker is on B
    assert await pair.b.adopt(w, []) == []
    assert await pair.b.dispatch_ready() == 1
    assert drained(inbox) == [("start", name, 1)]
    waiter = await pair.b.attach(name)  # a client of B
    assert waiter is not None and waiter.waiters == 2
    done: list = []

    async def wait_on_a() -> None:
        op = waiter
        while not op.done:
            op = await pair.a.store.wait_changed(op)
        done.append(op)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_on_a)
        await pair.b.finished(w, name, 1, Outcome(result=b"r"), retryable=False)
    assert done[0].outcome.result == b"r"


async def test_a_worker_moves_with_its_attempt(pair: Pair) -> None:
    name = await queued_op(pair.a)
    w, inbox = connect(pair.a, "w1")
    await pair.a.dispatch_ready()
    assert drained(inbox) == [("start", name, 1)]
    # A dies without a word (nothing runs worker_lost): the worker registers with B.
    del pair.a.workers["w1"]
    w2, inbox2 = connect(pair.b, "w1")
    assert await pair.b.adopt(w2, [(name, 1)]) == []
    assert w2.running == {(name, 1)} and pair.b.stats.adopted == 1
    op = await pair.b.finished(w2, name, 1, Outcome(result=b"once"), retryable=False)
    assert op is not None and op.done and op.attempt == 1 and op.retries == 0


async def test_a_stale_attempt_is_cancelled_not_adopted(pair: Pair) -> None:
    name = await queued_op(pair.a)
    w, _ = connect(pair.a, "w1")
    await pair.a.dispatch_ready()
    await pair.a.cancel(name)
    del pair.a.workers["w1"]
    w2, _ = connect(pair.b, "w1")
    assert await pair.b.adopt(w2, [(name, 1)]) == [name]
    assert w2.running == set()


async def test_a_worker_that_comes_back_without_its_attempt_gets_it_requeued(pair: Pair) -> None:
    name = await queued_op(pair.a)
    w, _ = connect(pair.a, "w1")
    await pair.a.dispatch_ready()
    del pair.a.workers["w1"]
    w2, _ = connect(pair.b, "w1")  # restarted worker: runs nothing
    await pair.b.adopt(w2, [])
    op = await pair.b.store.get(name)
    assert op is not None and op.stage is Stage.QUEUED and op.retries == 1
    assert "came back without it" in op.history[-1]


async def test_lease_expiry_requeues_what_a_dead_scheduler_held(pair: Pair) -> None:
    name = await queued_op(pair.a)
    w, _ = connect(pair.a, "w1")
    await pair.a.dispatch_ready()
    await pair.a.check_timers()  # publishes w1's lease
    del pair.a.workers["w1"]  # A and its worker are gone
    pair.tick(10)
    await pair.b.check_timers()
    assert (await pair.b.store.get(name)).stage is Stage.EXECUTING  # type: ignore[union-attr]
    pair.tick(25)  # past the 30 s lease
    await pair.b.check_timers()
    op = await pair.b.store.get(name)
    assert op is not None and op.stage is Stage.QUEUED
    assert "lease expired (held by scheduler A)" in op.history[-1]
    assert pair.b.stats.leases_expired == 1


async def test_a_disconnected_worker_keeps_its_attempts_for_the_lease(pair: Pair) -> None:
    name = await queued_op(pair.a)
    w, _ = connect(pair.a, "w1")
    await pair.a.dispatch_ready()
    await pair.a.worker_lost(w, "disconnected")
    assert (await pair.a.store.get(name)).stage is Stage.EXECUTING  # type: ignore[union-attr]
    w2, _ = connect(pair.a, "w1")  # back within the lease, on the same scheduler
    assert await pair.a.adopt(w2, [(name, 1)]) == []
    # Silence, by contrast, requeues at once.
    await pair.a.worker_lost(w2, "no keepalive", silent=True)
    assert (await pair.a.store.get(name)).stage is Stage.QUEUED  # type: ignore[union-attr]


async def test_cancel_on_one_scheduler_stops_the_attempt_on_the_other(pair: Pair) -> None:
    name = await queued_op(pair.a)
    w, inbox = connect(pair.b, "w1")
    await pair.b.dispatch_ready()
    assert drained(inbox) == [("start", name, 1)]
    await pair.a.cancel(name)
    await settle(pair.b)
    assert drained(inbox) == [("cancel", name, 1)]


async def test_queued_work_on_one_wakes_the_other(pair: Pair, nursery: trio.Nursery) -> None:
    w, inbox = connect(pair.b, "w1")
    nursery.start_soon(pair.b._run_dispatcher)  # the store already runs (fixture)
    await trio.sleep(0.05)
    name = await queued_op(pair.a)
    # Well inside the dispatcher's 1 s poll: the change message woke it.
    with trio.fail_after(0.5):
        while not (got := drained(inbox)):
            await trio.sleep(0.01)
    assert got == [("start", name, 1)]


async def test_two_schedulers_never_start_one_attempt_twice(pair: Pair) -> None:
    names = [await queued_op(pair.a, f"t{i}") for i in range(30)]
    inboxes = []
    for s, wid in ((pair.a, "wa"), (pair.b, "wb")):
        send, receive = trio.open_memory_channel[tuple[str, str, int]](math.inf)
        s.register_worker(wid, [], 100, send)
        inboxes.append(receive)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.a.dispatch_ready)
        nursery.start_soon(pair.b.dispatch_ready)
    starts = [m for inbox in inboxes for m in drained(inbox)]
    assert sorted(n for _, n, _ in starts) == sorted(names)  # each exactly once
    assert all(attempt == 1 for _, _, attempt in starts)


async def test_a_cache_check_lost_with_its_scheduler_is_run_again(pair: Pair) -> None:
    # A took the Execute and died before its cache check recorded anything.
    op, _ = await pair.a.submit(spec("a"))
    pair.tick(10)
    await pair.b.check_timers()
    assert (await pair.b.store.get(op.name)).stage is Stage.CACHE_CHECK  # type: ignore[union-attr]
    pair.tick(25)  # past STUCK_CACHE_CHECK_S since it was created
    await pair.b.check_timers()
    [again] = drained(pair.b._cache_checks_out)  # B queued the check on its own tree
    await pair.b.check_cache(again)
    assert (await pair.b.store.get(op.name)).stage is Stage.QUEUED  # type: ignore[union-attr]


async def test_an_attempt_being_adopted_is_not_taken_for_a_lost_dispatch(pair: Pair) -> None:
    name = await queued_op(pair.a)
    w, _ = connect(pair.a, "w1")
    await pair.a.dispatch_ready()
    del pair.a.workers["w1"]
    pair.tick(60)  # long after the dispatch
    w2, _ = connect(pair.b, "w1")  # registered with B; its attempts not adopted yet
    w2.adopting = True
    await pair.b._expire_leases(pair.b.now())
    assert (await pair.b.store.get(name)).stage is Stage.EXECUTING  # type: ignore[union-attr]
    w2.adopting = False
    # Without the adoption (an attempt the worker never got), the same check requeues it.
    await pair.b._expire_leases(pair.b.now())
    op = await pair.b.store.get(name)
    assert op is not None and op.stage is Stage.QUEUED
    assert "was never given this attempt" in op.history[-1]


async def test_a_worker_being_adopted_is_given_no_new_work(pair: Pair) -> None:
    """Its `running` is incomplete until adoption ends: a start sent meanwhile found the slot
    taken by an attempt it brought along and was declined (a retry: attempts=2)."""
    running = await queued_op(pair.a, "running")
    w, inbox = connect(pair.a, "w1")  # one slot
    await pair.a.dispatch_ready()
    assert drained(inbox) == [("start", running, 1)]
    del pair.a.workers["w1"]  # A dies; the worker registers with B, still running it
    waiting = await queued_op(pair.b, "waiting")
    w2, inbox2 = connect(pair.b, "w1")
    w2.adopting = True  # between Register and the end of adopt()
    assert await pair.b.dispatch_ready() == 0
    assert drained(inbox2) == []
    w2.adopting = False
    assert await pair.b.adopt(w2, [(running, 1)]) == []
    assert await pair.b.dispatch_ready() == 0  # its one slot is the adopted attempt's
    await pair.b.finished(w2, running, 1, Outcome(result=b"r"), retryable=False)
    assert await pair.b.dispatch_ready() == 1
    assert drained(inbox2) == [("start", waiting, 1)]
