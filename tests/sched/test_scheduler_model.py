"""Model-based test: random interleavings of clients, workers and timers against schedulers.

Each example is a list of steps run inside `trio.run` with a MockClock, against one scheduler on
the memory state store, or two schedulers sharing one Redis state store. Steps pick their
targets by index into the model's lists (kept in creation order, so examples replay
deterministically) and name the scheduler that applies them; a `race` step runs two steps at
once on the two schedulers, so their transitions interleave and compare-and-sets conflict for
real (counted, and asserted to occur). After every step the invariants below are checked; at
the end the system is drained and every client must be able to read an outcome.
"""

from __future__ import annotations

import itertools
import math
import uuid as real_uuid
from collections import Counter
from dataclasses import dataclass, field
from unittest import mock

import pytest
import trio
import trio.testing
from grpclib.const import Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reexec.sched.scheduler as scheduler_module
from reexec.cas.action_cache import MemoryActionCache
from reexec.errors import FailedPrecondition
from reexec.sched.config import SchedulerConfig
from reexec.sched.matching import queue_key
from reexec.sched.memory_state import MemoryStateStore
from reexec.sched.scheduler import Scheduler, action_key_of
from reexec.sched.state import Operation, Outcome, Stage
from reexec.sched.state_store import StateStore
from reexec.sched.workers import WorkerState
from tests.sched.harness import spec

RULES = {"os": "exact", "cores": "minimum"}
PLATFORMS = [
    [],
    [("os", "linux")],
    [("os", "mac")],
    [("cores", "2")],
    [("os", "linux"), ("cores", "4")],
]
WORKER_PLATFORMS = [
    [],
    [("os", "linux")],
    [("os", "mac"), ("cores", "8")],
    [("os", "linux"), ("os", "mac"), ("cores", "2")],
    [("os", "linux"), ("cores", "4")],
]
GENERIC_WORKER = [("os", "linux"), ("os", "mac"), ("cores", "64")]
TAGS = ["a", "b", "c", "d", "e", "f"]  # the action pool; tag i runs on PLATFORMS[i % 5]
CACHED_TAGS = {"e"}  # pre-populated in the action cache
WORKER_IDS = ["w0", "w1", "w2", "w3"]

SETTINGS = SchedulerConfig(
    supported_platform_properties=RULES,
    worker_timeout_s=5.0,
    client_action_timeout_s=10.0,
    max_action_executing_timeout_s=8.0,
    retain_completed_for_s=15.0,
    max_job_retries=2,
    decline_pause_s=1.0,
)


# -- steps ----------------------------------------------------------------------------------------

idx = st.integers(0, 1000)
submit = st.tuples(
    st.just("submit"),
    st.integers(0, len(TAGS) - 1),
    st.sampled_from([False, False, False, True]),  # do_not_cache
    st.booleans(),  # skip_cache_lookup
    st.integers(-1, 2),  # priority
    st.sampled_from([True, True, True, False]),  # run the cache check right away
)
check_cache = st.tuples(st.just("check_cache"), idx)
register = st.tuples(
    st.just("register"),
    st.integers(0, len(WORKER_PLATFORMS) - 1),
    st.integers(1, 3),
    st.integers(0, len(WORKER_IDS) - 1),
)
dispatch = st.tuples(st.just("dispatch"))
finish = st.tuples(st.just("finish"), idx, idx, st.sampled_from(["ok", "ok", "retry", "fail"]))
decline = st.tuples(st.just("decline"), idx, idx)
progress = st.tuples(st.just("progress"), idx, idx)
lost = st.tuples(st.just("lost"), idx)
going_away = st.tuples(st.just("going_away"), idx)
detach = st.tuples(st.just("detach"), idx)
attach = st.tuples(st.just("attach"), idx)
cancel = st.tuples(st.just("cancel"), idx)
tick = st.tuples(
    st.just("tick"),
    st.sampled_from([0.5, 2.0, 6.0, 9.0, 16.0]),
    st.sampled_from([True, True, True, False]),
)
# Repeated branches weigh the choice towards the steps that move work along.
plain_steps = st.one_of(
    submit, submit, submit, check_cache, register, register, dispatch, dispatch, dispatch,
    finish, finish, finish, decline, progress, lost, going_away, detach, attach, cancel,
    tick, tick,
)  # fmt: skip
# Steps that may run concurrently on two schedulers (no clock jumps, no registrations).
racing_steps = st.one_of(
    submit, check_cache, dispatch, dispatch, finish, decline, progress, detach, attach, attach,
    cancel,
)  # fmt: skip
race = st.tuples(st.just("race"), racing_steps, racing_steps)
# The same step on both schedulers at once: both read one record, one write must lose.
race_same = st.one_of(attach, cancel, dispatch).map(lambda step: ("race", step, step))
# (scheduler index, step): the index is taken modulo the number of schedulers.
steps = st.tuples(
    st.integers(0, 1), st.one_of(plain_steps, plain_steps, plain_steps, race, race_same)
)


