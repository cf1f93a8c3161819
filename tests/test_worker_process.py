"""`reexecd scheduler` + `reexecd worker` subprocesses: real actions, graceful worker drain."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import trio

from reexec.sched.state import Stage
from tests.conftest import open_channel
from tests.e2e.harness import ReexecdProcess, free_port
from tests.fake_worker import ExecuteCall, execute_request, upload_action


def _scheduler(tmp_path: Path) -> ReexecdProcess:
    port = free_port()
    cfg = tmp_path / "scheduler.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[scheduler]\nworker_timeout_s = 5\n')
    return ReexecdProcess(
        tmp_path / "sched",
        port=port,
        args=["scheduler", "--config", str(cfg), "--data-dir", str(tmp_path / "sched")],
        log_dir=tmp_path / "sched-log",
    )


def _worker(tmp_path: Path, port: int, name: str, extra: str = "") -> ReexecdProcess:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(
        f'[worker]\nscheduler = "grpc://127.0.0.1:{port}"\nworker_id = "{name}"\n'
        "max_inflight_tasks = 2\ndrain_timeout_s = 30\n" + extra
    )
    w = ReexecdProcess(
        tmp_path / name,
        args=["worker", "--config", str(cfg), "--data-dir", str(tmp_path / name)],
        log_dir=tmp_path / f"{name}-log",
        wait_ready=False,
    )
    w.start()
    return w


async def _wait_for(predicate, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def test_worker_runs_real_actions_and_drains_on_sigterm(aio_loop, tmp_path, nursery):
    with _scheduler(tmp_path) as sched:
        w1 = _worker(tmp_path, sched.port, "w1")
        try:
            await _wait_for(lambda: "worker connected" in sched.log_text())
            channel = await open_channel(sched.port)
            try:
                slow = await upload_action(channel, ["sh", "-c", "sleep 1.5; echo slow-done"])
                running = ExecuteCall(channel, execute_request(slow, skip_cache_lookup=True))
                nursery.start_soon(running.run)
                await _wait_for(lambda: Stage.EXECUTING in running.stages)

                os.kill(w1.pid, signal.SIGTERM)
                await _wait_for(lambda: "worker going away" in sched.log_text())
                # New work is not given to a draining worker: it stays queued.
                later = await upload_action(channel, ["sh", "-c", "echo later"])
                queued = ExecuteCall(channel, execute_request(later))
                nursery.start_soon(queued.run)
                await _wait_for(lambda: Stage.QUEUED in queued.stages)

                # The running action still finishes and its result reaches the client.
                await _wait_for(lambda: running.finished.is_set())
                resp = running.response
                assert resp.status.code == 0 and resp.result.exit_code == 0
                assert resp.result.execution_metadata.worker == "w1"
                assert w1.wait(20) == 0, w1.log_text()
                assert "draining" in w1.log_text()
                assert not queued.finished.is_set()

                # A new worker picks up the queued action.
                w2 = _worker(tmp_path, sched.port, "w2")
                try:
                    await _wait_for(lambda: queued.finished.is_set())
                    assert queued.response.result.exit_code == 0
                    assert queued.response.result.execution_metadata.worker == "w2"
                    stdout = queued.response.result.stdout_digest
                    assert stdout.size_bytes == len(b"later\n")
                finally:
                    assert w2.stop() == 0, w2.log_text()
            finally:
                channel.close()
        finally:
            if w1.returncode is None:
                w1.stop()


async def test_killed_worker_action_is_retried_elsewhere(aio_loop, tmp_path, nursery):
    with _scheduler(tmp_path) as sched:
        w1 = _worker(tmp_path, sched.port, "w1")
        await _wait_for(lambda: "worker connected" in sched.log_text())
        channel = await open_channel(sched.port)
        try:
            digest = await upload_action(channel, ["sh", "-c", "sleep 1; echo ok"])
            call = ExecuteCall(channel, execute_request(digest))
            nursery.start_soon(call.run)
            await _wait_for(lambda: Stage.EXECUTING in call.stages)
            os.kill(w1.pid, signal.SIGKILL)
            w1.wait(10)
            started = time.monotonic()
            w2 = _worker(tmp_path, sched.port, "w2")
            try:
                await _wait_for(lambda: call.finished.is_set(), timeout=30)
                resp = call.response
                assert resp.status.code == 0, resp.status.message
                assert resp.result.execution_metadata.worker == "w2"
                assert time.monotonic() - started < 25
            finally:
                assert w2.stop() == 0
        finally:
            channel.close()


async def test_scheduler_sigterm_finishes_running_actions_and_refuses_new(
    aio_loop, tmp_path, nursery
):
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    with _scheduler(tmp_path) as sched:
        w1 = _worker(tmp_path, sched.port, "w1")
        try:
            await _wait_for(lambda: "worker connected" in sched.log_text())
            channel = await open_channel(sched.port)
            try:
                slow = await upload_action(channel, ["sh", "-c", "sleep 1.5; echo finished"])
                other = await upload_action(channel, ["true"])
                running = ExecuteCall(channel, execute_request(slow))
                nursery.start_soon(running.run)
                await _wait_for(lambda: Stage.EXECUTING in running.stages)
                os.kill(sched.pid, signal.SIGTERM)
                await _wait_for(lambda: "draining" in sched.log_text())
                refused = ExecuteCall(channel, execute_request(other))
                await refused.run()
                assert isinstance(refused.error, GRPCError)
                assert refused.error.status is Status.UNAVAILABLE
                await _wait_for(lambda: running.finished.is_set())
                assert running.operations and running.operations[-1].done, (
                    running.stages,
                    repr(running.error),
                )
                assert running.response.status.code == 0
                assert running.response.result.exit_code == 0
                assert sched.wait(30) == 0, sched.log_text()
            finally:
                channel.close()
        finally:
            w1.stop()


async def test_precondition_script_declines_and_the_action_runs_elsewhere(
    aio_loop, tmp_path, nursery
):
    with _scheduler(tmp_path) as sched:
        refusing = _worker(
            tmp_path,
            sched.port,
            "refusing",
            "precondition_script = \"sh -c 'echo disk full >&2; exit 1'\"\n",
        )
        ok = None
        try:
            await _wait_for(lambda: "worker connected" in sched.log_text())
            channel = await open_channel(sched.port)
            try:
                digest = await upload_action(channel, ["sh", "-c", "echo ran"])
                call = ExecuteCall(channel, execute_request(digest))
                nursery.start_soon(call.run)
                # Only the refusing worker is connected: it declines, the action stays queued.
                await _wait_for(
                    lambda: "declined: precondition script exited 1" in sched.log_text()
                )
                assert not call.finished.is_set()
                ok = _worker(tmp_path, sched.port, "ok")
                await _wait_for(lambda: call.finished.is_set(), timeout=30)
                assert call.response.status.code == 0
                assert call.response.result.execution_metadata.worker == "ok"
            finally:
                channel.close()
        finally:
            for w in (refusing, ok):
                if w is not None and w.returncode is None:
                    w.stop()


async def test_worker_reconnects_when_the_scheduler_comes_up_later(aio_loop, tmp_path, nursery):
    sched = _scheduler(tmp_path)
    w = _worker(tmp_path, sched.port, "early")
    try:
        await trio.sleep(1.0)  # the worker is retrying with backoff meanwhile
        assert w.returncode is None, w.log_text()
        with sched:
            await _wait_for(lambda: "worker connected" in sched.log_text(), timeout=40)
            channel = await open_channel(sched.port)
            try:
                digest = await upload_action(channel, ["sh", "-c", "echo late"])
                call = ExecuteCall(channel, execute_request(digest))
                await call.run()
                assert call.response.result.execution_metadata.worker == "early"
            finally:
                channel.close()
        assert "retrying" in w.log_text()
    finally:
        if w.returncode is None:
            assert w.stop() == 0
