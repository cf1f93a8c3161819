"""The pure operation state machine: every transition, every stale case, retry accounting."""

from __future__ import annotations

import dataclasses

import pytest
from grpclib.const import Status
from hypothesis import given, settings
from hypothesis import strategies as st

from reexec.sched.state import (
    HISTORY_LIMIT,
    CacheChecked,
    Cancel,
    Dispatched,
    Finished,
    Operation,
    Outcome,
    ProgressReported,
    Requeue,
    Stage,
    StaleEvent,
    WaiterAttached,
    WaiterDetached,
    transition,
)

KEY = ("", "ab" * 32, 10, 1)
OK = Outcome(result=b"result")
FAIL = Outcome(status=Status.INTERNAL, message="disk full")


def new_op(**kw: object) -> Operation:
    return Operation(name="op", action_key=KEY, waiters=1, **kw)  # type: ignore[arg-type]


def step(op: Operation, event: object) -> Operation:
    new = transition(op, event)  # type: ignore[arg-type]
    assert new.version == op.version + 1
    assert new.name == op.name and new.action_key == op.action_key
    return new


def queued(seq: int = 1, now: float = 1.0) -> Operation:
    return step(new_op(created_at=0.5), CacheChecked(now, seq))


def executing(worker: str = "w1", now: float = 2.0) -> Operation:
    return step(queued(), Dispatched(worker, now))


def completed() -> Operation:
    op = executing()
    return step(op, Finished("w1", op.attempt, 3.0, 9, OK))


# -- the happy paths ------------------------------------------------------------------------------


def test_new_operation_defaults() -> None:
    op = new_op()
    assert op.stage is Stage.CACHE_CHECK
    assert op.version == 0 and op.attempt == 0 and op.retries == 0
    assert not op.done and op.outcome is None
    assert op.worker_id == ""


def test_cache_miss_queues() -> None:
    op = step(new_op(), CacheChecked(now=4.0, seq=17))
    assert op.stage is Stage.QUEUED
    assert op.queued_at == 4.0 and op.queue_seq == 17
    assert op.outcome is None and not op.done


def test_cache_hit_completes() -> None:
    hit = Outcome(result=b"cached", cached_result=True)
    op = step(new_op(), CacheChecked(now=4.0, seq=17, hit=hit))
    assert op.stage is Stage.COMPLETED and op.done
    assert op.outcome == hit and op.completed_at == 4.0
    assert op.attempt == 0


def test_dispatch_starts_an_attempt() -> None:
    op = step(queued(), Dispatched("w7", 5.0))
    assert op.stage is Stage.EXECUTING
    assert op.worker_id == "w7" and op.attempt == 1
    assert op.dispatched_at == 5.0 and op.last_progress_at == 5.0
    assert op.worker_id == "w7"


def test_progress_from_the_current_attempt() -> None:
    op = executing()
    op2 = step(op, ProgressReported("w1", 1, 9.5))
    assert op2.last_progress_at == 9.5
    assert op2.stage is Stage.EXECUTING and op2.dispatched_at == op.dispatched_at


def test_finished_completes_with_the_outcome() -> None:
    op = step(executing(), Finished("w1", 1, 7.0, 3, FAIL))  # non-retryable failure
    assert op.done and op.outcome == FAIL and op.completed_at == 7.0
    assert op.retries == 0 and op.history == ()
    assert op.stage is Stage.COMPLETED and op.worker_id == "w1"  # who ran it


def test_finished_ok() -> None:
    op = step(executing(), Finished("w1", 1, 7.0, 3, OK))
    assert op.done and op.outcome == OK


def test_retryable_finish_requeues_with_history() -> None:
    op = step(executing(), Finished("w1", 1, 7.0, 42, FAIL, retryable=True))
    assert op.stage is Stage.QUEUED
    assert op.worker_id == "" and op.retries == 1 and op.attempt == 1
    assert op.queued_at == 7.0 and op.queue_seq == 42
    assert op.history == ("attempt 1 on w1: INTERNAL: disk full",)
    again = step(op, Dispatched("w2", 8.0))
    assert again.attempt == 2 and again.worker_id == "w2"


def test_requeue_counts_a_retry() -> None:
    op = step(executing(), Requeue("w1", 1, 7.0, 5, "worker lost (gone)"))
    assert op.stage is Stage.QUEUED and op.retries == 1 and op.queue_seq == 5
    assert op.history == ("attempt 1 on w1: worker lost (gone)",)