# -- the model --------------------------------------------------------------------------------------


@dataclass
class Conn:
    """One worker connection as the worker sees it."""

    sched: Scheduler
    state: WorkerState
    inbox: trio.MemoryReceiveChannel[tuple[str, str, int]]
    assigned: list[tuple[str, int]] = field(default_factory=list)  # StartExecutes not answered
    # Starts that arrived after the attempt was superseded: the connection's sender drops them
    # (and frees the slot); a cancel may still follow for them.
    dropped: set[tuple[str, int]] = field(default_factory=set)
    # Attempts answered during a race: a cancel sent concurrently may cross the answer.
    crossed: set[tuple[str, int]] = field(default_factory=set)


@dataclass
class Handle:
    """A client waiting on an operation (Execute or WaitExecution)."""

    name: str
    open: bool = True
    outcome: Outcome | None = None
    hung_up: bool = False  # the client went away before the outcome


class Model:
    def __init__(self, ss: list[Scheduler], ac: MemoryActionCache, clock: ModelClock) -> None:
        self.ss = ss
        self.s = ss[0]
        self.store: StateStore = ss[0].store
        self.ac = ac
        self.clock = clock
        self.names: list[str] = []  # every operation created, in order
        self.unindexed: set[str] = set()  # ops that may share an action with an indexed one
        self.last: dict[str, Operation] = {}
        self.handles: list[Handle] = []
        self.conns: dict[str, Conn] = {}  # connected workers, in registration order

    # -- helpers --

    def pick(self, seq: list, i: int):  # type: ignore[no-untyped-def]
        return seq[i % len(seq)] if seq else None

    def pick_task(self, wi: int, ti: int) -> tuple[Conn, tuple[str, int]] | None:
        conn = self.pick(list(self.conns.values()), wi)
        if conn is None or not conn.assigned:
            return None
        return conn, self.pick(conn.assigned, ti)

    async def all_ops(self) -> dict[str, Operation]:
        return {op.name: op async for op in self.store.operations()}

    async def receive(self) -> None:
        """Workers read their outboxes (through what the connection's sender does)."""
        for conn in self.conns.values():
            while True:
                try:
                    kind, name, attempt = conn.inbox.receive_nowait()
                except trio.WouldBlock:
                    break
                if kind == "start":
                    assert (name, attempt) not in conn.assigned
                    op = await self.store.get(name)
                    assert op is not None and op.attempt >= attempt
                    if op.stage is not Stage.EXECUTING or op.attempt != attempt:
                        # Superseded (cancelled by another scheduler) before it was sent.
                        conn.sched.release(conn.state, name, attempt)
                        conn.dropped.add((name, attempt))
                        continue
                    assert op.worker_id == conn.state.worker_id
                    conn.assigned.append((name, attempt))
                else:
                    assert kind == "cancel"
                    # Only ever for an attempt the worker was given and has not answered.
                    assert (
                        (name, attempt) in conn.assigned
                        or (name, attempt) in conn.dropped
                        or (name, attempt) in conn.crossed
                    )

    async def deliver(self) -> None:
        """Clients whose operation completed read the outcome and hang up (as the service does)."""
        for h in self.handles:
            if not h.open:
                continue
            op = await self.store.get(h.name)
            assert op is not None, f"{h.name} vanished while a client waited on it"
            if op.done:
                h.outcome = op.outcome
                h.open = False
                await self.s.detach(h.name)

    def forget_lost_workers(self) -> None:
        for wid in list(self.conns):
            conn = self.conns[wid]
            if conn.sched.workers.get(wid) is not conn.state:
                del self.conns[wid]

    # -- steps --

    async def run_step(self, si: int, step: tuple, *, racing: bool = False) -> None:
        s = self.ss[si % len(self.ss)]
        kind = step[0]
        if kind == "race":
            known = len(self.names)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._race_step, 0, step[1])
                nursery.start_soon(self._race_step, 1, step[2])
            for name in self.names[known:]:
                # Two concurrent submits may both miss the dedup index: only one is indexed.
                op = await self.store.get(name)
                indexed = None if op is None else await self.store.live_for(op.action_key)
                if indexed is None or indexed.name != name:
                    self.unindexed.add(name)
        elif kind == "submit":
            _, ti, dnc, skip, prio, check_now = step
            tag = TAGS[ti]
            sp = spec(
                tag,
                priority=prio,
                queue_key=queue_key(PLATFORMS[ti % len(PLATFORMS)], RULES),
                do_not_cache=dnc,
                skip_cache_lookup=skip,
            )
            live = [
                op
                for op in (await self.all_ops()).values()
                if op.action_key == sp.key
                and not op.done
                and not op.do_not_cache
                and op.name not in self.unindexed
            ]
            assert racing or len(live) <= 1
            op, merged = await s.submit(sp)
            if racing:
                if not merged:
                    self.names.append(op.name)
            else:
                # A request that skips the cache never merges into a pending cache check.
                bypass = bool(live) and skip and live[0].stage is Stage.CACHE_CHECK
                if dnc or not live or bypass:
                    assert not merged and op.name not in self.last
                    assert op.stage is Stage.CACHE_CHECK and op.waiters == 1
                    self.names.append(op.name)
                    if bypass:
                        self.unindexed.add(op.name)
                else:
                    assert merged and op.name == live[0].name
            self.handles.append(Handle(op.name))
            if check_now and not merged:
                await s.check_cache(op)
        elif kind == "check_cache":
            pending = [
                n
                for n in self.names
                if (o := await self.store.get(n)) and o.stage is Stage.CACHE_CHECK
            ]
            name = self.pick(pending, step[1])
            if name is not None:
                before = await self.store.get(name)
                assert before is not None
                op = await s.check_cache(before)
                if not racing:
                    assert op is not None and op.stage in (Stage.QUEUED, Stage.COMPLETED)
                if op is not None and op.done and op.outcome is not None and not racing:
                    assert op.outcome.cached_result
        elif kind == "register":
            _, pi, slots, wi = step
            wid = WORKER_IDS[wi]
            send, receive = trio.open_memory_channel[tuple[str, str, int]](math.inf)
            if wid in self.conns:
                if wid in s.workers:
                    with pytest.raises(FailedPrecondition):
                        s.register_worker(wid, WORKER_PLATFORMS[pi], slots, send)
            else:
                w = s.register_worker(wid, WORKER_PLATFORMS[pi], slots, send)
                assert await s.adopt(w, []) == []
                self.conns[wid] = Conn(s, w, receive)
        elif kind == "dispatch":
            await s.dispatch_ready()
        elif kind == "finish":
            got = self.pick_task(step[1], step[2])
            if got is not None:
                conn, (name, attempt) = got
                conn.assigned.remove((name, attempt))
                if racing or len(self.ss) > 1:
                    # Another scheduler's change may make ours cancel it meanwhile.
                    conn.crossed.add((name, attempt))
                op = await self.store.get(name)
                current = (
                    op is not None
                    and op.stage is Stage.EXECUTING
                    and op.worker_id == conn.state.worker_id
                    and op.attempt == attempt
                )
                how = step[3]
                if how == "ok":
                    outcome = Outcome(result=f"{name}#{attempt}".encode())
                    if current and op is not None and not op.do_not_cache:
                        await self.ac.put(action_key_of(op), outcome.result)
                elif how == "retry":
                    outcome = Outcome(status=Status.INTERNAL, message="worker disk trouble")
                else:
                    outcome = Outcome(status=Status.INVALID_ARGUMENT, message="bad input tree")
                # The report goes to the scheduler the worker is connected to.
                new = await conn.sched.finished(conn.state, name, attempt, outcome, how == "retry")
                if not racing:
                    assert (new is not None) == current
                if new is not None and how != "retry":
                    assert new.done and new.outcome == outcome
        elif kind == "decline":
            got = self.pick_task(step[1], step[2])
            if got is not None:
                conn, (name, attempt) = got
                conn.assigned.remove((name, attempt))
                if racing or len(self.ss) > 1:
                    # Another scheduler's change may make ours cancel it meanwhile.
                    conn.crossed.add((name, attempt))
                before = await self.store.get(name)
                await conn.sched.declined(conn.state, name, attempt, "not today")
                after = await self.store.get(name)
                if (
                    not racing
                    and before is not None
                    and after is not None
                    and after.version != before.version
                ):
                    assert after.retries == before.retries
        elif kind == "progress":
            got = self.pick_task(step[1], step[2])
            if got is not None:
                conn, (name, attempt) = got
                await conn.sched.progress(conn.state, name, attempt)
        elif kind == "lost":
            conn = self.pick(list(self.conns.values()), step[1])
            if conn is not None:
                # As after a keepalive timeout: its attempts are requeued at once.
                await conn.sched.worker_lost(conn.state, "disconnected", silent=True)
        elif kind == "going_away":
            conn = self.pick(list(self.conns.values()), step[1])
            if conn is not None:
                conn.sched.worker_going_away(conn.state)
        elif kind == "detach":
            h = self.pick([h for h in self.handles if h.open], step[1])
            if h is not None:
                h.open = False
                h.hung_up = True
                await s.detach(h.name)
        elif kind == "attach":
            name = self.pick(self.names, step[1])
            if name is not None:
                op = await s.attach(name)
                if not racing:
                    assert (op is None) == (name not in await self.all_ops())
                if op is not None:
                    # Only now may a (racing) detach pick it: a client cannot leave an
                    # operation before it joined it.
                    self.handles.append(Handle(name))
        elif kind == "cancel":
            name = self.pick(self.names, step[1])
            if name is not None:
                before = await self.store.get(name)
                op = await s.cancel(name)
                if racing:
                    pass
                elif before is not None and not before.done:
                    assert op is not None and op.outcome is not None
                    assert op.outcome.status is Status.CANCELLED
                else:
                    assert op is None
        elif kind == "tick":
            _, dt, keepalive = step
            self.clock.jump(dt)
            if keepalive:
                for conn in self.conns.values():
                    conn.sched.worker_seen(conn.state)
            for sched in self.ss:
                await sched.check_timers()
        else:  # pragma: no cover
            raise AssertionError(kind)
        if not racing:
            await self.settle()

    async def _race_step(self, si: int, step: tuple) -> None:
        await self.run_step(si, step, racing=True)

    async def settle(self) -> None:
        self.forget_lost_workers()
        # Change messages between schedulers are asynchronous: let them arrive.
        if len(self.ss) > 1:
            await wait_quiet(self.ss)
        await self.receive()
        await self.deliver()

    # -- invariants --

    async def check(self) -> None:
        s = self.s
        store = self.store
        now = s.now()
        cfg = s.settings
        in_store = await self.all_ops()
        assert set(in_store) <= set(self.names)

        # Nothing is lost: an operation leaves the store only after it completed and expired.
        for name in self.names:
            op = in_store.get(name)
            prev = self.last.get(name)
            if op is None:
                assert prev is not None and prev.done, f"{name} lost before completing"
                assert now - prev.completed_at > cfg.retain_completed_for_s - 1e-6
                continue
            if prev is not None:
                assert op.version >= prev.version
                if prev.done:
                    assert op.done and op.outcome == prev.outcome
                    assert op.completed_at == prev.completed_at
            self.last[name] = op

        # Queues hold exactly the QUEUED operations, each under its own key.
        queued = {n: op for n, op in in_store.items() if op.stage is Stage.QUEUED}
        want_depths = Counter(op.queue_key for op in queued.values())
        assert await store.queue_depths() == dict(want_depths)
        heads = await store.queue_heads()
        assert {h.key for h in heads} == set(want_depths)
        for h in heads:
            op = queued[h.name]
            assert (
                (h.priority, h.seq)
                == (op.priority, op.queue_seq)
                == min((o.priority, o.queue_seq) for o in queued.values() if o.queue_key == h.key)
            )

        # Workers: the model's connections are the schedulers', slots are honest and bounded.
        workers = {wid: w for sched in self.ss for wid, w in sched.workers.items()}
        assert set(workers) == set(self.conns)
        for wid, w in workers.items():
            conn = self.conns[wid]
            assert conn.state is w
            assert w.running == set(conn.assigned)
            assert len(w.running) <= w.max_inflight

        executing = await store.executing()
        assert executing == {
            n: op.worker_id for n, op in in_store.items() if op.stage is Stage.EXECUTING
        }
        assert await store.stage_counts() == dict(
            Counter(op.stage.name for op in in_store.values())
        )
        assert set(await store.checking_before(math.inf)) == {
            n for n, op in in_store.items() if op.stage is Stage.CACHE_CHECK
        }
        unwatched = set(await store.unwatched_before(math.inf))
        for name, op in in_store.items():
            assert op.done == (op.outcome is not None) == (op.stage is Stage.COMPLETED)
            # Every EXECUTING operation is held by exactly one connected worker, current attempt.
            holders = [w for w in workers.values() if (name, op.attempt) in w.running]
            if op.stage is Stage.EXECUTING:
                assert [w.worker_id for w in holders] == [op.worker_id]
            # Retries are bounded; declines do not count.
            declines = sum(": declined: " in note for note in op.history)
            assert op.retries <= cfg.max_job_retries + (1 if op.done else 0)
            assert op.attempt <= op.retries + declines + 1
            assert op.attempt - declines <= cfg.max_job_retries + 1
            # Waiters are exactly the clients holding the operation.
            assert op.waiters == sum(1 for h in self.handles if h.open and h.name == name)
            # Unwatched live operations are on the timer list, so they cannot linger.
            assert (name in unwatched) == (not op.done and op.waiters == 0)

        assert await store.live_count() == sum(1 for op in in_store.values() if not op.done)
        # At most one live mergeable operation per action, and it is the one indexed (besides
        # requests that bypassed a pending cache check or raced another submit).
        live = Counter(
            op.action_key
            for op in in_store.values()
            if not op.done and not op.do_not_cache and op.name not in self.unindexed
        )
        for key, n in live.items():
            assert n == 1
            indexed = await store.live_for(key)
            assert indexed is not None and indexed.action_key == key
            assert not indexed.done and not indexed.do_not_cache
        for op in in_store.values():
            if op.done or op.do_not_cache:
                indexed = await store.live_for(op.action_key)
                assert indexed is None or indexed.name != op.name

    # -- drain --

    async def drain(self) -> None:
        s = self.s
        send, receive = trio.open_memory_channel[tuple[str, str, int]](math.inf)
        w = s.register_worker("drain", GENERIC_WORKER, 10_000, send)
        self.conns["drain"] = Conn(s, w, receive)
        for _ in range(10):
            for name in self.names:
                op = await self.store.get(name)
                if op is not None and op.stage is Stage.CACHE_CHECK:
                    await s.check_cache(op)
            await s.dispatch_ready()
            await self.settle()
            for conn in list(self.conns.values()):
                for name, attempt in list(conn.assigned):
                    conn.assigned.remove((name, attempt))
                    await conn.sched.finished(
                        conn.state, name, attempt, Outcome(result=b"drained"), False
                    )
            await self.settle()
            await self.check()
            if all(op.done for op in (await self.all_ops()).values()):
                break
        for name in self.names:
            op = await self.store.get(name)
            if op is not None and not op.done:
                # Only operations no worker can take may be left (e.g. on a paused worker).
                await s.cancel(name, "drained")
        await self.settle()
        # Stale reports of cancelled attempts free their slots.
        for conn in list(self.conns.values()):
            for name, attempt in list(conn.assigned):
                conn.assigned.remove((name, attempt))
                await conn.sched.finished(conn.state, name, attempt, Outcome(), False)
        await self.settle()
        await self.check()
        for op in (await self.all_ops()).values():
            assert op.done
        assert await self.store.queue_depths() == {}
        for h in self.handles:
            assert not h.open and (h.hung_up or h.outcome is not None)
        assert all(not w.running for sched in self.ss for w in sched.workers.values())


