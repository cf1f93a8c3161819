"""Model-based test: random interleavings of clients, workers and timers against a Scheduler.

Each example is a list of steps run inside `trio.run` with a MockClock. Steps pick their
targets by index into the model's lists (kept in creation order, so examples replay
deterministically). After every step the invariants below are checked; at the end the system is
drained and every client must be able to read an outcome.
"""

from __future__ import annotations

import itertools
import math
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
from reexec.sched.scheduler import Scheduler, action_key_of
from reexec.sched.state import Operation, Outcome, Stage
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
steps = st.one_of(
    submit, submit, submit, check_cache, register, register, dispatch, dispatch, dispatch,
    finish, finish, finish, decline, progress, lost, going_away, detach, attach, cancel,
    tick, tick,
)  # fmt: skip


# -- the model --------------------------------------------------------------------------------------


@dataclass
class Conn:
    """One worker connection as the worker sees it."""

    state: WorkerState
    inbox: trio.MemoryReceiveChannel[tuple[str, str, int]]
    assigned: list[tuple[str, int]] = field(default_factory=list)  # StartExecutes not answered


@dataclass
class Handle:
    """A client waiting on an operation (Execute or WaitExecution)."""

    name: str
    open: bool = True
    outcome: Outcome | None = None
    hung_up: bool = False  # the client went away before the outcome


