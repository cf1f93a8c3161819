"""The Execution and Operations services with fake workers over the real worker protocol."""

from __future__ import annotations

import functools
import uuid

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.daemon.config import SchedulerConfig
from reexec.sched.state import Stage
from tests.conftest import call, make_config, open_channel, start_daemon
from tests.fake_worker import ExecuteCall, FakeWorker, execute_request, sha, upload_action

SCHED = SchedulerConfig(
    supported_platform_properties={
        "os": "exact",
        "cores": "minimum",
        "pool": "exact",
        "hint": "priority",
    },
    worker_timeout_s=30,
)


_channels: list = []


@pytest.fixture(autouse=True)
async def _close_channels(aio_loop):
    yield
    while _channels:
        _channels.pop().close()


@pytest.fixture
async def env(aio_loop, tmp_path, nursery):
    return await _env(tmp_path, nursery, SCHED)


async def _env(tmp_path, nursery, sched):
    daemon = await start_daemon(nursery, make_config(tmp_path / "data", scheduler=sched))
    channel = await open_channel(daemon.port)
    _channels.append(channel)
    return daemon, channel, nursery


async def _worker(channel, nursery, worker_id, **kw) -> FakeWorker:
    w = FakeWorker(channel, worker_id, **kw)
    await nursery.start(w.run)
    return w


def _execute(channel, nursery, digest, **kw) -> ExecuteCall:
    c = ExecuteCall(channel, execute_request(digest, **kw))
    nursery.start_soon(c.run)
    return c


async def test_execute_runs_on_a_worker_and_streams_stages(env):
    daemon, channel, nursery = env
    worker = await _worker(channel, nursery, "w1")
    digest = await upload_action(channel, ["echo", "hi"])
    ex = _execute(channel, nursery, digest)
    start = await worker.next_start()
    assert start.action_digest.hash == digest.hash
    assert fastpb.Action.FromString(start.action).command_digest.hash
    assert list(fastpb.Command.FromString(start.command).arguments) == ["echo", "hi"]
    assert start.timeout.seconds == 600  # the default action timeout
    await worker.finish(start, exit_code=0, stdout=b"hi\n")
    await ex.finished.wait()
    assert ex.error is None
    assert ex.stages[0] in (Stage.CACHE_CHECK, Stage.QUEUED)
    assert ex.stages[-1] == Stage.COMPLETED and Stage.EXECUTING in ex.stages
    resp = ex.response
    assert resp.status.code == 0 and not resp.cached_result
    assert resp.result.stdout_raw == b"hi\n"
    assert resp.result.execution_metadata.worker == "w1"

    # The successful result was cached: a second Execute is answered from the cache.
    again = _execute(channel, nursery, digest)
    await again.finished.wait()
    assert again.response.cached_result
    assert worker.pending() == 0


async def test_failures_and_non_zero_exit_are_not_cached(env):
    _, channel, nursery = env
    worker = await _worker(channel, nursery, "w1")
    digest = await upload_action(channel, ["false"])
    ex = _execute(channel, nursery, digest)
    await worker.finish(await worker.next_start(), exit_code=1)
    await ex.finished.wait()
    assert ex.response.result.exit_code == 1
    again = _execute(channel, nursery, digest)
    start = await worker.next_start()  # executed again: exit 1 was not cached
    await worker.finish(start, status=Status.DEADLINE_EXCEEDED.value, message="timed out")
    await again.finished.wait()
    assert again.response.status.code == Status.DEADLINE_EXCEEDED.value
    third = _execute(channel, nursery, digest)
    await worker.finish(await worker.next_start())
    await third.finished.wait()
    assert not third.response.cached_result


