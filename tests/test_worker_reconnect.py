"""A worker the scheduler drops (keepalive timeout) has its stream closed and comes back.

Before: a stall longer than `worker_timeout_s` (SIGSTOP, a blocked event loop) dropped the local
worker of `reexecd serve` for good, while its stream stayed open; every later Execute hung.
"""

from __future__ import annotations

import functools
import os
import signal
import time

import trio

from reexec.daemon.app import run_daemon
from reexec.daemon.config import Config, SchedulerConfig, ServerConfig, StatusConfig
from tests.conftest import make_config, open_channel, start_daemon
from tests.e2e.harness import ReexecdProcess, free_port
from tests.fake_worker import ExecuteCall, FakeWorker, execute_request, upload_action


async def _run_action(channel, salt: str, timeout: float = 20) -> ExecuteCall:  # type: ignore[no-untyped-def]
    digest = await upload_action(channel, ["sh", "-c", f"echo {salt}"], salt=salt)
    call = ExecuteCall(channel, execute_request(digest, skip_cache_lookup=True))
    with trio.fail_after(timeout):
        await call.run()
    return call


def _succeeded(call: ExecuteCall) -> bool:
    r = call.response
    return r is not None and r.status.code == 0 and r.result.exit_code == 0


async def test_silent_worker_is_dropped_and_its_stream_closed(aio_loop, tmp_path, nursery):
    sched = SchedulerConfig(worker_timeout_s=0.5)
    daemon = await start_daemon(nursery, make_config(tmp_path / "data", scheduler=sched))
    channel = await open_channel(daemon.port)
    try:
        silent = FakeWorker(channel, "silent")  # registers, then never sends a keepalive
        await nursery.start(silent.run)
        assert daemon.scheduler is not None and "silent" in daemon.scheduler.workers
        with trio.fail_after(5):
            await silent.closed.wait()
        assert "silent" not in daemon.scheduler.workers
        # The scheduler ended the stream with a status, not by leaving it open.
        assert silent.ended_with is not None
        assert "UNAVAILABLE" in repr(silent.ended_with) or "reset" in str(silent.ended_with)
        # The same id registers again at once.
        again = FakeWorker(channel, "silent")
        await nursery.start(again.run)
        assert "silent" in daemon.scheduler.workers
    finally:
        channel.close()


async def test_local_worker_comes_back_after_the_event_loop_stalls(aio_loop, tmp_path, nursery):
    config = Config(
        data_dir=str(tmp_path / "data"),
        server=ServerConfig(listen=["127.0.0.1:0"]),
        scheduler=SchedulerConfig(worker_timeout_s=0.5),
        status=StatusConfig(socket=""),
    )
    config.worker.max_inflight_tasks = 1
    daemon = await nursery.start(
        functools.partial(run_daemon, config, handle_signals=False, local_worker=True)
    )
    channel = await open_channel(daemon.port)
    try:
        agent = daemon.agent
        with trio.fail_after(10):
            await agent.connected.wait()
        assert _succeeded(await _run_action(channel, "before"))
        sessions = agent.sessions
        # Block the whole event loop for four keepalive timeouts, as a stalled process would.
        time.sleep(2.0)  # noqa: ASYNC251 - the point is to block the loop
        with trio.fail_after(10):
            while agent.sessions == sessions:
                await trio.sleep(0.05)
        assert daemon.scheduler.stats.workers_lost >= 1
        assert _succeeded(await _run_action(channel, "after"))
    finally:
        channel.close()


async def test_serve_recovers_from_sigstop(aio_loop, tmp_path):
    """The reproduction from the issue: SIGSTOP `reexecd serve` past the worker timeout."""
    port = free_port()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n[scheduler]\nworker_timeout_s = 1\n'
        "[worker]\nmax_inflight_tasks = 1\n"
    )
    data = tmp_path / "data"
    with ReexecdProcess(
        data,
        port=port,
        args=["serve", "--config", str(cfg), "--data-dir", str(data)],
        log_dir=tmp_path / "log",
    ) as serve:
        channel = await open_channel(port)
        try:
            assert _succeeded(await _run_action(channel, "before"))
            os.kill(serve.pid, signal.SIGSTOP)
            await trio.sleep(3)
            os.kill(serve.pid, signal.SIGCONT)
            # The scheduler's monitor and the worker's keepalive wake together; the monitor
            # usually wins (the worker is dropped and must come back), and the action below
            # must complete either way.
            with trio.fail_after(15):
                while "worker lost" in (log := serve.log_text()) and (
                    "connected to the scheduler" not in log.split("worker lost")[-1]
                ):
                    await trio.sleep(0.1)
            call = await _run_action(channel, "after")
            assert _succeeded(call), call.response
            assert call.operations[-1].done
            lost_and_back = "worker lost" in serve.log_text()
        finally:
            channel.close()
    print("worker dropped and reconnected:", lost_and_back)
