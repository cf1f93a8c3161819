"""Schedulers sharing their state on Redis, as real `reexecd` processes (issue 11's acceptance).

    redis-server            the state of both schedulers (unix socket, the `redis_server` fixture)
    reexecd storage         CAS + action cache, shared by the schedulers and the worker
    reexecd scheduler A, B  [scheduler.state] type = "redis"; their CAS and action cache are
                            `grpc` stores on the storage node
    reexecd worker          scheduler = [A, B]

Clients are grpclib channels from the test (or Bazel 4.2.3 for the restart in a build).
Actions run unconfined and append a line to a file under the test's directory per run, so
"ran exactly once" is checked on the host, not inferred from logs. About two minutes in all;
the cache-check test alone waits out the scheduler's 30 s stuck-check sweep. Bugs these tests
found were fixed; the tests that showed them stay as regression tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.daemon.status_cli import request
from reexec.gen.build.bazel.remote.execution import v2 as re
from reexec.sched.state import Stage
from tests.conftest import call, open_channel
from tests.e2e.harness import (
    BazelWorkspace,
    ReexecdProcess,
    free_port,
    parse_process_summary,
    remote_exec_flags,
)
from tests.fake_worker import ExecuteCall, execute_request, sha, upload_action
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e

WaitExecutionRequest = fastpb.message_class("build.bazel.remote.execution.v2.WaitExecutionRequest")
GetOperationRequest = fastpb.message_class("google.longrunning.GetOperationRequest")


# -- processes --------------------------------------------------------------------------------


class Cluster:
    """The storage node, the schedulers and the worker of one test; stopped at teardown."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.tmp = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.procs: dict[str, ReexecdProcess] = {}
        self.storage = self._daemon("storage", "storage", "")
        # Where actions leave a trace (confinement is off): one line per run.
        self.traces = tmp_path / "traces"
        self.traces.mkdir()

    def _daemon(
        self, name: str, role: str, body: str, *, port: int | None = None
    ) -> ReexecdProcess:
        port = port or free_port()
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n' + body)
        data = self.tmp / name
        proc = ReexecdProcess(
            data,
            port=port,
            args=[role, "--config", str(cfg), "--data-dir", str(data)],
            log_dir=self.tmp / f"{name}-log",
        )
        self.procs[name] = proc
        proc.start()
        return proc

    def scheduler(
        self,
        name: str,
        *,
        port: int | None = None,
        extra: str = "",
        action_cache: str = "",
        lease_s: float = 15,
        worker_timeout_s: float = 5,
    ) -> ReexecdProcess:
        storage = self.storage.address
        action_cache = (
            action_cache or f'[action_cache]\ntype = "grpc"\nurl = "{storage}"\ntimeout_s = 20\n'
        )
        body = (
            f'[cas]\ntype = "grpc"\nurl = "{storage}"\ntimeout_s = 20\n'
            + action_cache
            + f"[scheduler]\nworker_timeout_s = {worker_timeout_s}\n"
            + extra
            + "[scheduler.state]\n"
            f'type = "redis"\nurl = "{self.redis_url}"\nkey_prefix = "ha:"\n'
            f"timeout_s = 2\nworker_lease_s = {lease_s}\n"
        )
        return self._daemon(name, "scheduler", body, port=port)

    def worker(
        self,
        schedulers: list[ReexecdProcess],
        *,
        slots: int = 2,
        cas_direct: bool = False,
        worker_id: str = "w1",
        extra: str = "",
    ) -> ReexecdProcess:
        """Without `cas_direct` the worker's CAS calls go to the scheduler it is connected to
        (the default); with it, straight to the storage node (`[worker.cas]`)."""
        urls = ", ".join(f'"{s.address}"' for s in schedulers)
        name = "w" if worker_id == "w1" else worker_id
        cfg = self.tmp / f"{name}.toml"
        cas = (
            f'[worker.cas]\ntype = "grpc"\nurl = "{self.storage.address}"\ntimeout_s = 20\n'
            if cas_direct
            else ""
        )
        cfg.write_text(
            f'[worker]\nscheduler = [{urls}]\nworker_id = "{worker_id}"\n'
            f"max_inflight_tasks = {slots}\n"
            "drain_timeout_s = 10\n" + extra + '[worker.sandbox]\nconfinement = "off"\n' + cas
        )
        data = self.tmp / name
        proc = ReexecdProcess(
            data,
            args=["worker", "--config", str(cfg), "--data-dir", str(data)],
            log_dir=self.tmp / f"{name}-log",
            wait_ready=False,
        )
        self.procs[name] = proc
        proc.start()
        return proc

    def restart(self, name: str, sig: int = signal.SIGKILL) -> ReexecdProcess:
        """Stop a daemon with `sig` and start it again: same config, port and data directory
        (the log of the first run is kept beside the new one)."""
        old = self.procs[name]
        old.stop(sig, timeout=15)
        assert old.log_path is not None
        old.log_path.rename(old.log_path.with_suffix(".first.log"))
        new = ReexecdProcess(
            old.data_dir, port=old.port, args=old.args, log_dir=old.log_path.parent
        )
        self.procs[name] = new
        new.start()
        return new

    def logs(self) -> str:
        out = []
        for name, proc in self.procs.items():
            out.append(f"--- {name} ---\n{proc.log_text()[-6000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc._proc is not None and proc.returncode is None:
                proc.stop(timeout=15)


@contextlib.contextmanager
def running_cluster(tmp_path: Path, redis_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, redis_url)
    try:
        yield c
    finally:
        c.stop()
        print(c.logs())  # pytest shows it for failing tests only


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[Cluster]:
    with running_cluster(tmp_path, redis_server.url) as c:
        yield c


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A redis-server that writes every change to its append-only file before answering
    (appendfsync always), so what it held survives a stop and start."""
    directory = Path(tempfile.mkdtemp(prefix="reexec-redis-"))
    server = RedisServer(directory, persistence=True)
    try:
        server.start()
        yield server
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


async def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "") -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def wait_for_async(
    read: Callable[[], Any], check: Callable[[Any], Any], timeout: float
) -> None:
    """Wait until `check(await read())` holds."""
    last = None
    with trio.move_on_after(timeout):
        while not check(last := await read()):
            await trio.sleep(0.2)
        return
    raise AssertionError(f"not within {timeout:g}s: {last}")


async def wait_log(proc: ReexecdProcess, text: str, timeout: float = 30, count: int = 1) -> None:
    try:
        await wait_for(lambda: proc.log_text().count(text) >= count, timeout)
    except trio.TooSlowError:
        raise AssertionError(f"{text!r} not in the log:\n{proc.log_text()[-4000:]}") from None


async def status_of(proc: ReexecdProcess) -> dict[str, Any]:
    """The daemon's /status document (JSON), from its status socket."""
    code, body = await trio.to_thread.run_sync(
        request, str(proc.data_dir / "reexecd.sock"), "GET", "/status?format=json"
    )
    assert code == 200, body
    return json.loads(body)


# -- clients ----------------------------------------------------------------------------------


class StreamCall(ExecuteCall):
    """ExecuteCall for any server-streaming method of the Execution service."""

    def __init__(self, channel: Channel, method: str, request_class: Any, request: Any) -> None:
        super().__init__(channel, request)
        self.method = method
        self.request_class = request_class

    async def _run(self) -> None:
        stream_cm = self.channel.request(
            f"/build.bazel.remote.execution.v2.Execution/{self.method}",
            Cardinality.UNARY_STREAM,
            self.request_class,
            fastpb.Operation,
        )
        try:
            stream: Stream = await trio_asyncio.aio_as_trio(stream_cm.__aenter__)()
            try:
                await call(stream.send_message, self.request, end=True)
                while (op := await call(stream.recv_message)) is not None:
                    self.operations.append(op)
                    self.first.set()
            finally:
                with trio.CancelScope(shield=True):
                    await trio_asyncio.aio_as_trio(stream_cm.__aexit__)(None, None, None)
        except Exception as e:
            self.error = e
        finally:
            self.first.set()
            self.finished.set()

    @property
    def completed(self) -> list[Any]:
        return [op for op in self.operations if op.done]


def wait_execution(channel: Channel, name: str) -> StreamCall:
    return StreamCall(
        channel, "WaitExecution", WaitExecutionRequest, WaitExecutionRequest(name=name)
    )


def execute(channel: Channel, digest: re.Digest, **kw: Any) -> StreamCall:
    return StreamCall(channel, "Execute", fastpb.ExecuteRequest, execute_request(digest, **kw))


async def get_operation(channel: Channel, name: str) -> Any:
    async def run() -> Any:
        async with channel.request(
            "/google.longrunning.Operations/GetOperation",
            Cardinality.UNARY_UNARY,
            GetOperationRequest,
            fastpb.Operation,
        ) as stream:
            await stream.send_message(GetOperationRequest(name=name), end=True)
            return await stream.recv_message()

    return await trio_asyncio.aio_as_trio(run)()


def response_of(op: Any) -> Any:
    assert op.done
    resp = fastpb.ExecuteResponse()
    op.response.Unpack(resp)
    return resp


async def read_blob(channel: Channel, digest: Any) -> bytes:
    cas = re.ContentAddressableStorageStub(channel)
    got = await call(
        cas.batch_read_blobs,
        re.BatchReadBlobsRequest(
            digests=[re.Digest(hash=digest.hash, size_bytes=digest.size_bytes)]
        ),
    )
    return got.responses[0].data


def stage_of(op: Any) -> int:
    meta = fastpb.ExecuteOperationMetadata()
    op.metadata.Unpack(meta)
    return meta.stage


# -- 1. Execute on A; WaitExecution, GetOperation, Execute and CancelOperation on B ------


async def test_two_schedulers_share_operations(aio_loop, cluster: Cluster, nursery) -> None:
    """Any scheduler serves any client request: an operation submitted on A is watched,
    read and cancelled on B; one submitted on B runs on the worker connected to A."""
    a = cluster.scheduler("a")
    b = cluster.scheduler("b")
    w = cluster.worker([a, b])
    await wait_log(w, f"connected to the scheduler {a.address}")
    on_a, on_b = await open_channel(a.port), await open_channel(b.port)
    try:
        digest = await upload_action(on_a, ["sh", "-c", "sleep 1; echo from-a"])
        first = execute(on_a, digest, skip_cache_lookup=True)
        nursery.start_soon(first.run)
        await wait_for(lambda: first.operations, 20)
        name = first.operations[0].name
        on_b_wait = wait_execution(on_b, name)
        nursery.start_soon(on_b_wait.run)
        await wait_for(lambda: on_b_wait.finished.is_set() and first.finished.is_set(), 30)
        assert on_b_wait.error is None, on_b_wait.error
        assert [op.name for op in on_b_wait.operations] == [name] * len(on_b_wait.operations)
        assert len(on_b_wait.completed) == 1
        resp = response_of(on_b_wait.completed[0])
        assert resp.status.code == 0 and resp.result.exit_code == 0
        assert await read_blob(on_b, resp.result.stdout_digest) == b"from-a\n"
        # B saw the operation's stages as they happened (it was running when B attached).
        assert Stage.EXECUTING in [stage_of(op) for op in on_b_wait.operations]
        got = await get_operation(on_b, name)
        assert got.done and got.name == name
        assert response_of(got).result.exit_code == 0
        assert response_of(first.completed[0]).result == resp.result
        # Only A dispatched and completed it; B only served its client.
        assert "operation completed" in a.log_text()
        assert "operation dispatched" not in b.log_text()
        # The other way round: Execute on B, which has no worker; A's worker runs it (B's
        # operation reaches A through the shared queue and a change message).
        digest = await upload_action(on_b, ["sh", "-c", "echo from-b"])
        second = execute(on_b, digest, skip_cache_lookup=True)
        with trio.fail_after(30):
            await second.run()
        assert second.error is None, second.error
        resp = response_of(second.completed[0])
        assert resp.result.exit_code == 0
        assert await read_blob(on_b, resp.result.stdout_digest) == b"from-b\n"
        assert a.log_text().count("operation dispatched") == 2
        # B's status shows the shared view: the worker, connected to A.
        a_id = (await status_of(a))["scheduler"]["state"]["scheduler_id"]
        await wait_for_async(
            lambda: status_of(b),
            lambda doc: (
                doc
                and {f["id"]: f["scheduler"] for f in doc["scheduler"]["state"]["fleet"]}
                == {"w1": a_id}
            ),
            10,
        )
        # A name neither scheduler knows is NOT_FOUND on B too.
        missing = wait_execution(on_b, "no-such-operation")
        with trio.fail_after(10):
            await missing.run()
        assert isinstance(missing.error, GRPCError) and missing.error.status is Status.NOT_FOUND
        # CancelOperation on B for an operation executing on A's worker: A learns it from
        # the change message and cancels the attempt on its worker; the client waiting on A
        # gets it completed as CANCELLED, and the action's process is gone.
        marker = cluster.traces / "started"
        digest = await upload_action(
            on_a, ["sh", "-c", f"echo $$ > {marker}; sleep 60; echo never"]
        )
        running = execute(on_a, digest, skip_cache_lookup=True)
        nursery.start_soon(running.run)
        await wait_for(lambda: marker.exists() and marker.read_text().strip(), 20)
        name = running.operations[0].name
        request = fastpb.message_class("google.longrunning.CancelOperationRequest")(name=name)

        async def cancel() -> None:
            async with on_b.request(
                "/google.longrunning.Operations/CancelOperation",
                Cardinality.UNARY_UNARY,
                type(request),
                fastpb.message_class("google.protobuf.Empty"),
            ) as stream:
                await stream.send_message(request, end=True)
                await stream.recv_message()

        await trio_asyncio.aio_as_trio(cancel)()
        await wait_for(lambda: running.finished.is_set(), 15)
        assert running.error is None, running.error
        resp = response_of(running.completed[0])
        assert resp.status.code == Status.CANCELLED.value, resp.status
        await wait_log(w, f"cancelling {name}", 10)
        pid = int(marker.read_text())
        await wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15)
    finally:
        on_a.close()
        on_b.close()