async def test_inflight_deduplication_and_one_cancel_does_not_kill_the_other(env):
    daemon, channel, nursery = env
    worker = await _worker(channel, nursery, "w1")
    digest = await upload_action(channel, ["sleep", "1"])
    a = _execute(channel, nursery, digest)
    start = await worker.next_start()
    b = _execute(channel, nursery, digest)
    await b.first.wait()
    assert a.operations[0].name == b.operations[0].name
    assert daemon.scheduler.stats.merged == 1
    # Operations.CancelOperation is refused while two clients wait.
    ops = _ops_stub(channel)
    with pytest.raises(GRPCError) as e:
        await call(ops.cancel, _req("CancelOperationRequest", name=a.operations[0].name))
    assert e.value.status is Status.FAILED_PRECONDITION
    # Client A goes away: the action keeps running for B.
    ex_scope_cancel(a)
    await trio.sleep(0.2)
    assert worker.cancels == []
    await worker.finish(start)
    await b.finished.wait()
    assert b.response.status.code == 0
    assert len(worker.starts) == 1


async def test_do_not_cache_is_never_merged_nor_cached(env):
    daemon, channel, nursery = env
    worker = await _worker(channel, nursery, "w1", slots=2)
    digest = await upload_action(channel, ["date"], do_not_cache=True)
    a = _execute(channel, nursery, digest)
    b = _execute(channel, nursery, digest)
    s1, s2 = await worker.next_start(), await worker.next_start()
    assert s1.operation_name != s2.operation_name
    await worker.finish(s1)
    await worker.finish(s2)
    await a.finished.wait()
    await b.finished.wait()
    c = _execute(channel, nursery, digest)
    await worker.finish(await worker.next_start())
    await c.finished.wait()
    assert not c.response.cached_result


async def test_priority_then_fifo(env):
    _, channel, nursery = env
    digests = [await upload_action(channel, ["x"], salt=str(i)) for i in range(4)]
    for digest, priority in zip(digests, (5, -1, 5, 0), strict=True):
        c = _execute(channel, nursery, digest, priority=priority)
        while Stage.QUEUED not in c.stages:  # queued before the next one arrives
            await trio.sleep(0.005)
    worker = await _worker(channel, nursery, "w1")
    order = []
    for _ in range(4):
        s = await worker.next_start()
        order.append(s.action_digest.hash)
        await worker.finish(s)
    assert order == [digests[i].hash for i in (1, 3, 0, 2)]


async def test_platform_matching_exact_and_minimum(env):
    _, channel, nursery = env
    small = await _worker(channel, nursery, "small", platform={"os": "linux", "cores": "2"})
    big = await _worker(channel, nursery, "big", platform={"os": "linux", "cores": "16"}, slots=4)
    win = await _worker(channel, nursery, "win", platform={"os": "windows", "cores": "64"})
    needs8 = await upload_action(
        channel, ["a"], platform={"os": "linux", "cores": "8", "hint": "x"}
    )
    c = _execute(channel, nursery, needs8)
    s = await big.next_start()
    await big.finish(s)
    await c.finished.wait()
    assert small.pending() == 0 and win.pending() == 0
    # No worker offers os=mac: the action waits in its own queue without blocking others.
    mac = await upload_action(channel, ["b"], platform={"os": "mac"})
    _execute(channel, nursery, mac)
    linux = await upload_action(channel, ["c"], platform={"os": "linux"})
    c2 = _execute(channel, nursery, linux)
    got = None
    with trio.fail_after(5):
        while got is None:
            for w in (small, big):
                if w.pending():
                    got = await w.next_start()
                    await w.finish(got)
            await trio.sleep(0.01)
    await c2.finished.wait()


