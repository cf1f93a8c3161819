"""A worker given several schedulers: it moves to the next when its scheduler goes away, and the
results it could not send are held and sent right after the next Register.

The schedulers here are small fakes that implement WorkerApi.Connect and record every message
(so the tests see exactly what reaches a scheduler's receiver); the executor is a fake whose
actions end when the test says. The process test at the end uses real `reexecd` processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from grpclib.const import Cardinality, Handler
from grpclib.server import Server

from reexec.daemon.channels import scheduler_endpoints
from reexec.daemon.config import Config, ConfigError, load_config
from reexec.daemon.status_cli import render, request
from reexec.grpc_client import aio
from reexec.rpc import StatusDetailsCodec
from reexec.sandbox.agent import AgentSettings, SchedulerEndpoint, WorkerAgent
from reexec.sandbox.config import WorkerConfig
from reexec.sched.state import Stage
from reexec.worker_protocol import CONNECT, SchedulerMessage, WorkerMessage
from tests.conftest import open_channel
from tests.e2e.harness import ReexecdProcess, free_port
from tests.fake_worker import ExecuteCall, execute_request, upload_action

# -- a fake scheduler ---------------------------------------------------------------------------


class FakeScheduler:
    """Accepts worker streams on 127.0.0.1:`port`; records Register and every later message."""

    def __init__(self, port: int | None = None, *, keepalive_s: float = 0.2) -> None:
        self.port = port or free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.keepalive_s = keepalive_s
        self.registers: list[Any] = []
        self.received: list[tuple[str, Any]] = []  # (kind, message) after Register
        self.registered = trio.Event()
        self._outbox: trio.MemorySendChannel[Any] | None = None
        self._server: Server | None = None
        self._transports: list[Any] = []
        # Sent right after Registered on the next connection (before the worker says more).
        self.on_register: list[Any] = []

    @property
    def finished(self) -> list[tuple[str, int]]:
        return [(m.operation_name, m.attempt) for k, m in self.received if k == "finished"]

    def __mapping__(self) -> dict[str, Handler]:
        handler = trio_asyncio.trio_as_aio(self._connect)
        return {
            CONNECT: Handler(handler, Cardinality.STREAM_STREAM, WorkerMessage, SchedulerMessage)
        }

    async def start(self) -> None:
        async def serve() -> Server:
            server = Server([self], codec=None, status_details_codec=StatusDetailsCodec())
            await server.start("127.0.0.1", self.port)
            return server

        self.registered = trio.Event()
        self._server = await trio_asyncio.aio_as_trio(serve)()

    async def stop(self) -> None:
        """Gone at once, as a killed process: the listener closed, the streams reset."""
        server, self._server = self._server, None
        if server is not None:
            server.close()  # stops listening, cancels the handlers, keeps the connections
            for transport in self._transports:
                transport.abort()
            self._transports = []
            await trio_asyncio.aio_as_trio(server.wait_closed)()
        self._outbox = None

    async def _connect(self, stream: Any) -> None:
        self._transports.append(stream._stream._transport)  # grpclib's, to kill the connection
        first = await aio(stream.recv_message)
        assert first is not None and first.WhichOneof("kind") == "register"
        self.registers.append(first.register)
        hello = SchedulerMessage()
        hello.registered.keepalive_interval.FromNanoseconds(int(self.keepalive_s * 1e9))
        await aio(stream.send_message, hello)
        send, receive = trio.open_memory_channel[Any](math.inf)
        for msg in self.on_register:
            send.send_nowait(msg)
        self.on_register = []
        self._outbox = send
        self.registered.set()

        async def sender() -> None:
            async for msg in receive:
                await aio(stream.send_message, msg)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while (msg := await aio(stream.recv_message)) is not None:
                kind = msg.WhichOneof("kind")
                self.received.append((kind, getattr(msg, kind)))
            nursery.cancel_scope.cancel()

    def start_execute(self, name: str, attempt: int = 1) -> None:
        assert self._outbox is not None, "no worker connected"
        self._outbox.send_nowait(start_message(name, attempt))


def start_message(name: str, attempt: int = 1) -> Any:
    msg = SchedulerMessage()
    msg.start_execute.operation_name = name
    msg.start_execute.attempt = attempt
    return msg


# -- a fake executor ----------------------------------------------------------------------------


class FakeExecutor:
    """Each action runs until `finish(name)`; its Finished carries `size` bytes of stdout."""

    def __init__(self) -> None:
        self.gates: dict[str, trio.Event] = {}
        self.started: list[str] = []
        self.pending_at_start: dict[str, list[tuple[str, int]]] = {}
        self.agent: WorkerAgent | None = None
        self.size = 0

    async def start(self) -> None:
        pass

    async def execute(self, start: Any, progress: Any) -> Any:
        name = start.operation_name
        self.started.append(name)
        assert self.agent is not None
        self.pending_at_start[name] = self.agent.pending.keys()
        await self.gates.setdefault(name, trio.Event()).wait()
        msg = WorkerMessage()
        f = msg.finished
        f.operation_name, f.attempt = name, start.attempt
        f.result.exit_code = 0
        f.result.stdout_raw = b"x" * self.size
        return msg

    def finish(self, name: str) -> None:
        self.gates.setdefault(name, trio.Event()).set()


async def wait_for(predicate: Any, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def make_agent(
    urls: list[str], executor: FakeExecutor, *, slots: int = 4, **settings: Any
) -> WorkerAgent:
    config = Config()
    config.worker.scheduler = urls if len(urls) > 1 else urls[0]
    agent = WorkerAgent(
        AgentSettings(worker_id="w1", max_inflight=slots, reconnect_max_s=0.5, **settings),
        executor,  # type: ignore[arg-type]
        scheduler_endpoints(config),
    )
    executor.agent = agent
    return agent


async def start_agent(nursery: trio.Nursery, agent: WorkerAgent) -> None:
    nursery.start_soon(agent.run)


# -- moving between schedulers ------------------------------------------------------------------


async def test_first_scheduler_down_the_worker_connects_to_the_next(aio_loop, nursery):
    down = f"grpc://127.0.0.1:{free_port()}"
    b = FakeScheduler()
    await b.start()
    executor = FakeExecutor()
    agent = make_agent([down, b.url], executor)
    await start_agent(nursery, agent)
    with trio.fail_after(10):
        await b.registered.wait()
    await wait_for(lambda: agent.scheduler_url == b.url)
    assert agent.schedulers[0].url == down
    b.start_execute("op1")
    await wait_for(lambda: executor.started == ["op1"])
    executor.finish("op1")
    await wait_for(lambda: b.finished == [("op1", 1)])
    assert agent.results_held == 0
    await b.stop()


async def test_killed_scheduler_the_worker_moves_on_and_runs_new_work_there(aio_loop, nursery):
    a, b = FakeScheduler(), FakeScheduler()
    await a.start()
    await b.start()
    executor = FakeExecutor()
    agent = make_agent([a.url, b.url], executor)
    await start_agent(nursery, agent)
    with trio.fail_after(10):
        await a.registered.wait()
    await wait_for(lambda: agent.scheduler_url == a.url)
    a.start_execute("op1", attempt=3)
    await wait_for(lambda: executor.started == ["op1"])
    await a.stop()
    with trio.fail_after(10):
        await b.registered.wait()
    await wait_for(lambda: agent.scheduler_url == b.url)
    # Register tells B exactly what still runs: it can adopt the attempt instead of requeueing.
    reg = b.registers[-1]
    assert [(r.operation_name, r.attempt) for r in reg.running] == [("op1", 3)]
    assert list(reg.running_operations) == ["op1"]
    assert list(reg.pending_results) == []
    # The adopted attempt reports to B; new work runs there.
    executor.finish("op1")
    b.start_execute("op2")
    await wait_for(lambda: "op2" in executor.started)
    executor.finish("op2")
    await wait_for(lambda: sorted(b.finished) == [("op1", 3), ("op2", 1)])
    assert a.finished == []
    assert agent.results_held == 0
    await b.stop()


async def test_worker_comes_back_to_the_first_scheduler_when_the_second_goes(aio_loop, nursery):
    a, b = FakeScheduler(), FakeScheduler()
    await a.start()
    await b.start()
    agent = make_agent([a.url, b.url], FakeExecutor())
    await start_agent(nursery, agent)
    with trio.fail_after(10):
        await a.registered.wait()
    await a.stop()
    with trio.fail_after(10):
        await b.registered.wait()
    await a.start()
    await b.stop()
    with trio.fail_after(10):
        await a.registered.wait()
    await wait_for(lambda: agent.scheduler_url == a.url)
    assert agent.sessions == 3
    await a.stop()


# -- held results -------------------------------------------------------------------------------


async def test_result_finished_while_disconnected_is_sent_after_register(aio_loop, nursery):
    """A killed; the action ends while no scheduler is up; B comes up later and receives the
    held result before the worker takes new work (B offers a start at once)."""
    a, b = FakeScheduler(), FakeScheduler()
    await a.start()
    executor = FakeExecutor()
    agent = make_agent([a.url, b.url], executor)
    await start_agent(nursery, agent)
    with trio.fail_after(10):
        await a.registered.wait()
    a.start_execute("op1")
    await wait_for(lambda: executor.started == ["op1"])
    await a.stop()
    await wait_for(lambda: agent.scheduler_url is None)
    executor.finish("op1")
    await wait_for(lambda: not agent.running)
    # Held, and the slot is free: the action has ended.
    assert agent.pending.keys() == [("op1", 1)]
    assert agent.results_held == 1
    await trio.sleep(0.5)  # a few rounds of connection attempts fail meanwhile
    b.on_register = [start_message("op2")]
    await b.start()
    with trio.fail_after(10):
        await b.registered.wait()
    reg = b.registers[-1]
    assert [(r.operation_name, r.attempt) for r in reg.pending_results] == [("op1", 1)]
    assert list(reg.running) == []
    await wait_for(lambda: b.finished == [("op1", 1)])
    await wait_for(lambda: "op2" in executor.started)
    # The new start was read only once the held result had been sent.
    assert executor.pending_at_start["op2"] == []
    assert agent.pending.keys() == []
    assert agent.results_sent_late == 1
    executor.finish("op2")
    await wait_for(lambda: b.finished == [("op1", 1), ("op2", 1)])
    await b.stop()


async def test_a_result_whose_send_fails_is_held_and_sent_again(aio_loop, nursery, monkeypatch):
    b = FakeScheduler()
    await b.start()
    executor = FakeExecutor()
    agent = make_agent([b.url], executor)
    await start_agent(nursery, agent)
    await wait_for(lambda: agent.scheduler_url == b.url)
    send = agent._send
    failures = []

    async def flaky_send(msg: Any) -> None:
        if msg.WhichOneof("kind") == "finished" and not failures:
            failures.append(msg)
            raise ConnectionError("a send that failed")
        await send(msg)

    monkeypatch.setattr(agent, "_send", flaky_send)
    b.start_execute("op1")
    await wait_for(lambda: executor.started == ["op1"])
    executor.finish("op1")
    await wait_for(lambda: b.finished == [("op1", 1)])
    assert len(failures) == 1
    assert agent.results_held == 1 and agent.results_sent_late == 1
    assert agent.sessions == 1  # sent again on the same stream
    await b.stop()


async def test_held_results_are_bounded_oldest_dropped(aio_loop, nursery, caplog):
    a, b = FakeScheduler(), FakeScheduler()
    await a.start()
    executor = FakeExecutor()
    executor.size = 1000
    agent = make_agent([a.url, b.url], executor, max_pending_results=2)
    await start_agent(nursery, agent)
    with trio.fail_after(10):
        await a.registered.wait()
    for name in ("op1", "op2", "op3"):
        a.start_execute(name)
    await wait_for(lambda: len(executor.started) == 3)
    await a.stop()
    await wait_for(lambda: agent.scheduler_url is None)
    with caplog.at_level(logging.WARNING, logger="reexec.sandbox.agent"):
        for name in ("op1", "op2", "op3"):
            executor.finish(name)
            await wait_for(lambda n=name: n in [k[0] for k in agent.pending.keys()])
    assert agent.pending.keys() == [("op2", 1), ("op3", 1)]
    assert agent.pending.dropped == 1
    assert "result of op1 attempt 1 dropped" in caplog.text
    await b.start()
    await wait_for(lambda: b.finished == [("op2", 1), ("op3", 1)])
    await b.stop()


async def test_held_results_bounded_by_bytes(aio_loop, nursery):
    a, b = FakeScheduler(), FakeScheduler()
    await a.start()
    executor = FakeExecutor()
    executor.size = 3000
    agent = make_agent([a.url, b.url], executor, max_pending_bytes=7000)
    await start_agent(nursery, agent)
    with trio.fail_after(10):
        await a.registered.wait()
    for name in ("op1", "op2", "op3"):
        a.start_execute(name)
    await wait_for(lambda: len(executor.started) == 3)
    await a.stop()
    await wait_for(lambda: agent.scheduler_url is None)
    for name in ("op1", "op2", "op3"):
        executor.finish(name)
        await wait_for(lambda n=name: (n, 1) not in agent.running)
    assert agent.pending.keys() == [("op2", 1), ("op3", 1)]
    assert 6000 < agent.pending.bytes <= 7000
    await b.start()
    await wait_for(lambda: b.finished == [("op2", 1), ("op3", 1)])
    await b.stop()


async def test_drain_waits_for_held_results_to_be_sent(aio_loop, nursery):
    a, b = FakeScheduler(), FakeScheduler()
    await a.start()
    executor = FakeExecutor()
    agent = make_agent([a.url, b.url], executor, drain_timeout_s=5)
    await start_agent(nursery, agent)
    with trio.fail_after(10):
        await a.registered.wait()
    a.start_execute("op1")
    await wait_for(lambda: executor.started == ["op1"])
    await a.stop()
    executor.finish("op1")
    await wait_for(lambda: agent.pending.keys() == [("op1", 1)])

    async def bring_up_b() -> None:
        await trio.sleep(0.5)
        await b.start()

    nursery.start_soon(bring_up_b)
    with trio.fail_after(20):
        await agent.drain()
    assert b.finished == [("op1", 1)]
    assert [k for k, _ in b.received][-1] == "going_away"
    with trio.fail_after(10):
        await agent.stopped.wait()
    await b.stop()


# -- configuration ------------------------------------------------------------------------------


def _load(tmp_path: Path, worker: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text("[worker]\n" + worker + "\n")
    return load_config(path)


def test_config_one_scheduler_as_a_string(tmp_path):
    config = _load(tmp_path, 'scheduler = "grpc://a.example:8980"')
    assert config.worker.scheduler == "grpc://a.example:8980"
    assert [e.url for e in scheduler_endpoints(config)] == ["grpc://a.example:8980"]


def test_config_a_list_of_schedulers(tmp_path):
    config = _load(tmp_path, 'scheduler = ["grpc://a.example:8980", "grpcs://b.example:443"]')
    assert [e.url for e in scheduler_endpoints(config)] == [
        "grpc://a.example:8980",
        "grpcs://b.example:443",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "worker.scheduler: the list is empty"),
        ('["grpc://a:1", "http://b:2"]', "worker.scheduler[1]: 'http://b:2' is not grpc://"),
        ('["grpc://a:1", "grpc://a:1"]', "worker.scheduler[1]: 'grpc://a:1' is listed twice"),
        ('["grpc://a"]', "worker.scheduler[0]: 'grpc://a' is not grpc://HOST:PORT"),
        ('"unix:/run/s.sock"', "worker.scheduler: 'unix:/run/s.sock' is not grpc://"),
        ("5", "worker.scheduler: Expected `str | array`, got `int`"),
    ],
)
def test_config_bad_scheduler_lists_are_refused(tmp_path, value, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"scheduler = {value}")
    assert message in str(e.value)


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_config_bad_scheduler_keepalive_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match=r"worker\.scheduler_keepalive_s: must be 0 \(off\)"):
        _load(tmp_path, f"scheduler_keepalive_s = {value}")


def test_scheduler_channels_ping_unless_keepalive_is_off():
    from reexec.daemon.channels import _keepalive

    assert _keepalive(0) is None
    config = _keepalive(2.5)
    assert config is not None
    assert config._keepalive_time == 2.5 and config._keepalive_timeout == 2.5


def test_worker_role_needs_a_scheduler():
    with pytest.raises(ConfigError, match=r"worker\.scheduler: required"):
        scheduler_endpoints(Config())


def test_unset_scheduler_is_the_empty_string():
    assert WorkerConfig().scheduler == ""


def test_agent_needs_a_scheduler():
    with pytest.raises(ValueError):
        WorkerAgent(AgentSettings(worker_id="w"), FakeExecutor(), [])  # type: ignore[arg-type]


def test_a_bare_channel_factory_is_the_local_scheduler():
    async def factory() -> Any:
        raise AssertionError

    agent = WorkerAgent(AgentSettings(worker_id="w"), FakeExecutor(), factory)  # type: ignore[arg-type]
    assert [e.url for e in agent.schedulers] == ["local"]
    assert isinstance(agent.schedulers[0], SchedulerEndpoint)


# -- real processes -----------------------------------------------------------------------------


def _scheduler(tmp_path: Path, name: str) -> ReexecdProcess:
    port = free_port()
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[scheduler]\nworker_timeout_s = 5\n')
    return ReexecdProcess(
        tmp_path / name,
        port=port,
        args=["scheduler", "--config", str(cfg), "--data-dir", str(tmp_path / name)],
        log_dir=tmp_path / f"{name}-log",
    )


async def test_worker_process_moves_to_the_second_scheduler_when_the_first_is_killed(
    aio_loop, tmp_path, nursery
):
    """Two `reexecd scheduler`s (each its own state and CAS), one `reexecd worker` given both.
    SIGKILL of the first while the worker runs one of its actions: the worker registers with
    the second, naming the running attempt, and runs its actions, reading and writing that
    scheduler's CAS. (The second scheduler does not share the first's state: it cancels the
    stale attempt.)"""
    a = _scheduler(tmp_path, "a")
    b = _scheduler(tmp_path, "b")
    cfg = tmp_path / "w.toml"
    cfg.write_text(
        f'[worker]\nscheduler = ["grpc://127.0.0.1:{a.port}", "grpc://127.0.0.1:{b.port}"]\n'
        'worker_id = "w1"\nmax_inflight_tasks = 2\ndrain_timeout_s = 10\n'
    )
    w = ReexecdProcess(
        tmp_path / "w",
        args=["worker", "--config", str(cfg), "--data-dir", str(tmp_path / "w")],
        log_dir=tmp_path / "w-log",
        wait_ready=False,
    )
    with a, b:
        w.start()
        try:
            a_url = f"grpc://127.0.0.1:{a.port}"
            await wait_for(lambda: f"connected to the scheduler {a_url}" in w.log_text(), 30)
            assert "worker connected" in a.log_text(), a.log_text()
            assert "worker connected" not in b.log_text(), w.log_text()
            on_a = await open_channel(a.port)
            try:
                slow = await upload_action(on_a, ["sh", "-c", "sleep 60"])
                running = ExecuteCall(on_a, execute_request(slow, skip_cache_lookup=True))
                nursery.start_soon(running.run)
                await wait_for(lambda: Stage.EXECUTING in running.stages, 30)
                await trio.sleep(1.0)  # the worker has it (sleep 60 runs, as a rule)
                a.stop(signal.SIGKILL)
                await wait_for(lambda: running.finished.is_set(), 30)
            finally:
                on_a.close()
            b_url = f"grpc://127.0.0.1:{b.port}"
            await wait_for(lambda: f"connected to the scheduler {b_url}" in w.log_text(), 30)
            log = w.log_text()
            assert f"lost the scheduler {a_url}" in log, log
            # The attempt moves with the worker: still running (the rule), or, if it failed
            # in the moment A died (its inputs came from A's CAS), as a held result.
            assert (
                f"connected to the scheduler {b_url} as w1 (1 running, 0 result(s)" in log
                or f"connected to the scheduler {b_url} as w1 (0 running, 1 result(s)" in log
            ), log
            assert "worker connected" in b.log_text()
            channel = await open_channel(b.port)
            try:
                digest = await upload_action(channel, ["sh", "-c", "echo on-b"])
                call = ExecuteCall(channel, execute_request(digest, skip_cache_lookup=True))
                with trio.fail_after(30):
                    await call.run()
                r = call.response
                assert r is not None and r.status.code == 0, (r, w.log_text())
                assert r.result.exit_code == 0
                assert r.result.execution_metadata.worker == "w1"
            finally:
                channel.close()
            # The worker's status and metrics name the scheduler it is connected to.
            sock = str(tmp_path / "w" / "reexecd.sock")
            code, body = await trio.to_thread.run_sync(request, sock, "GET", "/status")
            assert code == 200
            worker = json.loads(body)["worker"]
            assert worker["scheduler"] == f"grpc://127.0.0.1:{b.port}"
            assert worker["schedulers"] == [
                f"grpc://127.0.0.1:{a.port}",
                f"grpc://127.0.0.1:{b.port}",
            ]
            assert worker["held_results"] == []
            code, body = await trio.to_thread.run_sync(request, sock, "GET", "/metrics")
            metrics = body.decode()
            assert f'reexec_worker_connected{{scheduler="grpc://127.0.0.1:{b.port}"}} 1' in metrics
            assert f'reexec_worker_connected{{scheduler="grpc://127.0.0.1:{a.port}"}} 0' in metrics
        finally:
            if w.returncode is None:
                assert w.stop() == 0


def test_status_render_names_the_scheduler_of_a_worker_with_several():
    worker = {
        "id": "w1",
        "slots": 2,
        "running": [],
        "draining": False,
        "completed": 3,
        "cache": {"files": 0, "bytes": 0},
        "scheduler": None,
        "schedulers": ["grpc://a:1", "grpc://b:1"],
        "held_results": [{"operation": "op1", "attempt": 1}],
    }
    text = render({"role": "worker", "version": "x", "pid": 1, "uptime_s": 1, "worker": worker})
    assert "Scheduler: none (reconnecting) (of 2); 1 result(s) held" in text
    worker["scheduler"], worker["held_results"] = "grpc://b:1", []
    text = render({"role": "worker", "version": "x", "pid": 1, "uptime_s": 1, "worker": worker})
    assert "Scheduler: grpc://b:1 (of 2); 0 result(s) held" in text


async def test_worker_process_leaves_a_stopped_scheduler(aio_loop, tmp_path):
    """SIGSTOP of the first scheduler: its kernel still holds the connection, but nothing
    answers the worker's HTTP/2 PINGs; the worker moves to the second within a few keepalive
    intervals (not after TCP's minutes). The schedulers come from the command line."""
    a = _scheduler(tmp_path, "a")
    b = _scheduler(tmp_path, "b")
    a_url, b_url = f"grpc://127.0.0.1:{a.port}", f"grpc://127.0.0.1:{b.port}"
    cfg = tmp_path / "w.toml"
    cfg.write_text(
        "[worker]\nscheduler_keepalive_s = 0.5\n"
        'worker_id = "w1"\nmax_inflight_tasks = 1\ndrain_timeout_s = 10\n'
    )
    w = ReexecdProcess(
        tmp_path / "w",
        args=[
            *("worker", "--config", str(cfg), "--data-dir", str(tmp_path / "w")),
            *("--scheduler", a_url, "--scheduler", b_url),
        ],
        log_dir=tmp_path / "w-log",
        wait_ready=False,
    )
    with a, b:
        w.start()
        try:
            await wait_for(lambda: f"connected to the scheduler {a_url}" in w.log_text(), 30)
            os.kill(a.pid, signal.SIGSTOP)
            try:
                with trio.fail_after(10):
                    while f"connected to the scheduler {b_url}" not in w.log_text():
                        await trio.sleep(0.05)
            finally:
                os.kill(a.pid, signal.SIGCONT)
            assert f"lost the scheduler {a_url}" in w.log_text()
            channel = await open_channel(b.port)
            try:
                digest = await upload_action(channel, ["sh", "-c", "echo after-stop"])
                call = ExecuteCall(channel, execute_request(digest, skip_cache_lookup=True))
                with trio.fail_after(30):
                    await call.run()
                assert call.response.result.execution_metadata.worker == "w1"
            finally:
                channel.close()
        finally:
            if w.returncode is None:
                assert w.stop() == 0


# -- phase reports ------------------------------------------------------------------------------


class PhasedExecutor(FakeExecutor):
    """Reports a phase at once, another after `pause` seconds, then finishes."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    async def execute(self, start: Any, progress: Any) -> Any:
        await progress(1)
        await trio.sleep(self.pause)
        await progress(2)
        self.finish(start.operation_name)
        return await super().execute(start, progress)


async def test_phase_reports_only_once_the_last_report_is_old(aio_loop, nursery):
    """A phase change a moment after the dispatch (or the last report) is not sent: the
    scheduler keeps only the time of the last report, and the keepalive reports anyway."""
    from reexec.sandbox.agent import PHASE_REPORT_MIN_INTERVAL_S

    b = FakeScheduler(keepalive_s=60)  # no keepalive reports during the test
    await b.start()
    executor = PhasedExecutor(pause=PHASE_REPORT_MIN_INTERVAL_S + 0.1)
    agent = make_agent([b.url], executor)
    await start_agent(nursery, agent)
    with trio.fail_after(10):
        await b.registered.wait()
    b.start_execute("op1")
    await wait_for(lambda: b.finished == [("op1", 1)])
    phases = [m.phase for kind, m in b.received if kind == "progress"]
    assert phases == [2]
    await b.stop()
