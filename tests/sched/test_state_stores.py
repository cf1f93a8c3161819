"""The state store contract, run against the memory store and the Redis store.

Plus what only a shared store has: a second store on the same Redis sees changes (change
messages, `wait_changed`), a write that lost its reply is not applied twice, an unreachable
Redis is UNAVAILABLE (never INTERNAL) and the store recovers by itself.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import trio

from reexec.sched.memory_state import MemoryStateStore
from reexec.sched.state import Operation, Outcome, Stage
from reexec.sched.state_store import Change, StateStore, StateUnavailable, WorkerLease
from tests.redis_server import RedisServer

KEY = ("", "ab" * 32, 3, 1)
LINUX = (("OSFamily", "linux"),)


def op(name: str = "op-1", **kw: object) -> Operation:
    base = Operation(name=name, action_key=KEY, created_at=1000.0, waiters=1)
    return replace(base, **kw)  # type: ignore[arg-type]


def redis_store(url: str, prefix: str, sid: str = "s1") -> StateStore:
    from reexec.sched.redis_state import RedisStateStore

    return RedisStateStore(url, key_prefix=prefix, scheduler_id=sid, timeout_s=2.0)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        s: StateStore = MemoryStateStore("s1")
    else:
        url = request.getfixturevalue("redis_url")
        s = redis_store(url, f"t-{uuid.uuid4().hex[:6]}:")
    await nursery.start(s.run)
    yield s


async def test_create_get_and_compare_and_set(store: StateStore) -> None:
    a = op()
    assert await store.create(a, mergeable=True)
    assert not await store.create(a, mergeable=True)  # names are unique
    assert await store.get("op-1") == a
    assert await store.get("nope") is None
    b = replace(a, version=1, stage=Stage.QUEUED, queue_seq=7)
    assert await store.compare_and_set(a, b)
    assert await store.get("op-1") == b
    # A writer that read version 0 loses: the record moved on.
    stale = replace(a, version=1, waiters=5)
    assert not await store.compare_and_set(a, stale)
    assert await store.get("op-1") == b
    assert await store.count() == 1


async def test_records_round_trip_every_field(store: StateStore) -> None:
    a = op(
        priority=-3,
        queue_key=LINUX,
        do_not_cache=True,
        timeout_s=12.5,
        history=("attempt 1 on w: lost",),
        stage=Stage.COMPLETED,
        completed_at=1001.5,
        outcome=Outcome(message="x", result=b"\x00\xff", status_details=(("t", b"\x01"),)),
    )
    await store.create(a, mergeable=False)
    assert await store.get(a.name) == a


async def test_dedup_index_follows_the_record(store: StateStore) -> None:
    a = op()
    await store.create(a, mergeable=True)
    assert (await store.live_for(KEY)) == a
    second = op("op-2")
    await store.create(second, mergeable=True)  # the first stays indexed
    assert (await store.live_for(KEY)).name == "op-1"  # type: ignore[union-attr]
    done = replace(a, version=1, stage=Stage.COMPLETED, completed_at=1002.0, outcome=Outcome())
    await store.compare_and_set(a, done)
    assert await store.live_for(KEY) is None
    assert await store.live_count() == 1  # op-2


async def test_queues_order_by_priority_then_fifo(store: StateStore) -> None:
    names = {"p0-s2": (0, 2), "p0-s1": (0, 1), "pm5-s9": (-5, 9), "p7-s0": (7, 0)}
    for name, (priority, seq) in names.items():
        a = op(name, priority=priority, queue_key=LINUX)
        await store.create(a, mergeable=False)
        await store.compare_and_set(a, replace(a, version=1, stage=Stage.QUEUED, queue_seq=seq))
    other = op("other", queue_key=())
    await store.create(other, mergeable=False)
    await store.compare_and_set(other, replace(other, version=1, stage=Stage.QUEUED, queue_seq=3))
    heads = {h.key: h for h in await store.queue_heads()}
    assert heads[LINUX].name == "pm5-s9" and heads[()].name == "other"
    assert await store.queue_depths() == {LINUX: 4, (): 1}
    # Dispatching the head reveals the next one; FIFO within a priority.
    order = []
    for _ in range(4):
        head = next(h for h in await store.queue_heads() if h.key == LINUX)
        current = await store.get(head.name)
        assert current is not None
        await store.compare_and_set(
            current, replace(current, version=2, stage=Stage.EXECUTING, worker_id="w")
        )
        order.append(head.name)
    assert order == ["pm5-s9", "p0-s1", "p0-s2", "p7-s0"]
    assert await store.queue_depths() == {(): 1}
    assert await store.executing() == {n: "w" for n in names}
    assert await store.stage_counts() == {"EXECUTING": 4, "QUEUED": 1}


async def test_extreme_priorities_keep_their_order(store: StateStore) -> None:
    for name, priority in (("low", 2**31 - 1), ("high", -(2**31)), ("mid", 0)):
        a = op(name, priority=priority)
        await store.create(a, mergeable=False)
        await store.compare_and_set(a, replace(a, version=1, stage=Stage.QUEUED, queue_seq=1))
    [head] = await store.queue_heads()
    assert head.name == "high"


async def test_unwatched_and_completed_indexes(store: StateStore) -> None:
    a = op(waiters=1)
    await store.create(a, mergeable=False)
    assert await store.unwatched_before(math.inf) == []
    b = replace(a, version=1, waiters=0, unwatched_since=1005.0)
    await store.compare_and_set(a, b)
    assert await store.unwatched_before(1006.0) == ["op-1"]
    assert await store.unwatched_before(1005.0) == []
    c = replace(b, version=2, stage=Stage.COMPLETED, completed_at=1010.0, outcome=Outcome())
    await store.compare_and_set(b, c)
    assert await store.unwatched_before(math.inf) == []
    assert await store.completed_before(1011.0) == ["op-1"]
    assert await store.delete(c)
    assert await store.get("op-1") is None
    assert await store.count() == 0 and await store.stage_counts() == {}


async def test_delete_checks_the_version(store: StateStore) -> None:
    a = op()
    await store.create(a, mergeable=True)
    b = replace(a, version=1, stage=Stage.QUEUED, queue_seq=1)
    await store.compare_and_set(a, b)
    assert not await store.delete(a)
    assert await store.delete(b)
    assert await store.queue_depths() == {} and await store.live_for(KEY) is None
    assert await store.live_count() == 0


async def test_wait_changed_wakes_on_a_change(store: StateStore) -> None:
    a = op()
    await store.create(a, mergeable=False)
    seen: list[Operation | None] = []

    async def waiter() -> None:
        seen.append(await store.wait_changed(a))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.05)
        assert seen == []
        await store.compare_and_set(a, replace(a, version=1, waiters=2))
    assert seen[0] is not None and seen[0].waiters == 2


async def test_leases(store: StateStore) -> None:
    lease = WorkerLease("w1", "s1", 2000.0, 4, 1, LINUX)
    await store.put_leases([lease])
    assert await store.leases() == {"w1": lease}
    # Only the holder's drop removes it.
    await store.put_leases([replace(lease, scheduler_id="s2")])
    await store.drop_lease("w1")
    assert "w1" in await store.leases()
    await store.forget_lease(replace(lease, scheduler_id="s2"))
    assert await store.leases() == {}


async def test_sequence_numbers_increase(store: StateStore) -> None:
    seqs = [await store.next_seq() for _ in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


# -- shared (Redis) only ----------------------------------------------------------------------


async def test_another_scheduler_sees_changes(redis_url: str, nursery: trio.Nursery) -> None:
    prefix = f"t-{uuid.uuid4().hex[:6]}:"
    a, b = redis_store(redis_url, prefix, "A"), redis_store(redis_url, prefix, "B")
    changes: list[Change] = []
    b.on_change(changes.append)
    await nursery.start(a.run)
    await nursery.start(b.run)
    record = op()
    await a.create(record, mergeable=True)
    assert await b.get("op-1") == record
    got: list[Operation | None] = []

    async def wait_on_b() -> None:
        got.append(await b.wait_changed(record))

    async with trio.open_nursery() as inner:
        inner.start_soon(wait_on_b)
        await trio.sleep(0.05)
        await a.compare_and_set(record, replace(record, version=1, stage=Stage.QUEUED))
    assert got[0] is not None and got[0].stage is Stage.QUEUED
    await b.sync()  # type: ignore[attr-defined]
    named = [c for c in changes if c.name == "op-1"]
    assert named and named[-1].stage is Stage.QUEUED and named[-1].origin == "A"
    # B never hears its own writes.
    before = len(changes)
    current = await b.get("op-1")
    assert current is not None
    await b.compare_and_set(current, replace(current, version=2, waiters=3))
    await b.sync()  # type: ignore[attr-defined]
    assert [c for c in changes[before:] if c.name == "op-1"] == []


async def test_a_retried_write_is_not_applied_twice(redis_url: str, nursery: trio.Nursery) -> None:
    """The reply of a write was lost and the client sent it again: the second run must report
    success without writing (and must not be confused with an identical write by another)."""
    s = redis_store(redis_url, f"t-{uuid.uuid4().hex[:6]}:")
    await nursery.start(s.run)
    a = op()
    await s.create(a, mergeable=False)
    b = replace(a, version=1, waiters=2)
    token_args: list[list] = []
    real = s._write  # type: ignore[attr-defined]

    async def twice(*, keys: list, args: list) -> object:
        token_args.append(args)
        await real(keys=keys, args=args)
        return await real(keys=keys, args=args)  # the "retry"

    s._write = twice  # type: ignore[attr-defined]
    assert await s.compare_and_set(a, b)
    assert await s.get("op-1") == b
    # The same new record written by someone else (another token) is a conflict.
    s._write = real  # type: ignore[attr-defined]
    assert not await s.compare_and_set(a, b)


async def test_unreachable_redis_is_unavailable_then_recovers(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    s = redis_store(redis_server.url, f"t-{uuid.uuid4().hex[:6]}:")
    await nursery.start(s.run)
    a = op()
    await s.create(a, mergeable=False)
    await trio.to_thread.run_sync(redis_server.stop)
    with pytest.raises(StateUnavailable, match=r"state store .* is unavailable"):
        await s.get("op-1")
    with pytest.raises(StateUnavailable):
        await s.compare_and_set(a, replace(a, version=1))
    await trio.to_thread.run_sync(redis_server.start)
    with trio.fail_after(10):
        while True:
            try:
                current = await s.get("op-1")
                break
            except StateUnavailable:
                await trio.sleep(0.1)
    # No persistence in this fixture: the restarted Redis is empty, and says so (not INTERNAL).
    assert current is None
    assert await s.create(a, mergeable=False)


async def test_a_hung_redis_times_out(redis_server: RedisServer, nursery: trio.Nursery) -> None:
    s = redis_store(redis_server.url, f"t-{uuid.uuid4().hex[:6]}:")
    await nursery.start(s.run)
    await s.create(op(), mergeable=False)
    redis_server.pause()
    try:
        with trio.fail_after(10):
            with pytest.raises(StateUnavailable):
                await s.get("op-1")
    finally:
        redis_server.resume()
    assert await s.get("op-1") is not None


async def test_checking_index_follows_cache_check(store: StateStore) -> None:
    a = op(created_at=1000.0)
    await store.create(a, mergeable=False)
    assert await store.checking_before(1000.5) == ["op-1"]
    assert await store.checking_before(999.0) == []
    await store.compare_and_set(a, replace(a, version=1, stage=Stage.QUEUED, queue_seq=1))
    assert await store.checking_before(math.inf) == []