async def test_unsupported_property_and_bad_requests(env):
    _, channel, nursery = env
    digest = await upload_action(channel, ["a"], platform={"gpu": "yes"})
    c = ExecuteCall(channel, execute_request(digest))
    await c.run()
    assert isinstance(c.error, GRPCError) and c.error.status is Status.FAILED_PRECONDITION
    assert "'gpu'" in c.error.message
    # Missing action -> FAILED_PRECONDITION with a MISSING violation naming it.
    missing = sha(b"no such action")
    c = ExecuteCall(channel, execute_request(missing))
    await c.run()
    assert c.error.status is Status.FAILED_PRECONDITION
    [pf] = c.error.details
    assert pf.violations[0].type == "MISSING"
    assert pf.violations[0].subject == f"blobs/{missing.hash}/{missing.size_bytes}"
    # Timeout above the maximum -> INVALID_ARGUMENT.
    slow = await upload_action(channel, ["a"], timeout_s=99999)
    c = ExecuteCall(channel, execute_request(slow))
    await c.run()
    assert c.error.status is Status.INVALID_ARGUMENT and "maximum" in c.error.message


async def test_missing_command_and_input_root_are_all_named(env):
    _, channel, nursery = env
    from reexec.gen.build.bazel.remote.execution import v2 as re

    action = re.Action(command_digest=sha(b"cmd?"), input_root_digest=sha(b"root?"))
    cas = re.ContentAddressableStorageStub(channel)
    await call(
        cas.batch_update_blobs,
        re.BatchUpdateBlobsRequest(
            requests=[
                re.BatchUpdateBlobsRequestRequest(digest=sha(bytes(action)), data=bytes(action))
            ]
        ),
    )
    c = ExecuteCall(channel, execute_request(sha(bytes(action))))
    await c.run()
    assert c.error.status is Status.FAILED_PRECONDITION
    subjects = {v.subject for v in c.error.details[0].violations}
    assert subjects == {f"blobs/{sha(b'cmd?').hash}/4", f"blobs/{sha(b'root?').hash}/5"}


async def test_worker_loss_requeues_and_retry_limit(aio_loop, tmp_path, nursery):
    sched = SchedulerConfig(worker_timeout_s=30, max_job_retries=1)
    daemon, channel, _ = await _env(tmp_path, nursery, sched)
    digest = await upload_action(channel, ["a"])
    c = _execute(channel, nursery, digest)
    w1 = await _worker(channel, nursery, "w1")
    s1 = await w1.next_start()
    await w1.disconnect()  # worker lost while executing: requeued as a retry
    w2 = await _worker(channel, nursery, "w2")
    s2 = await w2.next_start()
    assert s2.operation_name == s1.operation_name and s2.attempt == s1.attempt + 1
    await w2.finish(s2, retryable=True, status=Status.UNAVAILABLE.value, message="disk full")
    await c.finished.wait()
    resp = c.response
    assert resp.status.code == Status.UNAVAILABLE.value
    assert "worker lost" in resp.status.message and "disk full" in resp.status.message


async def test_keepalive_loss_requeues(aio_loop, tmp_path, nursery):
    sched = SchedulerConfig(worker_timeout_s=0.5)
    daemon, channel, _ = await _env(tmp_path, nursery, sched)
    digest = await upload_action(channel, ["a"])
    c = _execute(channel, nursery, digest)
    silent = await _worker(channel, nursery, "silent")
    s1 = await silent.next_start()
    alive = FakeWorker(channel, "alive")
    await nursery.start(alive.run)

    async def keep_alive():
        while True:
            await alive.keepalive()
            await trio.sleep(0.1)

    nursery.start_soon(keep_alive)
    s2 = await alive.next_start(timeout=5)
    assert s2.operation_name == s1.operation_name and s2.attempt == 2
    await alive.finish(s2)
    await c.finished.wait()
    assert c.response.status.code == 0
    assert "silent" not in daemon.scheduler.workers


async def test_declined_action_goes_to_another_worker(env):
    _, channel, nursery = env
    digest = await upload_action(channel, ["a"])
    w1 = await _worker(channel, nursery, "w1")
    c = _execute(channel, nursery, digest)
    s1 = await w1.next_start()
    w2 = await _worker(channel, nursery, "w2")
    await w1.decline(s1, "precondition script failed")
    s2 = await w2.next_start()
    await w2.finish(s2)
    await c.finished.wait()
    assert c.response.status.code == 0