async def wait_quiet(ss: list[Scheduler]) -> None:
    """Let the change messages published so far reach every scheduler."""
    for sched in ss:
        await sched.store.sync()  # type: ignore[attr-defined]


class ModelClock:
    """The schedulers' clock, moved only by the model's ticks (Trio's own clock stays real:
    Redis connections and their timeouts run on it)."""

    def __init__(self) -> None:
        self.t = 100.0  # away from 0.0, which the records use as "not set"

    def __call__(self) -> float:
        return self.t

    def jump(self, dt: float) -> None:
        self.t += dt


def run_model(script: list[tuple], redis_url: str | None = None) -> Model:
    clock = ModelClock()
    counter = itertools.count(1)
    fake_uuid = mock.Mock()
    fake_uuid.uuid4.side_effect = lambda: f"op-{next(counter):04d}"
    result: list[Model] = []

    async def main() -> None:
        ac = MemoryActionCache(1 << 20)
        for tag in CACHED_TAGS:
            sp = spec(tag)
            await ac.put(action_key_of(Operation("x", sp.key)), b"from-cache")
        async with trio.open_nursery() as nursery:
            if redis_url is None:
                stores: list[StateStore] = [MemoryStateStore()]
            else:
                from reexec.sched.redis_state import RedisStateStore

                prefix = f"model-{real_uuid.uuid4().hex[:8]}:"
                stores = [
                    RedisStateStore(redis_url, key_prefix=prefix, scheduler_id=f"s{i}")
                    for i in range(2)
                ]
            ss = []
            for store in stores:
                sched = Scheduler(SETTINGS, ac, store, clock=clock)
                await nursery.start(store.run)
                ss.append(sched)
            model = Model(ss, ac, clock)
            result.append(model)
            for si, step in script:
                await model.run_step(si, step)
                await model.check()
            await model.drain()
            nursery.cancel_scope.cancel()

    with mock.patch.object(scheduler_module, "uuid", fake_uuid):
        trio.run(main)
    return result[0]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(steps, min_size=30, max_size=120))