def test_decline_requeues_without_counting() -> None:
    op = step(executing(), Requeue("w1", 1, 7.0, 5, "declined: no", counts=False))
    assert op.stage is Stage.QUEUED and op.retries == 0
    assert op.history == ("attempt 1 on w1: declined: no",)


@pytest.mark.parametrize("stage", ["cache_check", "queued", "executing"])
def test_cancel_from_each_stage(stage: str) -> None:
    op = {"cache_check": new_op(), "queued": queued(), "executing": executing()}[stage]
    done = step(op, Cancel(11.0, "client said so"))
    assert done.done and done.completed_at == 11.0
    assert done.outcome == Outcome(status=Status.CANCELLED, message="client said so")


def test_cancel_with_another_status() -> None:
    done = step(queued(), Cancel(3.0, "shutting down", Status.UNAVAILABLE))
    assert done.outcome is not None and done.outcome.status is Status.UNAVAILABLE


def test_cancel_default_reason() -> None:
    done = step(queued(), Cancel(3.0))
    assert done.outcome == Outcome(status=Status.CANCELLED, message="cancelled")


# -- stale events ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        ProgressReported("w2", 1, 9.0),  # another worker
        ProgressReported("w1", 2, 9.0),  # another attempt
        ProgressReported("w1", 0, 9.0),
        Finished("w2", 1, 9.0, 1, OK),
        Finished("w1", 2, 9.0, 1, OK),
        Requeue("w2", 1, 9.0, 1, "lost"),
        Requeue("w1", 0, 9.0, 1, "lost"),
        Requeue("w1", 2, 9.0, 1, "declined", counts=False),
    ],
)
def test_reports_from_another_worker_or_attempt_are_stale(event: object) -> None:
    with pytest.raises(StaleEvent):
        transition(executing(), event)  # type: ignore[arg-type]


def test_report_from_a_superseded_attempt_is_stale() -> None:
    op = step(executing("w1"), Requeue("w1", 1, 5.0, 2, "worker lost"))
    op = step(op, Dispatched("w1", 6.0))  # same worker, new attempt
    assert op.attempt == 2
    for event in (
        Finished("w1", 1, 7.0, 3, OK),
        ProgressReported("w1", 1, 7.0),
        Requeue("w1", 1, 7.0, 3, "x"),
    ):
        with pytest.raises(StaleEvent):
            transition(op, event)
    assert step(op, Finished("w1", 2, 7.0, 3, OK)).done


@pytest.mark.parametrize("make", [new_op, queued])
@pytest.mark.parametrize(
    "event",
    [
        ProgressReported("w1", 1, 9.0),
        Finished("w1", 1, 9.0, 1, OK),
        Finished("w1", 0, 9.0, 1, OK),
        Requeue("w1", 1, 9.0, 1, "lost"),
    ],
)
def test_worker_reports_before_execution_are_stale(make: object, event: object) -> None:
    with pytest.raises(StaleEvent):
        transition(make(), event)  # type: ignore[operator, arg-type]


@pytest.mark.parametrize(
    "event",
    [
        CacheChecked(9.0, 1),
        CacheChecked(9.0, 1, OK),
        Dispatched("w1", 9.0),
        ProgressReported("w1", 1, 9.0),
        Finished("w1", 1, 9.0, 1, OK),
        Finished("w1", 1, 9.0, 1, FAIL, retryable=True),
        Requeue("w1", 1, 9.0, 1, "lost"),
        Requeue("w1", 1, 9.0, 1, "declined", counts=False),
        Cancel(9.0),
    ],
)
@pytest.mark.parametrize("how", ["finished", "cancelled", "cache_hit", "gave_up"])
def test_nothing_but_waiters_applies_after_completion(event: object, how: str) -> None:
    if how == "finished":
        done = completed()
    elif how == "cancelled":
        done = step(executing(), Cancel(3.0))
    elif how == "cache_hit":
        done = step(new_op(), CacheChecked(1.0, 1, Outcome(cached_result=True)))
    else:
        done = step(executing(), Requeue("w1", 1, 3.0, 2, "lost", max_retries=0))
    assert done.done
    with pytest.raises(StaleEvent):
        transition(done, event)  # type: ignore[arg-type]
    # Waiters may still come and go on a completed operation.
    attached = step(done, WaiterAttached(10.0))
    assert attached.waiters == done.waiters + 1 and attached.outcome == done.outcome
    assert step(attached, WaiterDetached(11.0)).waiters == done.waiters