async def test_lru_and_mru(aio_loop, tmp_path, nursery):
    for strategy in ("least_recently_used", "most_recently_used"):
        sched = SchedulerConfig(allocation_strategy=strategy, worker_timeout_s=30)
        _, channel, _ = await _env(tmp_path / strategy, nursery, sched)
        a = await _worker(channel, nursery, "a")
        b = await _worker(channel, nursery, "b")
        ran = []
        for i in range(3):
            digest = await upload_action(channel, ["x"], salt=f"{strategy}{i}")
            c = _execute(channel, nursery, digest)
            while not (a.pending() or b.pending()):
                await trio.sleep(0.005)
            w = a if a.pending() else b
            ran.append(w.worker_id)
            await w.finish(await w.next_start())
            await c.finished.wait()
        if strategy == "least_recently_used":
            assert ran[0] != ran[1] and ran[2] == ran[0], ran
        else:
            assert len(set(ran)) == 1, ran


async def test_wait_execution_and_operations_api(env):
    daemon, channel, nursery = env
    worker = await _worker(channel, nursery, "w1")
    digest = await upload_action(channel, ["a"])
    c = _execute(channel, nursery, digest)
    start = await worker.next_start()
    name = start.operation_name
    ops = _ops_stub(channel)
    got = await call(ops.get, _req("GetOperationRequest", name=name))
    assert got.name == name and not got.done
    # Names are capabilities: listing them is refused unless the operator enables it.
    with pytest.raises(GRPCError) as e:
        await call(ops.list, _req("ListOperationsRequest"))
    assert e.value.status is Status.PERMISSION_DENIED
    assert "allow_list_operations" in e.value.message
    await worker.finish(start)
    await c.finished.wait()
    # WaitExecution after completion re-attaches and gets the final state at once.
    w = WaitCall(channel, name)
    await w.run()
    assert w.operations[-1].done
    with pytest.raises(GRPCError) as e:
        await call(ops.get, _req("GetOperationRequest", name="nope"))
    assert e.value.status is Status.NOT_FOUND


async def test_list_operations_when_allowed(aio_loop, tmp_path, nursery):
    config = make_config(tmp_path / "data", scheduler=SCHED, allow_list_operations=True)
    daemon = await start_daemon(nursery, config)
    channel = await open_channel(daemon.port)
    _channels.append(channel)
    worker = await _worker(channel, nursery, "w1")
    c = _execute(channel, nursery, await upload_action(channel, ["a"]))
    start = await worker.next_start()
    listed = await call(_ops_stub(channel).list, _req("ListOperationsRequest"))
    assert start.operation_name in [o.name for o in listed.operations]
    await worker.finish(start)
    await c.finished.wait()


async def test_operation_names_are_random_uuids(env):
    _, channel, nursery = env
    worker = await _worker(channel, nursery, "w1")
    names = []
    for i in range(2):
        c = _execute(channel, nursery, await upload_action(channel, ["n"], salt=str(i)))
        start = await worker.next_start()
        names.append(start.operation_name)
        await worker.finish(start)
        await c.finished.wait()
    parsed = [uuid.UUID(n) for n in names]
    assert all(u.version == 4 and str(u) == n for u, n in zip(parsed, names, strict=True))
    assert names[0] != names[1]


async def test_cancel_operation_cancels_on_the_worker(env):
    _, channel, nursery = env
    worker = await _worker(channel, nursery, "w1")
    digest = await upload_action(channel, ["sleep", "100"])
    c = _execute(channel, nursery, digest)
    start = await worker.next_start()
    await call(_ops_stub(channel).cancel, _req("CancelOperationRequest", name=start.operation_name))
    await c.finished.wait()
    assert c.response.status.code == Status.CANCELLED.value
    with trio.fail_after(2):
        while not worker.cancels:
            await trio.sleep(0.01)
    assert worker.cancels[0].operation_name == start.operation_name