def test_random_interleavings(script: list[tuple]) -> None:
    run_model(script)


def test_random_interleavings_on_redis_with_two_schedulers(redis_url: str) -> None:
    """Two schedulers share one Redis store; racing steps make compare-and-sets conflict."""
    totals = Counter[str]()

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(steps, min_size=30, max_size=100))
    def examples(script: list[tuple]) -> None:
        m = run_model(script, redis_url)
        totals["conflicts"] += sum(sched.stats.conflicts for sched in m.ss)
        totals["races"] += sum(1 for _, step in script if step[0] == "race")

    examples()
    assert totals["races"] > 0
    # The compare-and-set is real: racing transitions lost and were re-applied.
    assert totals["conflicts"] > 0, totals


# -- a few hand-written scripts through the same model, so its checks are known to bite ---------


def script(*steps: tuple) -> list[tuple]:
    return [(0, step) for step in steps]


def test_script_dedup_and_completion() -> None:
    m = run_model(
        script(
            ("submit", 0, False, False, 0, False),
            ("submit", 0, False, False, 0, False),
            ("submit", 0, True, False, 0, False),
            ("check_cache", 0),
            ("check_cache", 1),
            ("register", 0, 2, 0),
            ("dispatch",),
            ("finish", 0, 0, "ok"),
            ("finish", 0, 0, "ok"),
            ("submit", 0, False, False, 0, False),
            ("check_cache", 0),
        )
    )
    assert len(m.names) == 3
    assert [h.outcome is not None for h in m.handles] == [True] * 4
    # The last submit hit the action cache filled by the first run.
    last = m.last[m.names[2]]
    assert last.outcome is not None and last.outcome.cached_result


def test_script_worker_churn_and_timeouts() -> None:
    m = run_model(
        script(
            ("submit", 1, False, True, 0, False),
            ("check_cache", 0),
            ("register", 1, 1, 0),
            ("dispatch",),
            ("tick", 6.0, False),  # w0 lost (no keepalive): requeued
            ("register", 1, 1, 1),
            ("dispatch",),
            ("tick", 9.0, True),  # no progress for 8 s: requeued, cancel sent to w1
            ("finish", 0, 0, "ok"),  # w1's stale report
            ("detach", 0),
            ("tick", 16.0, True),  # unwatched: cancelled
            ("tick", 16.0, True),  # and expired
        )
    )
    assert m.s.stats.workers_lost == 1 and m.s.stats.cancelled_unwatched == 1
    assert m.s.stats.retries == 2
    assert m.s.store.snapshot() == []  # type: ignore[attr-defined]
    [name] = m.names
    assert m.last[name].outcome is not None
    assert m.last[name].outcome.status is Status.CANCELLED
    assert m.last[name].history == (
        "attempt 1 on w0: worker lost (no keepalive for 5s)",
        "attempt 2 on w1: no progress for 8s",
    )