# -- 2. SIGKILL of A while its worker runs an action ------------------------------------------


async def test_sigkill_of_a_worker_moves_to_b_result_once_not_rerun(
    aio_loop, cluster: Cluster, nursery
) -> None:
    """The action leaves one line in a file per run (confinement is off, so it writes to the
    host): after A dies mid-action the worker registers with B naming the running attempt, B
    adopts it, and the action's single run completes the operation. Two clients wait on B
    (one attached before the kill, one that was A's Execute client and comes back by name, as
    Bazel does): each gets exactly one COMPLETED, with the right exit code and stdout."""
    a = cluster.scheduler("a")
    b = cluster.scheduler("b")
    w = cluster.worker([a, b])
    await wait_log(w, f"connected to the scheduler {a.address}")
    runs = cluster.traces / "runs"
    on_a, on_b = await open_channel(a.port), await open_channel(b.port)
    try:
        digest = await upload_action(
            on_a, ["sh", "-c", f"echo run >> {runs}; sleep 3; echo done; exit 3"]
        )
        on_a_exec = execute(on_a, digest, skip_cache_lookup=True)
        nursery.start_soon(on_a_exec.run)
        await wait_for(lambda: Stage.EXECUTING in on_a_exec.stages, 20)
        name = on_a_exec.operations[0].name
        early = wait_execution(on_b, name)
        nursery.start_soon(early.run)
        await wait_for(lambda: runs.exists(), 10)  # the action is running on the worker
        killed_at = time.monotonic()
        a.stop(signal.SIGKILL)
        await wait_for(lambda: on_a_exec.finished.is_set(), 10)
        assert on_a_exec.error is not None and not on_a_exec.completed  # A's stream broke
        # A's client comes back on B with the operation's name.
        late = wait_execution(on_b, name)
        nursery.start_soon(late.run)
        await wait_log(w, f"connected to the scheduler {b.address} as w1 (1 running", 15)
        await wait_for(lambda: early.finished.is_set() and late.finished.is_set(), 30)
        assert time.monotonic() - killed_at < 10  # no lease expiry, no re-run
        for client in (early, late):
            assert client.error is None, client.error
            assert len(client.completed) == 1, [stage_of(op) for op in client.operations]
            assert client.operations[-1].done  # nothing after the COMPLETED message
            resp = response_of(client.completed[0])
            assert resp.status.code == 0
            assert resp.result.exit_code == 3
            assert await read_blob(on_b, resp.result.stdout_digest) == b"done\n"
            assert resp.result.execution_metadata.worker == "w1"
        assert "worker brought its running attempt along" in b.log_text()
        await trio.sleep(1.0)  # a second run, if any, would have started by now
        assert runs.read_text() == "run\n"
        completed = [line for line in b.log_text().splitlines() if "operation completed" in line]
        assert len(completed) == 1 and "attempts=1" in completed[0], completed
        assert "operation dispatched" not in b.log_text()
        assert "requeued" not in b.log_text()
        got = await get_operation(on_b, name)
        assert got.done and response_of(got).result.exit_code == 3
    finally:
        on_a.close()
        on_b.close()


