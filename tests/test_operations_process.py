"""Operations end to end: a scheduler and two workers as subprocesses, a burst of actions,
`reexecd status` (text and --json), /metrics, and draining one worker mid-burst."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import trio

from reexec.daemon.status_cli import request
from reexec.sched.state import Stage
from tests.conftest import open_channel
from tests.fake_worker import ExecuteCall, execute_request, upload_action
from tests.test_worker_process import _scheduler, _wait_for, _worker


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reexec.daemon", *args], capture_output=True, text=True, timeout=60
    )


async def test_burst_status_metrics_and_drain(aio_loop, tmp_path: Path, nursery) -> None:
    with _scheduler(tmp_path) as sched:
        sock = str(tmp_path / "sched" / "reexecd.sock")
        w1 = _worker(tmp_path, sched.port, "w1")
        w2 = _worker(tmp_path, sched.port, "w2")
        try:
            await _wait_for(lambda: sched.log_text().count("worker connected") == 2)
            channel = await open_channel(sched.port)
            try:
                calls = []
                for i in range(24):
                    digest = await upload_action(
                        channel, ["sh", "-c", f"sleep 0.{i % 4 + 2}; echo result-{i}"], salt=str(i)
                    )
                    call = ExecuteCall(channel, execute_request(digest))
                    nursery.start_soon(call.run)
                    calls.append(call)
                await _wait_for(lambda: sum(Stage.EXECUTING in c.stages for c in calls) >= 4)

                text = await trio.to_thread.run_sync(_cli, "status", "--socket", sock)
                assert text.returncode == 0, text.stderr
                assert "Workers (2):" in text.stdout and "w1" in text.stdout and "w2" in text.stdout
                assert "Running actions (" in text.stdout
                raw = await trio.to_thread.run_sync(_cli, "status", "--socket", sock, "--json")
                doc = json.loads(raw.stdout)
                assert doc["role"] == "scheduler"
                assert {w["id"] for w in doc["scheduler"]["workers"]} == {"w1", "w2"}
                busy = sum(w["in_use"] for w in doc["scheduler"]["workers"])
                assert 1 <= busy <= 4

                drained = await trio.to_thread.run_sync(_cli, "drain", "w1", "--socket", sock)
                assert drained.returncode == 0, drained.stdout + drained.stderr
                missing = await trio.to_thread.run_sync(_cli, "drain", "nobody", "--socket", sock)
                assert missing.returncode == 1 and "no connected worker" in missing.stdout

                await _wait_for(lambda: all(c.finished.is_set() for c in calls), timeout=60)
                assert w1.wait(30) == 0, w1.log_text()  # w1 finished its actions and exited
                for i, c in enumerate(calls):
                    assert c.error is None, c.error
                    resp = c.response
                    assert resp.status.code == 0 and resp.result.exit_code == 0
                    out = f"result-{i}\n".encode()
                    assert resp.result.stdout_digest.hash == hashlib.sha256(out).hexdigest()
                ran = [c.response.result.execution_metadata.worker for c in calls]
                assert set(ran) <= {"w1", "w2"} and "w2" in ran

                code, raw_metrics = await trio.to_thread.run_sync(request, sock, "GET", "/metrics")
                assert code == 200
                body = raw_metrics.decode()
                assert 'reexec_actions_completed_total{outcome="ok"} 24' in body
                assert "reexec_action_queue_wait_seconds_count 24" in body
                assert "reexec_workers_connected 1" in body
                assert (
                    'reexec_rpc_duration_seconds_count{method="/build.bazel.remote.execution.v2.Execution/Execute",code="OK"} 24'
                    in body
                )
                # One log line per lifecycle event, with operation, action, worker and durations.
                log = sched.log_text()
                assert log.count("operation queued") == 24
                assert log.count("operation dispatched") == 24
                completed = [line for line in log.splitlines() if "operation completed" in line]
                assert len(completed) == 24
                assert all("worker=w" in line and "executing_s=" in line for line in completed)
                # Exactly once: 24 dispatches, no retries.
                assert "reexec_actions_dispatched_total 24" in body
                assert "reexec_action_retries_total 0" in body
            finally:
                channel.close()
            assert w2.stop() == 0
        finally:
            for w in (w1, w2):
                if w.returncode is None:
                    w.stop()
        assert sched.stop() == 0