class Model:
    def __init__(self, s: Scheduler, ac: MemoryActionCache, clock: trio.testing.MockClock) -> None:
        self.s = s
        self.ac = ac
        self.clock = clock
        self.names: list[str] = []  # every operation created, in order
        self.unindexed: set[str] = set()  # skip_cache_lookup ops that bypassed a cache check
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

    def receive(self) -> None:
        """Workers read their outboxes."""
        for conn in self.conns.values():
            while True:
                try:
                    kind, name, attempt = conn.inbox.receive_nowait()
                except trio.WouldBlock:
                    break
                if kind == "start":
                    assert (name, attempt) not in conn.assigned
                    op = self.s.store.get(name)
                    assert op is not None and op.stage is Stage.EXECUTING
                    assert op.worker_id == conn.state.worker_id and op.attempt == attempt
                    conn.assigned.append((name, attempt))
                else:
                    assert kind == "cancel"
                    # Only ever for an attempt the worker was given and has not answered.
                    assert (name, attempt) in conn.assigned

    def deliver(self) -> None:
        """Clients whose operation completed read the outcome and hang up (as the service does)."""
        for h in self.handles:
            if not h.open:
                continue
            op = self.s.store.get(h.name)
            assert op is not None, f"{h.name} vanished while a client waited on it"
            if op.done:
                h.outcome = op.outcome
                h.open = False
                self.s.detach(h.name)

    def forget_lost_workers(self) -> None:
        for wid in list(self.conns):
            if self.s.workers.get(wid) is not self.conns[wid].state:
                del self.conns[wid]

    # -- steps --

    async def run_step(self, step: tuple) -> None:
        s = self.s
        kind = step[0]
        if kind == "submit":
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
                for op in s.store
                if op.action_key == sp.key
                and not op.done
                and not op.do_not_cache
                and op.name not in self.unindexed
            ]
            assert len(live) <= 1
            op, merged = s.submit(sp)
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
                n for n in self.names if (o := s.store.get(n)) and o.stage is Stage.CACHE_CHECK
            ]
            name = self.pick(pending, step[1])
            if name is not None:
                before = s.store.get(name)
                assert before is not None
                op = await s.check_cache(before)
                assert op is not None and op.stage in (Stage.QUEUED, Stage.COMPLETED)
                if op.done:
                    assert op.outcome is not None and op.outcome.cached_result
        elif kind == "register":
            _, pi, slots, wi = step
            wid = WORKER_IDS[wi]
            send, receive = trio.open_memory_channel[tuple[str, str, int]](math.inf)
            if wid in s.workers:
                with pytest.raises(FailedPrecondition):
                    s.register_worker(wid, WORKER_PLATFORMS[pi], slots, send)
            else:
                w = s.register_worker(wid, WORKER_PLATFORMS[pi], slots, send)
                self.conns[wid] = Conn(w, receive)
        elif kind == "dispatch":
            s.dispatch_ready()
        elif kind == "finish":
            got = self.pick_task(step[1], step[2])
            if got is not None:
                conn, (name, attempt) = got
                conn.assigned.remove((name, attempt))
                op = s.store.get(name)
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
                new = s.finished(conn.state, name, attempt, outcome, how == "retry")
                assert (new is not None) == current
                if new is not None and how != "retry":
                    assert new.done and new.outcome == outcome
        elif kind == "decline":
            got = self.pick_task(step[1], step[2])
            if got is not None:
                conn, (name, attempt) = got
                conn.assigned.remove((name, attempt))
                before = s.store.get(name)
                s.declined(conn.state, name, attempt, "not today")
                after = s.store.get(name)
                if before is not None and after is not None and after.version != before.version:
                    assert after.retries == before.retries
        elif kind == "progress":
            got = self.pick_task(step[1], step[2])
            if got is not None:
                conn, (name, attempt) = got
                s.progress(conn.state, name, attempt)
        elif kind == "lost":
            conn = self.pick(list(self.conns.values()), step[1])
            if conn is not None:
                s.worker_lost(conn.state, "disconnected")
        elif kind == "going_away":
            conn = self.pick(list(self.conns.values()), step[1])
            if conn is not None:
                s.worker_going_away(conn.state)
        elif kind == "detach":
            h = self.pick([h for h in self.handles if h.open], step[1])
            if h is not None:
                h.open = False
                h.hung_up = True
                s.detach(h.name)
        elif kind == "attach":
            name = self.pick(self.names, step[1])
            if name is not None:
                op = s.attach(name)
                assert (op is None) == (name not in {o.name for o in s.store})
                if op is not None:
                    self.handles.append(Handle(name))
        elif kind == "cancel":
            name = self.pick(self.names, step[1])
            if name is not None:
                before = s.store.get(name)
                op = s.cancel(name)
                if before is not None and not before.done:
                    assert op is not None and op.outcome is not None
                    assert op.outcome.status is Status.CANCELLED
                else:
                    assert op is None
        elif kind == "tick":
            _, dt, keepalive = step
            self.clock.jump(dt)
            if keepalive:
                for conn in self.conns.values():
                    s.worker_seen(conn.state)
            s.check_timers()
        else:  # pragma: no cover
            raise AssertionError(kind)
        self.forget_lost_workers()
        self.receive()
        self.deliver()

    # -- invariants --

    def check(self) -> None:
        s = self.s
        now = trio.current_time()
        cfg = s.settings
        in_store = {op.name: op for op in s.store}
        assert set(in_store) <= set(self.names)

        # Nothing is lost: an operation leaves the store only after it completed and expired.
        for name in self.names:
            op = in_store.get(name)
            prev = self.last.get(name)
            if op is None:
                assert prev is not None and prev.done, f"{name} lost before completing"
                assert now - prev.completed_at > cfg.retain_completed_for_s
                continue
            if prev is not None:
                assert op.version >= prev.version
                if prev.done:
                    assert op.done and op.outcome == prev.outcome
                    assert op.completed_at == prev.completed_at
            self.last[name] = op

        # Queues hold exactly the QUEUED operations, each under its own key.
        queued = {n for n, op in in_store.items() if op.stage is Stage.QUEUED}
        assert len(s.queues) == len(queued)
        assert sum(s.queues.depths().values()) == len(queued)
        for name, op in in_store.items():
            assert (name in s.queues) == (op.stage is Stage.QUEUED)
            if op.stage is Stage.QUEUED:
                assert s.queues._members[name][0] == op.queue_key
        for key in s.queues.keys():
            assert s.queues.head(key) is not None

        # Workers: the model's connections are the scheduler's, slots are honest and bounded.
        assert set(s.workers) == set(self.conns)
        for wid, w in s.workers.items():
            conn = self.conns[wid]
            assert conn.state is w
            assert w.running == set(conn.assigned)
            assert len(w.running) <= w.max_inflight

        for name, op in in_store.items():
            assert op.done == (op.outcome is not None) == (op.stage is Stage.COMPLETED)
            # Every EXECUTING operation is held by exactly one connected worker, current attempt.
            holders = [w for w in s.workers.values() if (name, op.attempt) in w.running]
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
            if not op.done and op.waiters == 0:
                assert s._unwatched.get(name) == op.unwatched_since
            if op.done or op.waiters > 0:
                assert name not in s._unwatched

        assert s.store.live == sum(1 for op in in_store.values() if not op.done)
        # At most one live mergeable operation per action, and it is the one indexed (besides
        # skip_cache_lookup requests that bypassed a pending cache check).
        live = Counter(
            op.action_key
            for op in in_store.values()
            if not op.done and not op.do_not_cache and op.name not in self.unindexed
        )
        for key, n in live.items():
            assert n == 1
            indexed = s.store.live_for(key)
            assert indexed is not None and indexed.action_key == key
            assert not indexed.done and not indexed.do_not_cache
        for op in in_store.values():
            if op.done or op.do_not_cache:
                indexed = s.store.live_for(op.action_key)
                assert indexed is None or indexed.name != op.name

    # -- drain --

    async def drain(self) -> None:
        s = self.s
        send, receive = trio.open_memory_channel[tuple[str, str, int]](math.inf)
        w = s.register_worker("drain", GENERIC_WORKER, 10_000, send)
        self.conns["drain"] = Conn(w, receive)
        for _ in range(10):
            for name in self.names:
                op = s.store.get(name)
                if op is not None and op.stage is Stage.CACHE_CHECK:
                    await s.check_cache(op)
            s.dispatch_ready()
            self.receive()
            for conn in list(self.conns.values()):
                for name, attempt in list(conn.assigned):
                    conn.assigned.remove((name, attempt))
                    s.finished(conn.state, name, attempt, Outcome(result=b"drained"), False)
            self.receive()
            self.deliver()
            self.check()
            if all(op.done for op in s.store):
                break
        for name in self.names:
            op = s.store.get(name)
            if op is not None and not op.done:
                # Only operations no worker can take may be left (e.g. on a paused worker).
                s.cancel(name, "drained")
        self.receive()
        self.deliver()
        self.check()
        for op in s.store:
            assert op.done
        assert len(s.queues) == 0
        for h in self.handles:
            assert not h.open and (h.hung_up or h.outcome is not None)
        assert all(not w.running for w in s.workers.values())