# -- 3. Redis stopped and started ------------------------------------------------------------


async def _execute_status(channel: Channel, digest: re.Digest) -> StreamCall:
    ex = execute(channel, digest, skip_cache_lookup=True)
    with trio.fail_after(30):
        await ex.run()
    return ex


async def test_redis_stopped_while_idle(
    aio_loop, cluster: Cluster, redis_server: RedisServer, nursery
) -> None:
    """Execute answers UNAVAILABLE naming the state store while Redis is down; the CAS and the
    action cache (on the storage node) keep answering; once Redis is back (empty: no
    persistence here) Execute works again without restarting anything."""
    a = cluster.scheduler("a")
    w = cluster.worker([a])
    await wait_log(w, f"connected to the scheduler {a.address}")
    channel = await open_channel(a.port)
    try:
        before = await upload_action(channel, ["sh", "-c", "echo before"])
        ex = await _execute_status(channel, before)
        assert ex.error is None and response_of(ex.completed[0]).result.exit_code == 0

        redis_server.stop()
        during = await upload_action(channel, ["sh", "-c", "echo during"])
        started = time.monotonic()
        refused = await _execute_status(channel, during)
        assert time.monotonic() - started < 8  # bounded by the store's timeout_s, not stuck
        assert isinstance(refused.error, GRPCError), (refused.error, refused.stages)
        assert refused.error.status is Status.UNAVAILABLE
        assert "state store" in (refused.error.message or ""), refused.error.message
        assert "redis" in (refused.error.message or "")
        waited = wait_execution(channel, "any-operation")
        with trio.fail_after(10):
            await waited.run()
        assert isinstance(waited.error, GRPCError)
        assert waited.error.status is Status.UNAVAILABLE, waited.error
        # Storage still answers through the scheduler: FindMissingBlobs and GetActionResult.
        cas = re.ContentAddressableStorageStub(channel)
        missing = await call(
            cas.find_missing_blobs,
            re.FindMissingBlobsRequest(blob_digests=[during, sha(b"not stored")]),
        )
        assert [d.hash for d in missing.missing_blob_digests] == [sha(b"not stored").hash]
        ac = re.ActionCacheStub(channel)
        hit = await call(ac.get_action_result, re.GetActionResultRequest(action_digest=before))
        assert hit.exit_code == 0
        # The scheduler's status says so (its monitor found the store unavailable).
        await wait_for_async(
            lambda: status_of(a), lambda doc: not doc["scheduler"]["state"]["available"], 10
        )
        # The worker stays connected (its keepalives need no Redis).
        await trio.sleep(1.0)
        assert w.log_text().count("connected to the scheduler") == 1, w.log_text()

        redis_server.start()
        ex = await _execute_status(channel, during)
        assert ex.error is None, (ex.error, a.log_text()[-3000:])
        resp = response_of(ex.completed[0])
        assert resp.result.exit_code == 0
        assert await read_blob(channel, resp.result.stdout_digest) == b"during\n"
        await wait_for_async(
            lambda: status_of(a), lambda doc: doc["scheduler"]["state"]["available"], 10
        )
        assert a.returncode is None and w.returncode is None
    finally:
        channel.close()