@pytest.mark.parametrize("make", [new_op, executing])
def test_dispatch_of_a_non_queued_operation_is_stale(make: object) -> None:
    with pytest.raises(StaleEvent):
        transition(make(), Dispatched("w9", 9.0))  # type: ignore[operator]


@pytest.mark.parametrize("make", [queued, executing])
def test_cache_result_after_the_check_is_stale(make: object) -> None:
    with pytest.raises(StaleEvent):
        transition(make(), CacheChecked(9.0, 5))  # type: ignore[operator]
    with pytest.raises(StaleEvent):
        transition(make(), CacheChecked(9.0, 5, OK))  # type: ignore[operator]


def test_detach_without_a_waiter_is_stale() -> None:
    op = step(new_op(), WaiterDetached(1.0))
    assert op.waiters == 0
    with pytest.raises(StaleEvent):
        transition(op, WaiterDetached(2.0))


def test_unknown_event_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        transition(new_op(), object())  # type: ignore[arg-type]


def test_transition_does_not_mutate() -> None:
    op = queued()
    before = dataclasses.asdict(op)
    transition(op, Dispatched("w", 1.0))
    assert dataclasses.asdict(op) == before


# -- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_retryable_failures_give_up_after_max_retries(max_retries: int) -> None:
    op = queued()
    for attempt in range(1, max_retries + 2):
        op = step(op, Dispatched(f"w{attempt}", float(attempt)))
        assert op.attempt == attempt
        op = step(
            op,
            Finished(
                f"w{attempt}",
                attempt,
                attempt + 0.5,
                attempt,
                Outcome(status=Status.INTERNAL, message=f"boom{attempt}"),
                retryable=True,
                max_retries=max_retries,
            ),
        )
        if attempt <= max_retries:
            assert op.stage is Stage.QUEUED and op.retries == attempt
    assert op.done and op.retries == max_retries + 1
    assert op.attempt == max_retries + 1
    assert op.worker_id == ""
    assert op.outcome is not None and op.outcome.status is Status.UNAVAILABLE
    assert op.outcome.message.startswith(f"gave up after {max_retries} retries: ")
    for attempt in range(1, max_retries + 2):
        assert f"attempt {attempt} on w{attempt}: INTERNAL: boom{attempt}" in op.outcome.message
    assert len(op.history) == max_retries + 1
    assert op.completed_at == max_retries + 1.5


def test_counting_requeues_give_up_after_max_retries() -> None:
    op = queued()
    for attempt in (1, 2, 3):
        op = step(op, Dispatched("w", 1.0))
        op = step(op, Requeue("w", attempt, 2.0, 9, f"lost {attempt}", max_retries=2))
    assert op.done and op.outcome is not None
    assert op.outcome.status is Status.UNAVAILABLE
    assert op.outcome.message == (
        "gave up after 2 retries: attempt 1 on w: lost 1; attempt 2 on w: lost 2; "
        "attempt 3 on w: lost 3"
    )


def test_declines_never_exhaust_retries() -> None:
    op = queued()
    for attempt in range(1, 51):
        op = step(op, Dispatched("w", 1.0))
        op = step(
            op, Requeue("w", attempt, 2.0, attempt, "declined: busy", counts=False, max_retries=0)
        )
        assert op.stage is Stage.QUEUED and op.retries == 0
    # The history keeps the first and the latest notes, never more than HISTORY_LIMIT.
    assert op.attempt == 50 and op.declines == 50 and len(op.history) == HISTORY_LIMIT
    assert op.history[0].startswith("attempt 1 ") and op.history[-1].startswith("attempt 50 ")
    # A counting failure still gives up, with the declines in the history.
    op = step(op, Dispatched("w", 1.0))
    op = step(op, Finished("w", 51, 3.0, 99, FAIL, retryable=True, max_retries=0))
    assert op.done and op.outcome is not None and op.outcome.status is Status.UNAVAILABLE
    assert "declined: busy" in op.outcome.message and "INTERNAL: disk full" in op.outcome.message


def test_declines_are_bounded() -> None:
    """A precondition script that always fails must not requeue an action forever."""
    op = queued()
    for attempt in range(1, 4):
        op = step(op, Dispatched("w", 1.0))
        op = step(op, Requeue("w", attempt, 2.0, attempt, "declined: no GPU", counts=False,
                              max_declines=2))  # fmt: skip
    assert op.done and op.outcome is not None
    assert op.outcome.status is Status.FAILED_PRECONDITION
    assert "declined by workers 3 times" in op.outcome.message
    assert "no GPU" in op.outcome.message and op.retries == 0


