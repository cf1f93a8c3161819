"""Scheduler example tests: dedup, ordering, worker choice, timers, cancellation, caching."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from grpclib.const import Status

from reexec.cas.action_cache import ActionCache, ActionKey
from reexec.errors import FailedPrecondition, ResourceExhausted
from reexec.sched.scheduler import action_key_of
from reexec.sched.state import Outcome, Stage
from tests.sched.harness import Harness, spec

OK = Outcome(result=b"ok")
LINUX = (("OSFamily", "linux"),)
RULES = {"OSFamily": "exact", "cores": "minimum"}


@pytest.fixture
def clock(mock_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    # Start well away from 0: the records use 0.0 as "not set".
    mock_clock.jump(1000)
    return mock_clock


# -- deduplication ---------------------------------------------------------------------------------


async def test_submit_while_queued_merges(clock: trio.testing.MockClock) -> None:
    h = Harness()
    a, merged_a = await h.submit("x")
    assert not merged_a and a.stage is Stage.QUEUED and a.waiters == 1
    b, merged_b = await h.submit("x")
    assert merged_b and b.name == a.name and b.waiters == 2
    assert h.s.stats.merged == 1 and h.s.stats.executes == 2
    assert len(h.s.store.snapshot()) == 1 and h.s.queued() == 1


async def test_submit_during_cache_check_merges(clock: trio.testing.MockClock) -> None:
    h = Harness()
    a, _ = await h.s.submit(spec("x"))
    b, merged = await h.s.submit(spec("x"))
    assert merged and b.name == a.name and b.stage is Stage.CACHE_CHECK and b.waiters == 2


async def test_submit_while_executing_merges_and_after_completion_does_not(
    clock: trio.testing.MockClock,
) -> None:
    h = Harness()
    w = h.worker("w1")
    a, _ = await h.submit("x")
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 1)]
    b, merged = await h.submit("x")
    assert merged and b.name == a.name and b.stage is Stage.EXECUTING and b.waiters == 2
    await h.s.finished(w, a.name, 1, OK, retryable=False)
    assert h.get(a.name).done
    c, merged = await h.submit("x")
    assert not merged and c.name != a.name and c.stage is Stage.QUEUED


async def test_different_instances_and_digests_do_not_merge(clock: trio.testing.MockClock) -> None:
    h = Harness()
    a, _ = await h.submit("x")
    b, mb = await h.submit("y")
    c, mc = await h.submit("x", instance="other")
    assert not mb and not mc and len({a.name, b.name, c.name}) == 3


async def test_do_not_cache_is_never_merged(clock: trio.testing.MockClock) -> None:
    h = Harness()
    a, _ = await h.submit("x", do_not_cache=True)
    b, mb = await h.submit("x", do_not_cache=True)
    assert not mb and a.name != b.name
    # Nor does a cacheable request merge into a do_not_cache operation, or the reverse.
    c, mc = await h.submit("x")
    assert not mc and c.name not in (a.name, b.name)
    d, md = await h.submit("x", do_not_cache=True)
    assert not md and d.name not in (a.name, b.name, c.name)
    e, me = await h.submit("x")
    assert me and e.name == c.name
    assert len(h.s.store.snapshot()) == 4 and h.s.queued() == 4


# -- cache check -------------------------------------------------------------------------------------


async def test_action_cache_hit_completes(clock: trio.testing.MockClock) -> None:
    h = Harness()
    await h.ac.put(ActionKey("", spec("x").digest), b"cached-result")
    op, _ = await h.submit("x")
    assert op.done and op.stage is Stage.COMPLETED
    assert op.outcome == Outcome(result=b"cached-result", cached_result=True)
    assert op.attempt == 0 and h.s.queued() == 0
    assert h.s.stats.cache_hits == 1 and h.s.stats.completed == {"cached": 1}
    # A cache hit does not index the operation for merging.
    again, merged = await h.submit("x")
    assert not merged and again.name != op.name and again.outcome is not None
    assert again.outcome.cached_result


async def test_action_cache_is_per_instance(clock: trio.testing.MockClock) -> None:
    h = Harness()
    await h.ac.put(ActionKey("main", spec("x").digest), b"r")
    op, _ = await h.submit("x", instance="other")
    assert op.stage is Stage.QUEUED
    op, _ = await h.submit("x", instance="main")
    assert op.done and action_key_of(op) == ActionKey("main", spec("x").digest)


@pytest.mark.parametrize("flag", ["skip_cache_lookup", "do_not_cache"])
async def test_cache_lookup_skipped(clock: trio.testing.MockClock, flag: str) -> None:
    h = Harness()
    await h.ac.put(ActionKey("", spec("x").digest), b"cached-result")
    op, _ = await h.submit("x", **{flag: True})
    assert op.stage is Stage.QUEUED and h.s.stats.cache_hits == 0


async def test_failing_action_cache_executes_instead(clock: trio.testing.MockClock) -> None:
    class Broken(ActionCache):
        async def get(self, key: ActionKey) -> bytes | None:
            raise OSError("disk on fire")

        async def put(self, key: ActionKey, result: bytes) -> None:
            raise AssertionError

    h = Harness()
    h.s.ac = Broken()
    op, _ = await h.submit("x")
    assert op.stage is Stage.QUEUED


async def test_cancel_during_cache_check(clock: trio.testing.MockClock) -> None:
    h = Harness()
    op, _ = await h.s.submit(spec("x"))
    cancelled = await h.s.cancel(op.name)
    assert cancelled is not None and cancelled.done
    assert await h.s.check_cache(op) is None
    assert h.get(op.name).outcome == cancelled.outcome
    assert h.s.queued() == 0


# -- dispatch order ---------------------------------------------------------------------------------


async def test_priority_then_fifo_dispatch_order(clock: trio.testing.MockClock) -> None:
    h = Harness(supported_platform_properties=RULES)
    names = {}
    for tag, prio in [("a", 5), ("b", 0), ("c", 5), ("d", -1), ("e", 0)]:
        op, _ = await h.submit(tag, priority=prio, queue_key=LINUX if tag in "ce" else ())
        names[op.name] = tag
        clock.jump(1)
    w = h.worker("w1", [("OSFamily", "linux")], max_inflight=1)
    order = []
    for _ in range(5):
        assert await h.s.dispatch_ready() == 1
        assert await h.s.dispatch_ready() == 0  # the one slot is taken
        [(kind, name, attempt)] = h.sent("w1")
        assert kind == "start" and attempt == 1
        order.append(names[name])
        await h.s.finished(w, name, attempt, OK, retryable=False)
    assert order == ["d", "b", "e", "a", "c"]
    assert await h.s.dispatch_ready() == 0


async def test_requeued_operation_goes_behind_its_priority(clock: trio.testing.MockClock) -> None:
    h = Harness()
    a, _ = await h.submit("a")
    b, _ = await h.submit("b")
    w = h.worker("w1")
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 1)]
    await h.s.finished(w, a.name, 1, Outcome(status=Status.INTERNAL), retryable=True)
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", b.name, 1)]
    await h.s.finished(w, b.name, 1, OK, retryable=False)
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 2)]


async def test_unmatched_operations_wait_for_a_matching_worker(
    clock: trio.testing.MockClock,
) -> None:
    h = Harness(supported_platform_properties=RULES)
    big, _ = await h.submit("big", queue_key=(("cores", "8"),))
    small, _ = await h.submit("small", queue_key=(("cores", "2"),))
    h.worker("small-worker", [("cores", "4")], max_inflight=4)
    assert await h.s.dispatch_ready() == 1
    assert h.sent("small-worker") == [("start", small.name, 1)]
    assert h.get(big.name).stage is Stage.QUEUED
    h.worker("big-worker", [("cores", "16")])
    assert await h.s.dispatch_ready() == 1
    assert h.sent("big-worker") == [("start", big.name, 1)]


async def test_backpressure(clock: trio.testing.MockClock) -> None:
    h = Harness()
    w = h.worker("w1", max_inflight=1)
    a, _ = await h.submit("a")
    b, _ = await h.submit("b")
    assert await h.s.dispatch_ready() == 1
    assert await h.s.dispatch_ready() == 0
    assert h.sent("w1") == [("start", a.name, 1)]
    assert h.get(b.name).stage is Stage.QUEUED
    await h.s.progress(w, a.name, 1)
    assert await h.s.dispatch_ready() == 0
    await h.s.finished(w, a.name, 1, OK, retryable=False)
    assert await h.s.dispatch_ready() == 1
    assert h.sent("w1") == [("start", b.name, 1)]


async def test_max_inflight_is_at_least_one(clock: trio.testing.MockClock) -> None:
    h = Harness()
    w = h.worker("w1", max_inflight=0)
    assert w.max_inflight == 1
    await h.submit("a")
    assert await h.s.dispatch_ready() == 1


async def test_several_slots_fill_in_one_pass(clock: trio.testing.MockClock) -> None:
    h = Harness()
    h.worker("w1", max_inflight=3)
    ops = [(await h.submit(t))[0] for t in "abcde"]
    assert await h.s.dispatch_ready() == 3
    assert [m[1] for m in h.sent("w1")] == [o.name for o in ops[:3]]


@pytest.mark.parametrize("strategy", ["least_recently_used", "most_recently_used"])
async def test_worker_choice(clock: trio.testing.MockClock, strategy: str) -> None:
    h = Harness(allocation_strategy=strategy)
    for wid in ("w1", "w2", "w3"):
        h.worker(wid, max_inflight=2)
    got = []
    for tag in "abcd":
        clock.jump(1)
        await h.submit(tag)
        assert await h.s.dispatch_ready() == 1
        [who] = [wid for wid in ("w1", "w2", "w3") if h.sent(wid)]
        got.append(who)
    if strategy == "least_recently_used":
        assert got == ["w1", "w2", "w3", "w1"]
    else:  # sticks to the most recent worker until it is full
        assert got == ["w3", "w3", "w2", "w2"]


async def test_lru_prefers_the_worker_idle_longest(clock: trio.testing.MockClock) -> None:
    h = Harness()
    w1 = h.worker("w1", max_inflight=2)
    h.worker("w2", max_inflight=2)
    a, _ = await h.submit("a")
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 1)]
    clock.jump(1)
    await h.s.finished(w1, a.name, 1, OK, retryable=False)
    b, _ = await h.submit("b")
    await h.s.dispatch_ready()
    assert h.sent("w2") == [("start", b.name, 1)]


async def test_going_away_worker_gets_nothing_new(clock: trio.testing.MockClock) -> None:
    h = Harness()
    w1 = h.worker("w1", max_inflight=4)
    a, _ = await h.submit("a")
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 1)]
    h.s.worker_going_away(w1)
    b, _ = await h.submit("b")
    assert await h.s.dispatch_ready() == 0 and h.sent("w1") == []
    # Its running action still completes normally.
    done = await h.s.finished(w1, a.name, 1, OK, retryable=False)
    assert done is not None and done.done and done.outcome == OK
    assert await h.s.dispatch_ready() == 0
    h.worker("w2")
    assert await h.s.dispatch_ready() == 1
    assert h.sent("w2") == [("start", b.name, 1)]


async def test_duplicate_worker_id_is_refused(clock: trio.testing.MockClock) -> None:
    h = Harness()
    w = h.worker("w1")
    with pytest.raises(FailedPrecondition, match="w1"):
        h.worker("w1")
    await h.s.worker_lost(w, "disconnected")
    h.worker("w1")  # the id is free again


# -- workers failing ---------------------------------------------------------------------------------


async def test_keepalive_loss_requeues_with_a_new_attempt(clock: trio.testing.MockClock) -> None:
    h = Harness(worker_timeout_s=5.0)
    w1 = h.worker("w1", max_inflight=2)
    a, _ = await h.submit("a")
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 1)]
    clock.jump(4)
    h.s.worker_seen(w1)
    clock.jump(4)
    await h.s.check_timers()
    assert "w1" in h.s.workers  # seen 4 s ago
    clock.jump(1.5)
    await h.s.check_timers()
    assert "w1" not in h.s.workers and h.s.stats.workers_lost == 1
    op = h.get(a.name)
    assert op.stage is Stage.QUEUED and op.retries == 1 and op.worker_id == ""
    assert op.history == ("attempt 1 on w1: worker lost (no keepalive for 5s)",)
    assert a.name in h.s.store.queues
    h.worker("w2")
    await h.s.dispatch_ready()
    assert h.sent("w2") == [("start", a.name, 2)]
    op = h.get(a.name)
    assert op.stage is Stage.EXECUTING and op.worker_id == "w2" and op.attempt == 2
    # The lost worker's late report is ignored.
    assert await h.s.finished(w1, a.name, 1, OK, retryable=False) is None
    assert h.get(a.name).stage is Stage.EXECUTING


async def test_worker_lost_gives_up_after_max_retries(clock: trio.testing.MockClock) -> None:
    h = Harness(max_job_retries=1)
    a, _ = await h.submit("a")
    for i in range(2):
        w = h.worker(f"w{i}")
        await h.s.dispatch_ready()
        assert h.sent(f"w{i}") == [("start", a.name, i + 1)]
        await h.s.worker_lost(w, "disconnected")
    op = h.get(a.name)
    assert op.done and op.outcome is not None and op.outcome.status is Status.UNAVAILABLE
    assert "gave up after 1 retries" in op.outcome.message
    assert "attempt 2 on w1: worker lost (disconnected)" in op.outcome.message
    assert h.s.queued() == 0


async def test_worker_lost_twice_is_harmless(clock: trio.testing.MockClock) -> None:
    h = Harness()
    w = h.worker("w1")
    await h.submit("a")
    await h.s.dispatch_ready()
    await h.s.worker_lost(w, "x")
    await h.s.worker_lost(w, "x")
    assert h.s.stats.workers_lost == 1
    # A new connection under the same id is not removed by the old one's loss.
    w_new = h.worker("w1")
    await h.s.worker_lost(w, "late")
    assert h.s.workers["w1"] is w_new


async def test_retryable_failures_then_give_up(clock: trio.testing.MockClock) -> None:
    h = Harness(max_job_retries=2)
    w = h.worker("w1")
    a, _ = await h.submit("a")
    for attempt in (1, 2, 3):
        await h.s.dispatch_ready()
        assert h.sent("w1") == [("start", a.name, attempt)]
        await h.s.finished(w, a.name, attempt, Outcome(status=Status.INTERNAL, message="io"), True)
    op = h.get(a.name)
    assert op.done and op.outcome is not None and op.outcome.status is Status.UNAVAILABLE
    assert op.retries == 3 and h.s.stats.retries == 3
    assert await h.s.dispatch_ready() == 0


async def test_decline_pauses_the_worker_and_does_not_count(clock: trio.testing.MockClock) -> None:
    h = Harness(max_job_retries=0, decline_pause_s=2.0)
    w1 = h.worker("w1")
    a, _ = await h.submit("a")
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 1)]
    await h.s.declined(w1, a.name, 1, "precondition failed")
    op = h.get(a.name)
    assert op.stage is Stage.QUEUED and op.retries == 0
    assert op.history == ("attempt 1 on w1: declined: precondition failed",)
    assert await h.s.dispatch_ready() == 0  # w1 is paused
    clock.jump(2.5)
    await h.s.check_timers()
    assert w1.paused_until == 0.0
    assert await h.s.dispatch_ready() == 1
    assert h.sent("w1") == [("start", a.name, 2)]
    await h.s.declined(w1, a.name, 2, "again")
    w2 = h.worker("w2")
    assert await h.s.dispatch_ready() == 1
    assert h.sent("w2") == [("start", a.name, 3)]
    done = await h.s.finished(w2, a.name, 3, OK, retryable=False)
    assert done is not None and done.outcome == OK


# -- timers ---------------------------------------------------------------------------------------


async def test_no_progress_timeout_requeues_and_cancels(clock: trio.testing.MockClock) -> None:
    h = Harness(max_action_executing_timeout_s=10.0, worker_timeout_s=100.0)
    w1 = h.worker("w1")
    a, _ = await h.submit("a")
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 1)]
    clock.jump(8)
    await h.s.progress(w1, a.name, 1)
    clock.jump(8)
    await h.s.check_timers()
    assert h.get(a.name).stage is Stage.EXECUTING  # progress 8 s ago
    clock.jump(3)
    await h.s.check_timers()
    assert h.sent("w1") == [("cancel", a.name, 1)]
    op = h.get(a.name)
    assert op.stage is Stage.QUEUED and op.retries == 1
    assert op.history == ("attempt 1 on w1: no progress for 10s",)
    # The worker's slot stays taken until it reports on the cancelled attempt.
    assert await h.s.dispatch_ready() == 0
    w2 = h.worker("w2")
    assert await h.s.dispatch_ready() == 1
    assert h.sent("w2") == [("start", a.name, 2)]
    # The first worker's late Finished for attempt 1 is stale.
    assert await h.s.finished(w1, a.name, 1, OK, retryable=False) is None
    assert h.get(a.name).stage is Stage.EXECUTING and w1.running == set()
    done = await h.s.finished(w2, a.name, 2, Outcome(result=b"second"), retryable=False)
    assert done is not None and done.outcome == Outcome(result=b"second")


async def test_no_progress_timeout_disabled_by_default(clock: trio.testing.MockClock) -> None:
    h = Harness(worker_timeout_s=1e9)
    h.worker("w1")
    a, _ = await h.submit("a")
    await h.s.dispatch_ready()
    clock.jump(1e6)
    await h.s.check_timers()
    assert h.get(a.name).stage is Stage.EXECUTING


async def test_unwatched_operation_is_cancelled(clock: trio.testing.MockClock) -> None:
    h = Harness(client_action_timeout_s=30.0)
    a, _ = await h.submit("a")
    await h.s.detach(a.name)
    assert h.get(a.name).unwatched_since == h.s.now()
    clock.jump(20)
    await h.s.check_timers()
    assert h.get(a.name).stage is Stage.QUEUED
    clock.jump(11)
    await h.s.check_timers()
    op = h.get(a.name)
    assert op.done and op.outcome is not None and op.outcome.status is Status.CANCELLED
    assert "no client waited for 30s" in op.outcome.message
    assert h.s.stats.cancelled_unwatched == 1
    assert a.name not in h.s.store.queues


async def test_watched_operation_is_not_cancelled(clock: trio.testing.MockClock) -> None:
    h = Harness(client_action_timeout_s=30.0)
    a, _ = await h.submit("a")
    await h.submit("a")
    await h.s.detach(a.name)  # one of two waiters leaves
    clock.jump(1000)
    await h.s.check_timers()
    assert h.get(a.name).stage is Stage.QUEUED and h.get(a.name).waiters == 1


async def test_reattaching_resets_the_unwatched_clock(clock: trio.testing.MockClock) -> None:
    h = Harness(client_action_timeout_s=30.0)
    a, _ = await h.submit("a")
    await h.s.detach(a.name)
    clock.jump(20)
    assert await h.s.attach(a.name) is not None
    clock.jump(20)
    await h.s.check_timers()
    assert not h.get(a.name).done
    await h.s.detach(a.name)
    clock.jump(25)
    await h.s.check_timers()
    assert not h.get(a.name).done
    clock.jump(10)
    await h.s.check_timers()
    assert h.get(a.name).done


async def test_unwatched_executing_operation_cancel_reaches_the_worker(
    clock: trio.testing.MockClock,
) -> None:
    h = Harness(client_action_timeout_s=5.0, worker_timeout_s=100.0)
    h.worker("w1")
    a, _ = await h.submit("a")
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 1)]
    await h.s.detach(a.name)
    clock.jump(6)
    await h.s.check_timers()
    assert h.sent("w1") == [("cancel", a.name, 1)]
    assert h.get(a.name).done


async def test_unwatched_since_time_zero(mock_clock: trio.testing.MockClock) -> None:
    # A clock that starts at 0.0 (trio's MockClock) must not make the detach time look unset.
    h = Harness(client_action_timeout_s=30.0)
    a, _ = await h.submit("a")
    assert trio.current_time() == 0.0
    await h.s.detach(a.name)
    mock_clock.jump(31)
    await h.s.check_timers()
    assert h.get(a.name).done


async def test_client_timeout_disabled(clock: trio.testing.MockClock) -> None:
    h = Harness(client_action_timeout_s=0.0)
    a, _ = await h.submit("a")
    await h.s.detach(a.name)
    clock.jump(1e6)
    await h.s.check_timers()
    assert not h.get(a.name).done


async def test_completed_operations_expire(clock: trio.testing.MockClock) -> None:
    h = Harness(retain_completed_for_s=60.0)
    w = h.worker("w1")
    a, _ = await h.submit("a")
    b, _ = await h.submit("b")
    await h.s.dispatch_ready()
    await h.s.finished(w, a.name, 1, OK, retryable=False)
    clock.jump(30)
    await h.s.check_timers()  # (no keepalive needed: the default worker timeout is irrelevant here)
    assert h.get(a.name).done
    assert await h.s.attach(a.name) is not None  # a late WaitExecution still finds it
    await h.s.detach(a.name)
    clock.jump(31)
    await h.s.check_timers()
    assert h.s.store.get_now(a.name) is None
    assert await h.s.attach(a.name) is None
    assert h.s.store.get_now(b.name) is not None  # not completed: kept


async def test_store_wait_changed_sees_completion(clock: trio.testing.MockClock) -> None:
    h = Harness()
    a, _ = await h.submit("a")
    seen = []

    async def watch() -> None:
        op = h.get(a.name)
        while op is not None and not op.done:
            op = await h.s.store.wait_changed(op)
            seen.append(op.stage if op else None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        await h.s.cancel(a.name)
    assert seen == [Stage.COMPLETED]


# -- cancellation -------------------------------------------------------------------------------------


async def test_cancel_while_executing_tells_the_worker(clock: trio.testing.MockClock) -> None:
    h = Harness()
    w = h.worker("w1")
    a, _ = await h.submit("a")
    await h.s.dispatch_ready()
    assert h.sent("w1") == [("start", a.name, 1)]
    op = await h.s.cancel(a.name, "user hit ^C")
    assert op is not None and op.done
    assert op.outcome == Outcome(status=Status.CANCELLED, message="user hit ^C")
    assert h.sent("w1") == [("cancel", a.name, 1)]
    # The worker acknowledges with a Finished that no longer applies; its slot is freed.
    assert await h.s.finished(w, a.name, 1, OK, retryable=False) is None
    assert h.get(a.name).outcome == op.outcome and w.running == set()
    # Cancelling again is a no-op.
    assert await h.s.cancel(a.name) is None and h.sent("w1") == []


async def test_cancel_while_queued(clock: trio.testing.MockClock) -> None:
    h = Harness()
    a, _ = await h.submit("a")
    assert a.name in h.s.store.queues
    assert await h.s.cancel(a.name) is not None
    assert a.name not in h.s.store.queues
    h.worker("w1")
    assert await h.s.dispatch_ready() == 0 and h.sent("w1") == []


async def test_cancelled_operation_is_no_longer_merged(clock: trio.testing.MockClock) -> None:
    h = Harness()
    a, _ = await h.submit("a")
    await h.s.cancel(a.name)
    b, merged = await h.submit("a")
    assert not merged and b.name != a.name


async def test_stale_reports_after_requeue_are_ignored(clock: trio.testing.MockClock) -> None:
    h = Harness()
    w1 = h.worker("w1", max_inflight=2)
    a, _ = await h.submit("a")
    await h.s.dispatch_ready()
    await h.s.declined(w1, a.name, 1, "busy")
    w2 = h.worker("w2")
    await h.s.dispatch_ready()
    assert h.sent("w2") == [("start", a.name, 2)]
    await h.s.progress(w1, a.name, 1)
    assert (
        await h.s.finished(w1, a.name, 1, Outcome(status=Status.INTERNAL), retryable=True) is None
    )
    await h.s.declined(w1, a.name, 1, "late")
    op = h.get(a.name)
    assert op.stage is Stage.EXECUTING and op.attempt == 2 and op.worker_id == "w2"
    assert op.retries == 0 and len(op.history) == 1
    assert await h.s.finished(w2, a.name, 2, OK, retryable=False) is not None


async def test_declines_end_the_action_after_max_declines(clock: trio.testing.MockClock) -> None:
    """A precondition script that always fails must not requeue an action forever."""
    h = Harness(max_declines=3, decline_pause_s=0.0)
    w = h.worker("w1")
    a, _ = await h.submit("a")
    for attempt in range(1, 5):
        assert await h.s.dispatch_ready() == 1
        assert h.sent("w1") == [("start", a.name, attempt)]
        await h.s.declined(w, a.name, attempt, "no GPU here")
    op = h.get(a.name)
    assert op.done and op.outcome is not None
    assert op.outcome.status is Status.FAILED_PRECONDITION
    assert "declined by workers 4 times" in op.outcome.message
    assert await h.s.dispatch_ready() == 0 and h.s.queued() == 0


async def test_skip_cache_lookup_does_not_merge_into_a_cache_check(
    clock: trio.testing.MockClock,
) -> None:
    h = Harness()
    await h.ac.put(ActionKey("", spec("x").digest), b"cached-result")
    checking, _ = await h.s.submit(spec("x"))  # its cache check has not run yet
    fresh, merged = await h.s.submit(spec("x", skip_cache_lookup=True))
    assert not merged and fresh.name != checking.name
    hit = await h.s.check_cache(checking)
    assert hit is not None and hit.done and hit.outcome is not None and hit.outcome.cached_result
    own = await h.s.check_cache(fresh)
    assert own is not None and own.stage is Stage.QUEUED  # it runs, as the client asked
    # Once the first operation is past its cache check, skip requests merge into it as before.
    queued, _ = await h.submit("y")
    again, merged = await h.s.submit(spec("y", skip_cache_lookup=True))
    assert merged and again.name == queued.name


async def test_live_operations_are_bounded(clock: trio.testing.MockClock) -> None:
    h = Harness(max_live_operations=2)
    a, _ = await h.submit("a")
    await h.submit("b")
    with pytest.raises(ResourceExhausted, match="max_live_operations"):
        await h.s.submit(spec("c"))
    again, merged = await h.s.submit(spec("a"))  # merging costs nothing and is still allowed
    assert merged and again.name == a.name
    await h.s.cancel(a.name)
    assert h.s.store.live == 1
    c, merged = await h.submit("c")
    assert not merged and h.s.store.live == 2
