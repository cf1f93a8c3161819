"""`reexecd scheduler` with `[server] processes = 2` and its state on Redis.

Two scheduler processes share one port, one filesystem CAS, a Redis action cache and the Redis
scheduler state. The worker is connected to one of them; clients' connections land on both.
Every Execute completes, whichever process received it: the process without the worker queues
the operation in the shared queue, the other is woken by the change message and dispatches it.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from reexec.daemon.status_cli import StatusError, request
from tests.conftest import open_channel
from tests.e2e.harness import ReexecdProcess, free_port
from tests.fake_worker import ExecuteCall, execute_request, upload_action


def _status(sock: Path) -> dict | None:
    try:
        code, body = request(str(sock), "GET", "/status?format=json")
    except (StatusError, OSError):
        return None
    return json.loads(body) if code == 200 else None


async def _wait_for(predicate, timeout: float = 30):  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not (value := await trio.to_thread.run_sync(predicate)):
            await trio.sleep(0.1)
    return value


async def test_two_scheduler_processes_share_one_state(aio_loop, tmp_path, redis_url, nursery):
    port = free_port()
    data = tmp_path / "sched"
    cfg = tmp_path / "scheduler.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nprocesses = 2\ngrace_period_s = 5\n'
        f'[action_cache]\ntype = "redis"\nurl = "{redis_url}"\nkey_prefix = "ac:"\n'
        "[scheduler]\nworker_timeout_s = 5\n"
        f'[scheduler.state]\ntype = "redis"\nurl = "{redis_url}"\n'
    )
    socks = [data / "reexecd.sock", data / "reexecd.sock.1"]
    worker_cfg = tmp_path / "worker.toml"
    worker_cfg.write_text(
        f'[worker]\nscheduler = "grpc://127.0.0.1:{port}"\nworker_id = "w1"\n'
        "max_inflight_tasks = 2\n"
    )
    sched = ReexecdProcess(
        data,
        port=port,
        args=["scheduler", "--config", str(cfg), "--data-dir", str(data)],
        log_dir=tmp_path / "sched-log",
    )
    worker = ReexecdProcess(
        tmp_path / "w1",
        args=["worker", "--config", str(worker_cfg), "--data-dir", str(tmp_path / "w1")],
        log_dir=tmp_path / "w1-log",
        wait_ready=False,
    )
    with sched:
        docs = await _wait_for(
            lambda: all(_status(s) for s in socks) and [_status(s) for s in socks]
        )
        ids = {doc["scheduler"]["state"]["scheduler_id"] for doc in docs}
        assert len(ids) == 2 and all(d["scheduler"]["state"]["type"] == "redis" for d in docs)
        with worker:
            # Both processes see the one worker in the shared fleet, held by one of them.
            fleets = await _wait_for(
                lambda: (
                    [
                        f
                        for s in socks
                        if (d := _status(s)) and (f := d["scheduler"]["state"].get("fleet"))
                    ]
                    if all(
                        (d := _status(s)) and d["scheduler"]["state"].get("fleet") for s in socks
                    )
                    else None
                )
            )
            assert all([f["id"] for f in fleet] == ["w1"] for fleet in fleets)
            holder = fleets[0][0]["scheduler"]
            assert holder in ids

            # Executes on many connections (the kernel spreads them over both processes).
            calls = []
            channels = []
            for i in range(16):
                channel = await open_channel(port)
                channels.append(channel)
                digest = await upload_action(channel, ["sh", "-c", f"echo job-{i}"])
                c = ExecuteCall(channel, execute_request(digest, skip_cache_lookup=True))
                calls.append(c)
                nursery.start_soon(c.run)
            try:
                with trio.fail_after(60):
                    for c in calls:
                        await c.finished.wait()
                for i, c in enumerate(calls):
                    assert c.error is None, c.error
                    resp = c.response
                    assert resp.status.code == 0, resp.status.message
                    assert resp.result.exit_code == 0
                    assert resp.result.stdout_digest.size_bytes == len(f"job-{i}\n")
                executes = [
                    (await trio.to_thread.run_sync(_status, s))["scheduler"]["totals"]["executes"]
                    for s in socks
                ]
                # Both processes took Executes; only the worker's scheduler dispatched them.
                assert sum(executes) == 16 and min(executes) > 0, executes
                dispatched = {
                    d["scheduler"]["state"]["scheduler_id"]: d["scheduler"]["totals"]["dispatched"]
                    for s in socks
                    if (d := await trio.to_thread.run_sync(_status, s))
                }
                assert dispatched[holder] == 16 and sum(dispatched.values()) == 16
            finally:
                for channel in channels:
                    channel.close()
        assert sched.stop() == 0, sched.log_text()[-3000:]