def run_model(script: list[tuple]) -> Model:
    clock = trio.testing.MockClock()
    counter = itertools.count(1)
    fake_uuid = mock.Mock()
    fake_uuid.uuid4.side_effect = lambda: f"op-{next(counter):04d}"
    result: list[Model] = []

    async def main() -> None:
        clock.jump(100.0)  # away from 0.0, which the records use as "not set"
        ac = MemoryActionCache(1 << 20)
        for tag in CACHED_TAGS:
            sp = spec(tag)
            await ac.put(action_key_of(Operation("x", sp.key)), b"from-cache")
        s = Scheduler(SETTINGS, ac)
        model = Model(s, ac, clock)
        result.append(model)
        for step in script:
            await model.run_step(step)
            model.check()
        await model.drain()

    with mock.patch.object(scheduler_module, "uuid", fake_uuid):
        trio.run(main, clock=clock)
    return result[0]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(steps, min_size=30, max_size=120))
def test_random_interleavings(script: list[tuple]) -> None:
    run_model(script)


# -- a few hand-written scripts through the same model, so its checks are known to bite ---------


def test_script_dedup_and_completion() -> None:
    m = run_model(
        [
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
        ]
    )
    assert len(m.names) == 3
    assert [h.outcome is not None for h in m.handles] == [True] * 4
    # The last submit hit the action cache filled by the first run.
    last = m.last[m.names[2]]
    assert last.outcome is not None and last.outcome.cached_result


def test_script_worker_churn_and_timeouts() -> None:
    m = run_model(
        [
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
        ]
    )
    assert m.s.stats.workers_lost == 1 and m.s.stats.cancelled_unwatched == 1
    assert m.s.stats.retries == 2
    assert len(m.s.store) == 0
    [name] = m.names
    assert m.last[name].outcome is not None
    assert m.last[name].outcome.status is Status.CANCELLED
    assert m.last[name].history == (
        "attempt 1 on w0: worker lost (no keepalive for 5s)",
        "attempt 2 on w1: no progress for 8s",
    )