async def wait_until_done(channel: Channel, name: str, timeout: float = 60) -> list[Any]:
    """A retrying client, as Bazel is: WaitExecution by name until the operation completes,
    again after each UNAVAILABLE. Returns every COMPLETED message it received."""
    completed: list[Any] = []
    with trio.fail_after(timeout):
        while True:
            wait = wait_execution(channel, name)
            await wait.run()
            completed += wait.completed
            if wait.completed:
                assert wait.error is None, wait.error
                return completed
            assert isinstance(wait.error, GRPCError), wait.error
            assert wait.error.status is Status.UNAVAILABLE, wait.error
            await trio.sleep(0.3)


async def test_redis_stopped_while_actions_queue_then_restarted(
    aio_loop, tmp_path: Path, aof_redis: RedisServer, nursery
) -> None:
    """One worker slot busy with a 3 s action, two more actions queued behind it; Redis stops
    (SIGTERM) and starts again 4 s later. The records and queues are in Redis's append-only
    file, so the queued operations are still there when it returns (the fixture's default
    Redis keeps nothing on disk, and a restart would lose every operation: clients would see
    NOT_FOUND and submit again). Clients that retry WaitExecution on UNAVAILABLE get every
    result, each exactly once."""
    with running_cluster(tmp_path, aof_redis.url) as cluster:
        a = cluster.scheduler("a")
        w = cluster.worker([a], slots=1)
        await wait_log(w, f"connected to the scheduler {a.address}")
        channel = await open_channel(a.port)
        try:
            calls = []
            for i, sleep in enumerate((3, 0, 0)):
                digest = await upload_action(
                    channel,
                    ["sh", "-c", f"echo run >> {cluster.traces}/{i}; sleep {sleep}; echo out-{i}"],
                )
                ex = execute(channel, digest, skip_cache_lookup=True)
                nursery.start_soon(ex.run)
                calls.append(ex)
                await wait_for(lambda ex=ex: ex.operations, 10)
            await wait_for(lambda: (cluster.traces / "0").exists(), 10)
            expected = [Stage.EXECUTING, Stage.QUEUED, Stage.QUEUED]
            await wait_for(lambda: [c.stages[-1] for c in calls] == expected, 10)
            names = [c.operations[0].name for c in calls]

            aof_redis.stop()
            await trio.sleep(4.0)  # the running action ends while Redis is away
            aof_redis.start()
            results = []
            for i, name in enumerate(names):
                completed = [*calls[i].completed, *await wait_until_done(channel, name)]
                results.append(completed)
            for i, completed in enumerate(results):
                resp = response_of(completed[-1])
                assert resp.status.code == 0, resp.status
                assert resp.result.exit_code == 0
                assert await read_blob(channel, resp.result.stdout_digest) == f"out-{i}\n".encode()
            # The queued actions ran once each.
            assert (cluster.traces / "1").read_text() == "run\n"
            assert (cluster.traces / "2").read_text() == "run\n"
            # The one that finished during the outage ran once too: its result waited (in the
            # scheduler's receiver, or held by the worker) until Redis was back.
            assert (cluster.traces / "0").read_text() == "run\n"
            completed = [ln for ln in a.log_text().splitlines() if "operation completed" in ln]
            assert len(completed) == 3 and all("attempts=1" in ln for ln in completed), completed
            assert "internal error" not in a.log_text()
            assert a.returncode is None and w.returncode is None
        finally:
            channel.close()