def test_mixed_retries_count_only_counting_events() -> None:
    op = queued()
    op = step(op, Dispatched("a", 1.0))
    op = step(op, Requeue("a", 1, 1.0, 2, "declined: x", counts=False, max_retries=1))
    op = step(op, Dispatched("b", 1.0))
    op = step(op, Finished("b", 2, 1.0, 3, FAIL, retryable=True, max_retries=1))
    assert op.stage is Stage.QUEUED and op.retries == 1
    op = step(op, Dispatched("c", 1.0))
    op = step(op, Requeue("c", 3, 1.0, 4, "declined: y", counts=False, max_retries=1))
    assert op.stage is Stage.QUEUED and op.retries == 1
    op = step(op, Dispatched("d", 1.0))
    op = step(op, Requeue("d", 4, 1.0, 5, "worker lost", max_retries=1))
    assert op.done and op.retries == 2 and op.attempt == 4


# -- waiters -------------------------------------------------------------------------------------


def test_waiters_and_unwatched_since() -> None:
    op = new_op()
    assert op.waiters == 1 and op.unwatched_since == 0.0
    op = step(op, WaiterAttached(1.0))
    assert op.waiters == 2 and op.unwatched_since == 0.0
    op = step(op, WaiterDetached(2.0))
    assert op.waiters == 1 and op.unwatched_since == 0.0
    op = step(op, WaiterDetached(3.0))
    assert op.waiters == 0 and op.unwatched_since == 3.0
    op = step(op, CacheChecked(4.0, 1))  # other transitions keep unwatched_since
    assert op.unwatched_since == 3.0
    op = step(op, WaiterAttached(5.0))
    assert op.waiters == 1 and op.unwatched_since == 0.0
    op = step(op, WaiterDetached(6.0))
    assert op.unwatched_since == 6.0


def test_waiters_do_not_change_the_stage() -> None:
    for op in (new_op(), queued(), executing()):
        attached = step(op, WaiterAttached(1.0))
        assert dataclasses.replace(attached, waiters=op.waiters, version=op.version) == op


# -- property: random event sequences -----------------------------------------------------------

WORKERS = ("w1", "w2")

events = st.one_of(
    st.builds(CacheChecked, st.just(1.0), st.integers(1, 5), st.sampled_from([None, OK])),
    st.builds(Dispatched, st.sampled_from(WORKERS), st.just(1.0)),
    st.builds(ProgressReported, st.sampled_from(WORKERS), st.integers(0, 4), st.just(1.0)),
    st.builds(
        Finished,
        st.sampled_from(WORKERS),
        st.integers(0, 4),
        st.just(1.0),
        st.integers(1, 5),
        st.sampled_from([OK, FAIL]),
        retryable=st.booleans(),
        max_retries=st.just(2),
    ),
    st.builds(
        Requeue,
        st.sampled_from(WORKERS),
        st.integers(0, 4),
        st.just(1.0),
        st.integers(1, 5),
        st.just("r"),
        counts=st.booleans(),
        max_retries=st.just(2),
    ),
    st.builds(Cancel, st.just(1.0)),
    st.builds(WaiterAttached, st.just(1.0)),
    st.builds(WaiterDetached, st.just(1.0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=40))
def test_random_event_sequences(evs: list[object]) -> None:
    op = new_op()
    for ev in evs:
        try:
            new = transition(op, ev)  # type: ignore[arg-type]
        except StaleEvent:
            continue
        assert new.version == op.version + 1
        if op.done:  # only waiter bookkeeping after completion
            assert isinstance(ev, WaiterAttached | WaiterDetached)
            assert new.outcome == op.outcome and new.completed_at == op.completed_at
        assert new.done == (new.outcome is not None)
        assert new.waiters >= 0
        assert new.attempt >= op.attempt and new.retries >= op.retries
        assert new.retries <= 3  # max_retries + 1
        if new.stage is Stage.EXECUTING:
            assert new.worker_id
        if new.stage is Stage.QUEUED:
            assert new.worker_id == ""
        # Every attempt after the first follows a requeue, and every requeue leaves a note.
        if len(new.history) < HISTORY_LIMIT:
            assert new.retries + new.declines <= len(new.history)
            assert new.attempt <= len(new.history) + 1
        op = new
