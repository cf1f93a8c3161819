"""The journal of recent operations: summaries, bounds, per-minute series."""

from __future__ import annotations

from grpclib.const import Status

from reexec import fastpb
from reexec.sched.journal import Journal, percentile
from reexec.sched.state import (
    CacheChecked,
    Dispatched,
    Finished,
    Operation,
    Outcome,
    Stage,
    transition,
)


def _result(exit_code: int, stderr: bytes = b"") -> bytes:
    r = fastpb.ActionResult(exit_code=exit_code)
    return r.SerializeToString()


def _run(journal: Journal, name: str, *, t0: float, wait: float, run: float, exit_code: int = 0):
    op = Operation(name=name, action_key=("inst", "ab" * 32, 142, 1), created_at=t0)
    steps = [
        CacheChecked(now=t0, seq=1),
        Dispatched(worker_id="w1", now=t0 + wait),
        Finished(
            worker_id="w1",
            attempt=1,
            now=t0 + wait + run,
            seq=2,
            outcome=Outcome(result=_result(exit_code)),
        ),
    ]
    for event in steps:
        new = transition(op, event)
        journal.observe(op, new)
        op = new
    return op


def test_entry_follows_the_operation_to_its_outcome():
    j = Journal()
    _run(j, "op1", t0=600.0, wait=2.0, run=5.0, exit_code=3)
    e = j.get("op1")
    assert e is not None
    assert e.stage is Stage.COMPLETED
    assert (e.instance, e.action_size, e.last_worker_id, e.attempt) == ("inst", 142, "w1", 1)
    assert e.exit_code == 3 and e.outcome == "failed" and e.failed
    assert (e.queued_at, e.dispatched_at, e.completed_at) == (600.0, 602.0, 607.0)
    assert j.by_action("ab" * 32, 142) == [e]
    assert j.by_action("ab" * 32, 143) == []


def test_error_status_and_wall_clock_conversion():
    j = Journal(wall=lambda t: t + 1000.0)
    op = Operation(name="x", action_key=("", "cd" * 32, 1, 1), created_at=5.0)
    new = transition(op, CacheChecked(now=5.0, seq=1))
    j.observe(op, new)
    done = transition(new, Dispatched(worker_id="w", now=6.0))
    j.observe(new, done)
    end = transition(
        done,
        Finished(
            worker_id="w",
            attempt=1,
            now=9.0,
            seq=2,
            outcome=Outcome(status=Status.DEADLINE_EXCEEDED, message="timed out"),
        ),
    )
    j.observe(done, end)
    e = j.get("x")
    assert e is not None and e.outcome == "error" and e.message == "timed out"
    assert e.created_at == 1005.0 and e.completed_at == 1009.0


def test_bounded_by_count_and_by_bytes_oldest_first():
    j = Journal(max_operations=3)
    for i in range(5):
        _run(j, f"op{i}", t0=float(i), wait=0.1, run=0.1)
    assert [e.name for e in j.newest_first()] == ["op4", "op3", "op2"]
    assert j.evicted == 2

    small = Journal(max_bytes=2_000)
    for i in range(10):
        _run(small, f"op{i}", t0=float(i), wait=0.1, run=0.1)
    assert 0 < len(small) < 10 and small.bytes <= 2_000
    assert small.get("op9") is not None and small.get("op0") is None


def test_large_action_results_are_dropped_not_kept():
    j = Journal(max_result_bytes=10)
    op = Operation(name="big", action_key=("", "ef" * 32, 1, 1))
    r = fastpb.ActionResult(exit_code=1, stdout_raw=b"x" * 100).SerializeToString()
    done = transition(op, CacheChecked(now=1.0, seq=1, hit=Outcome(result=r, cached_result=True)))
    j.observe(op, done)
    e = j.get("big")
    assert e is not None and e.result == b"" and e.result_dropped and e.exit_code == 1


def test_per_minute_series_and_window():
    j = Journal(window_s=600)
    for i in range(4):
        _run(j, f"a{i}", t0=60.0 * 10 + i, wait=1.0 + i, run=10.0)
    minute = j.buckets(60.0 * 10 + 30)[-1]
    assert minute.completed == minute.executed == 4
    assert sorted(minute.queue_waits) == [1.0, 2.0, 3.0, 4.0]
    assert minute.exec_times == [10.0] * 4
    assert minute.max_depth == 1  # each ran before the next was queued
    assert len(j.buckets(6000.0)) == 10
    # A transition an hour later prunes the old minutes.
    _run(j, "late", t0=60.0 * 100, wait=0.0, run=1.0)
    assert all(b.completed == 0 for b in j.buckets(60.0 * 10 + 30))


def test_queue_depth_counts_operations_waiting_together():
    j = Journal()
    ops = [Operation(name=f"q{i}", action_key=("", "aa" * 32, i, 1)) for i in range(3)]
    queued = [transition(op, CacheChecked(now=120.0 + i, seq=i)) for i, op in enumerate(ops)]
    for op, new in zip(ops, queued, strict=True):
        j.observe(op, new)
    j.observe(queued[0], transition(queued[0], Dispatched(worker_id="w", now=125.0)))
    assert j.buckets(130.0)[-1].max_depth == 3


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