async def test_client_action_timeout_cancels_unwatched_actions(aio_loop, tmp_path, nursery):
    sched = SchedulerConfig(client_action_timeout_s=0.3, worker_timeout_s=30)
    daemon, channel, _ = await _env(tmp_path, nursery, sched)
    worker = await _worker(channel, nursery, "w1")
    digest = await upload_action(channel, ["sleep", "100"])
    c = _execute(channel, nursery, digest)
    start = await worker.next_start()
    ex_scope_cancel(c)
    with trio.fail_after(5):
        while not worker.cancels:
            await trio.sleep(0.05)
    op = daemon.scheduler.store.get_now(start.operation_name)
    assert op.done and op.outcome.status is Status.CANCELLED


# -- helpers --------------------------------------------------------------------------------------


class WaitCall(ExecuteCall):
    def __init__(self, channel, name):
        req = fastpb.message_class("build.bazel.remote.execution.v2.WaitExecutionRequest")(
            name=name
        )
        super().__init__(channel, req)

    async def run(self) -> None:
        import trio_asyncio
        from grpclib.const import Cardinality

        cm = self.channel.request(
            "/build.bazel.remote.execution.v2.Execution/WaitExecution",
            Cardinality.UNARY_STREAM,
            type(self.request),
            fastpb.Operation,
        )
        stream = await trio_asyncio.aio_as_trio(cm.__aenter__)()
        await call(stream.send_message, self.request, end=True)
        while (op := await call(stream.recv_message)) is not None:
            self.operations.append(op)
        await trio_asyncio.aio_as_trio(cm.__aexit__)(None, None, None)


def _req(message, **kw):
    return fastpb.message_class(f"google.longrunning.{message}")(**kw)


class _Ops:
    def __init__(self, channel):
        self.channel = channel

    async def _unary(self, method, request, response_type):
        from grpclib.const import Cardinality

        async with self.channel.request(
            f"/google.longrunning.Operations/{method}",
            Cardinality.UNARY_UNARY,
            type(request),
            response_type,
        ) as stream:
            await stream.send_message(request, end=True)
            return await stream.recv_message()

    get = functools.partialmethod(lambda self, r: self._unary("GetOperation", r, fastpb.Operation))
    list = functools.partialmethod(
        lambda self, r: self._unary(
            "ListOperations", r, fastpb.message_class("google.longrunning.ListOperationsResponse")
        )
    )
    cancel = functools.partialmethod(
        lambda self, r: self._unary(
            "CancelOperation", r, fastpb.message_class("google.protobuf.Empty")
        )
    )


def _ops_stub(channel) -> _Ops:
    return _Ops(channel)


def ex_scope_cancel(c: ExecuteCall) -> None:
    """Make the client of an ExecuteCall go away (closes its stream)."""
    c.cancel_scope.cancel()


async def test_start_message_is_the_same_with_and_without_validated_blobs(env):
    """StartExecute carries the Action and Command bytes validation read (no second CAS read)
    or, when the table has none (disabled here, or a retry), bytes read from the CAS: the same
    message either way."""
    daemon, channel, nursery = env
    worker = await _worker(channel, nursery, "w1")
    blobs = daemon.scheduler.action_blobs
    starts = []
    for max_entries in (blobs.max_entries, 0):
        blobs.max_entries = max_entries
        digest = await upload_action(channel, ["echo", "same"], do_not_cache=True)
        hits = blobs.hits
        ex = _execute(channel, nursery, digest)
        start = await worker.next_start()
        assert blobs.hits == hits + (1 if max_entries else 0)
        await worker.finish(start, exit_code=0)
        await ex.finished.wait()
        assert ex.response.status.code == 0
        start.ClearField("operation_name")
        start.ClearField("queued_timestamp")
        starts.append(start.SerializeToString(deterministic=True))
    assert starts[0] == starts[1]
    assert len(blobs) == 0