# -- 4. Restart of the only scheduler in the middle of a Bazel build -------------------------

SLOW_ACTIONS = 8

HA_BUILD = (
    "".join(
        f'genrule(name = "s{i}", outs = ["s{i}.txt"], cmd = "sleep 2; echo slow-{i} > $@")\n'
        for i in range(SLOW_ACTIONS)
    )
    + 'genrule(name = "all", srcs = ['
    + ", ".join(f'":s{i}"' for i in range(SLOW_ACTIONS))
    + '], outs = ["all.txt"], cmd = "cat $(SRCS) > $@")\n'
)


def test_scheduler_restart_in_the_middle_of_a_bazel_build(
    bazel_workspace: BazelWorkspace, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Bazel 4.2.3 builds 8 two-second genrules and one that joins them, on one worker with two
    slots (so operations are queued and running in Redis at any moment); the only scheduler is
    SIGKILLed and started again (same port) in the middle. Bazel's Execute streams break; it
    retries (--remote_retries) with WaitExecution on the operation names, which the new
    scheduler process finds in Redis; the worker reconnects and brings its running actions
    along. The build succeeds with every action executed remotely."""
    (bazel_workspace.path / "ha").mkdir()
    (bazel_workspace.path / "ha" / "BUILD").write_text(HA_BUILD)
    with running_cluster(tmp_path / "cluster", redis_server.url) as cluster:
        a = cluster.scheduler("a", extra="")
        # Its CAS calls go to the storage node: with the default (through the scheduler) an
        # action that ends while the scheduler is down fails to upload its outputs and runs
        # again (a retryable UNAVAILABLE; the build still succeeds).
        w = cluster.worker([a], slots=2, cas_direct=True)
        deadline = time.monotonic() + 30
        while f"connected to the scheduler {a.address}" not in w.log_text():
            assert time.monotonic() < deadline, w.log_text()
            time.sleep(0.05)
        flags = [
            *remote_exec_flags(a.address),
            "--remote_retries=20",
            "--jobs=8",
            "--noremote_accept_cached",
        ]
        result: dict[str, Any] = {}

        def build() -> None:
            result["run"] = bazel_workspace.run("build", *flags, "//ha:all", check=False)

        builder = threading.Thread(target=build)
        builder.start()
        try:
            deadline = time.monotonic() + 90
            while a.log_text().count("operation dispatched") < 3:
                assert builder.is_alive(), result
                assert time.monotonic() < deadline, a.log_text()[-3000:]
                time.sleep(0.05)
            time.sleep(0.5)
            a = cluster.restart("a")
        finally:
            builder.join(180)
        run = result["run"]
        assert run.returncode == 0, run.stderr[-5000:]
        summary = parse_process_summary(run.stderr)
        assert summary.get("remote", 0) == SLOW_ACTIONS + 1, summary
        out = bazel_workspace.bin_dir() / "ha" / "all.txt"
        assert out.read_text() == "".join(f"slow-{i}\n" for i in range(SLOW_ACTIONS))
        # The actions running at the kill came back with the worker: still running (adopted),
        # or finished meanwhile (held results, sent after Register).
        assert (
            "worker brought its running attempt along" in a.log_text()
            or "sent the held result" in w.log_text()
        ), w.log_text()[-4000:]
        # Bazel came back with WaitExecution on the new process (the operations were in Redis).
        code, body = request(str(a.data_dir / "reexecd.sock"), "GET", "/metrics")
        assert code == 200
        waits = [
            ln
            for ln in body.decode().splitlines()
            if ln.startswith("reexec_rpc_duration_seconds_count")
            and "Execution/WaitExecution" in ln
            and 'code="OK"' in ln
        ]
        assert waits and float(waits[0].rsplit(" ", 1)[1]) >= 1, waits
        # Nothing ran twice: every operation completed at its first attempt.
        completed = [
            ln
            for name in ("reexecd", "reexecd.first")
            for ln in (tmp_path / "cluster" / "a-log" / f"{name}.log").read_text().splitlines()
            if "operation completed" in ln
        ]
        assert len(completed) == SLOW_ACTIONS + 1, completed
        assert all("attempts=1" in ln for ln in completed), completed


# -- 5. A scheduler dies during an operation's cache check ----------------------------------


# reexec.sched.scheduler.STUCK_CACHE_CHECK_S (30 s, not configurable) plus margin.
STUCK_WAIT_S = 45


async def test_scheduler_killed_during_the_cache_check(aio_loop, cluster: Cluster, nursery) -> None:
    """The schedulers' action cache is a Redis of its own, hung (SIGSTOP) so that A's cache
    check of a new operation waits; A is SIGKILLed then, with the record in CACHE_CHECK.
    The client comes back on B by name: B finds the record stuck in CACHE_CHECK (its
    monitor's sweep, after STUCK_CACHE_CHECK_S = 30 s, hence this test's length) and checks the
    cache again; the worker, now on B, runs it."""
    ac_dir = Path(tempfile.mkdtemp(prefix="reexec-redis-"))
    ac_redis = RedisServer(ac_dir)
    ac_redis.start()
    try:
        ac = (
            '[action_cache]\ntype = "redis"\n'
            f'url = "{ac_redis.url}"\nkey_prefix = "ac-ha:"\ntimeout_s = 2\n'
        )
        a = cluster.scheduler("a", action_cache=ac)
        b = cluster.scheduler("b", action_cache=ac)
        w = cluster.worker([a, b])
        await wait_log(w, f"connected to the scheduler {a.address}")
        on_a, on_b = await open_channel(a.port), await open_channel(b.port)
        try:
            digest = await upload_action(on_a, ["sh", "-c", "echo checked"])
            ac_redis.pause()
            first = execute(on_a, digest)  # the cache is looked up
            nursery.start_soon(first.run)
            await wait_for(lambda: first.operations, 10)
            assert first.stages == [Stage.CACHE_CHECK]
            name = first.operations[0].name
            a.stop(signal.SIGKILL)
            ac_redis.resume()
            await wait_log(w, f"connected to the scheduler {b.address}", 15)
            back = wait_execution(on_b, name)
            nursery.start_soon(back.run)
            with trio.move_on_after(STUCK_WAIT_S):
                await back.finished.wait()
            back.cancel_scope.cancel()
            assert back.completed, f"stages seen on B: {back.stages} (1 = CACHE_CHECK)"
            assert back.error is None, back.error
            resp = response_of(back.completed[0])
            assert resp.result.exit_code == 0
            assert await read_blob(on_b, resp.result.stdout_digest) == b"checked\n"
        finally:
            on_a.close()
            on_b.close()
    finally:
        ac_redis.close()
        shutil.rmtree(ac_dir, ignore_errors=True)


# -- 6. A scheduler and its worker lost together: the lease expires -------------------------


async def test_scheduler_and_worker_lost_lease_expires_attempt_requeued(
    aio_loop, cluster: Cluster, nursery
) -> None:
    """A and its only worker die together (SIGKILL both: a host lost). The operation stays
    EXECUTING on the dead worker until its lease (3 s here) expires; then B requeues it and
    B's own worker runs it; the client, back on B by name, gets the result of the second
    attempt."""
    a = cluster.scheduler("a", lease_s=3)
    b = cluster.scheduler("b", lease_s=3)
    w1 = cluster.worker([a], worker_id="w1")
    await wait_log(w1, f"connected to the scheduler {a.address}")
    runs = cluster.traces / "runs"
    on_a, on_b = await open_channel(a.port), await open_channel(b.port)
    try:
        digest = await upload_action(on_a, ["sh", "-c", f"echo run >> {runs}; sleep 2; echo ok"])
        first = execute(on_a, digest, skip_cache_lookup=True)
        nursery.start_soon(first.run)
        await wait_for(lambda: runs.exists(), 20)
        name = first.operations[0].name
        w1.stop(signal.SIGKILL)
        a.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        w2 = cluster.worker([b], worker_id="w2")
        await wait_log(w2, f"connected to the scheduler {b.address}")
        completed = await wait_until_done(on_b, name, 30)
        assert len(completed) == 1
        resp = response_of(completed[0])
        assert resp.status.code == 0 and resp.result.exit_code == 0
        assert resp.result.execution_metadata.worker == "w2"
        assert await read_blob(on_b, resp.result.stdout_digest) == b"ok\n"
        assert runs.read_text() == "run\nrun\n"
        assert time.monotonic() - killed_at >= 2.5  # not before the lease ran out
        log = b.log_text()
        assert "lease expired" in log, log[-3000:]
        completed_lines = [ln for ln in log.splitlines() if "operation completed" in ln]
        assert len(completed_lines) == 1 and "attempts=2" in completed_lines[0], completed_lines
    finally:
        on_a.close()
        on_b.close()


# -- 7. A scheduler stalls (SIGSTOP): its worker moves on, the stalled one comes back ---------


async def test_stalled_scheduler_resumes_without_requeueing_what_moved(
    aio_loop, cluster: Cluster, nursery
) -> None:
    """A is SIGSTOPped while its worker runs an action; the worker's PINGs go unanswered, so
    it moves to B with the running attempt (adopted there). A runs again after longer than its
    worker timeout: finding the worker silent, it must not take back the attempt B now owns.
    The action runs once and the client, on B, gets its result."""
    a = cluster.scheduler("a", worker_timeout_s=2)
    b = cluster.scheduler("b", worker_timeout_s=2)
    w = cluster.worker([a, b], extra="scheduler_keepalive_s = 0.5\n")
    await wait_log(w, f"connected to the scheduler {a.address}")
    runs = cluster.traces / "runs"
    on_a, on_b = await open_channel(a.port), await open_channel(b.port)
    try:
        digest = await upload_action(on_a, ["sh", "-c", f"echo run >> {runs}; sleep 6; echo ok"])
        first = execute(on_a, digest, skip_cache_lookup=True)
        nursery.start_soon(first.run)
        await wait_for(lambda: runs.exists(), 20)
        name = first.operations[0].name
        os.kill(a.pid, signal.SIGSTOP)
        try:
            await wait_log(w, f"connected to the scheduler {b.address} as w1 (1 running", 10)
            await wait_log(b, "worker brought its running attempt along", 5)
            await trio.sleep(2.5)  # A stopped for longer than its worker_timeout_s
        finally:
            os.kill(a.pid, signal.SIGCONT)
        first.cancel_scope.cancel()
        completed = await wait_until_done(on_b, name, 20)
        resp = response_of(completed[-1])
        assert resp.status.code == 0 and resp.result.exit_code == 0, resp.status
        await trio.sleep(0.5)
        assert runs.read_text() == "run\n", (a.log_text()[-3000:], b.log_text()[-3000:])
    finally:
        on_a.close()
        on_b.close()


# -- 8. Two schedulers, a worker each, one burst of actions ---------------------------------


async def test_burst_over_two_schedulers_each_action_runs_once(
    aio_loop, cluster: Cluster, nursery
) -> None:
    """24 actions submitted alternately to A and B, one worker on each: both schedulers claim
    from the shared queue (a compare-and-set), every action runs exactly once, both workers
    take part, and every client gets its own result."""
    a = cluster.scheduler("a")
    b = cluster.scheduler("b")
    w1 = cluster.worker([a, b], worker_id="w1")
    w2 = cluster.worker([b, a], worker_id="w2")
    await wait_log(w1, f"connected to the scheduler {a.address}")
    await wait_log(w2, f"connected to the scheduler {b.address}")
    runs = cluster.traces / "runs"
    on_a, on_b = await open_channel(a.port), await open_channel(b.port)
    try:
        calls = []
        for i in range(24):
            channel = on_a if i % 2 == 0 else on_b
            digest = await upload_action(
                channel, ["sh", "-c", f"echo {i} >> {runs}; sleep 0.2; echo out-{i}"]
            )
            ex = execute(channel, digest, skip_cache_lookup=True)
            nursery.start_soon(ex.run)
            calls.append(ex)
        await wait_for(lambda: all(c.finished.is_set() for c in calls), 60)
        workers = set()
        for i, c in enumerate(calls):
            assert c.error is None, (i, c.error)
            assert len(c.completed) == 1
            resp = response_of(c.completed[0])
            assert resp.result.exit_code == 0
            channel = on_a if i % 2 == 0 else on_b
            assert await read_blob(channel, resp.result.stdout_digest) == f"out-{i}\n".encode()
            workers.add(resp.result.execution_metadata.worker)
        assert sorted(int(x) for x in runs.read_text().split()) == list(range(24))
        assert workers == {"w1", "w2"}
    finally:
        on_a.close()
        on_b.close()
