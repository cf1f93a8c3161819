"""`[server] processes = N`: a supervisor and N serving processes on one port and one store.

The process test runs `reexecd storage` with processes = 2 as an operator would, finds each
child through its own status socket, shows both serve connections on the one port, kills a
child and watches the supervisor restart it while the port keeps serving, then drains all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from reexec.cas.digest import digest_of
from reexec.cas.grpc_store import GrpcStore, channel_factory
from reexec.daemon.cli import main
from reexec.daemon.config import ConfigError, check_processes_role, load_config
from reexec.daemon.status_cli import StatusError, request
from reexec.gen.build.bazel.remote.execution import v2 as re_v2
from tests.conftest import call, open_channel
from tests.e2e.harness import ReexecdProcess, free_port


def _status(sock: Path) -> dict | None:
    try:
        code, body = request(str(sock), "GET", "/status?format=json")
    except (StatusError, OSError):
        return None
    return json.loads(body) if code == 200 else None


def _find_missing_count(sock: Path) -> int:
    code, body = request(str(sock), "GET", "/metrics")
    assert code == 200
    total = 0
    for line in body.decode().splitlines():
        if line.startswith("reexec_rpc_duration_seconds_count") and "FindMissingBlobs" in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await trio.to_thread.run_sync(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await trio.sleep(0.1)


async def _find_missing_on_new_connections(port: int, n: int, digest) -> None:
    """`n` FindMissingBlobs calls, each on a connection of its own (the kernel picks a
    process per connection); every one must say `digest` is present."""
    for _ in range(n):
        channel = await open_channel(port)
        try:
            resp = await call(
                re_v2.ContentAddressableStorageStub(channel).find_missing_blobs,
                re_v2.FindMissingBlobsRequest(
                    blob_digests=[re_v2.Digest(hash=digest.hash, size_bytes=digest.size)]
                ),
            )
            assert list(resp.missing_blob_digests) == []
        finally:
            channel.close()


async def test_storage_with_two_processes(aio_loop, tmp_path, redis_url):
    port = free_port()
    cfg = tmp_path / "storage.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nprocesses = 2\ngrace_period_s = 5\n'
        f'[action_cache]\ntype = "redis"\nurl = "{redis_url}"\n'
    )
    data = tmp_path / "data"
    socks = [data / "reexecd.sock", data / "reexecd.sock.1"]
    daemon = ReexecdProcess(
        data,
        port=port,
        args=["storage", "--config", str(cfg), "--data-dir", str(data)],
        log_dir=tmp_path / "log",
    )
    with daemon:
        started = time.monotonic()
        docs = await _wait_for(
            lambda: all(_status(s) for s in socks) and [_status(s) for s in socks],
            30,
            "both processes' status sockets",
        )
        pids = [doc["pid"] for doc in docs]
        assert len(set(pids)) == 2 and daemon.pid not in pids
        assert [_parent_of(p) for p in pids] == [daemon.pid, daemon.pid]
        assert all(doc["role"] == "storage" for doc in docs)

        # A blob stored through one connection is found on every connection, whichever
        # process the kernel gives it to; both processes answer some of them.
        store = GrpcStore(channel_factory(f"grpc://127.0.0.1:{port}"), timeout_s=10)
        blob = b"shared by both processes" * 10_000
        d = digest_of(blob)
        await store.put_bytes(d, blob)
        await store.aclose()
        await _find_missing_on_new_connections(port, 24, d)
        counts = [await trio.to_thread.run_sync(_find_missing_count, s) for s in socks]
        assert sum(counts) == 24 and min(counts) > 0, counts

        # A child dies: the port keeps serving, and the supervisor starts a new one.
        killed = pids[1]
        daemon_log_before = daemon.log_text()
        assert "exited unexpectedly" not in daemon_log_before
        os.kill(killed, signal.SIGKILL)
        await _wait_for(
            lambda: f"(pid {killed}) exited unexpectedly" in daemon.log_text(),
            10,
            "the supervisor to see the process die",
        )
        # A connection the kernel hands to a listener in the instant its process dies is reset
        # (the client retries; net.ipv4.tcp_migrate_req = 1 moves such connections to another
        # listener): the port keeps serving once the dead one has left the group.
        await trio.sleep(0.2)
        await _find_missing_on_new_connections(port, 10, d)
        doc = await _wait_for(
            lambda: (s := _status(socks[1])) and s["pid"] != killed and s,
            30,
            "the restarted process's status socket",
        )
        new_pid = doc["pid"]
        assert _parent_of(new_pid) == daemon.pid
        log = daemon.log_text()
        assert re.search(
            rf"process 1 \(pid {killed}\) exited unexpectedly with signal SIGKILL", log
        )
        assert "restarting it in" in log
        await _find_missing_on_new_connections(port, 10, d)
        # Children outlive the supervisor's threads: their parent-death signal is tied to the
        # thread that forked them, which must not be a Trio worker thread (gone after 10 s idle).
        await trio.sleep(max(0.0, 11.5 - (time.monotonic() - started)))
        assert _alive(pids[0]) and _alive(new_pid)
        assert daemon.log_text().count("exited unexpectedly") == 1

        # SIGTERM: every process drains and exits, then the supervisor, with 0.
        code = await trio.to_thread.run_sync(daemon.stop)
        assert code == 0, daemon.log_text()[-3000:]
        assert not _alive(pids[0]) and not _alive(new_pid)
        assert "received SIGTERM: draining" in daemon.log_text()


def test_a_child_that_cannot_start_fails_the_supervisor(tmp_path):
    port = free_port()
    # A plain listener (no SO_REUSEPORT) on the port: the children cannot bind it.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    cfg = tmp_path / "storage.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nprocesses = 2\n'
        '[action_cache]\ntype = "grpc"\nurl = "grpc://127.0.0.1:1"\n'
    )
    data = tmp_path / "data"
    daemon = ReexecdProcess(
        data,
        port=port,
        args=["storage", "--config", str(cfg), "--data-dir", str(data)],
        log_dir=tmp_path / "log",
        wait_ready=False,
    )
    try:
        daemon.start()
        code = daemon.wait(timeout=60)
    finally:
        blocker.close()
        daemon.stop(timeout=10)
    assert code == 1, daemon.log_text()[-3000:]
    assert re.search(
        r"process \d \(pid \d+\) exited with code 1 before it was ready", daemon.log_text()
    )


# -- configuration ----------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


SHARED_AC = '[action_cache]\ntype = "redis"\nurl = "redis://127.0.0.1:6379/0"\n'


@pytest.mark.parametrize("role", ["serve", "scheduler"])
def test_roles_with_a_scheduler_refuse_processes(tmp_path, capsys, role):
    path = _write(tmp_path, f"[server]\nprocesses = 2\n{SHARED_AC}")
    config = load_config(path)
    with pytest.raises(ConfigError, match=r"server\.processes = 2"):
        check_processes_role(config, role)
    check_processes_role(config, "storage")
    assert main([role, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "server.processes = 2" in err
    assert ("type = 'redis'" in err) if role == "scheduler" else ("local worker" in err)


def test_a_scheduler_on_redis_state_may_run_several_processes(tmp_path):
    path = _write(
        tmp_path,
        f"[server]\nprocesses = 2\n{SHARED_AC}"
        '[scheduler.state]\ntype = "redis"\nurl = "redis://127.0.0.1:1/0"\n',
    )
    config = load_config(path)
    check_processes_role(config, "scheduler")
    with pytest.raises(ConfigError, match="local worker"):
        check_processes_role(config, "serve")


def test_processes_default_and_storage_config(tmp_path):
    assert load_config(_write(tmp_path, "")).server.processes == 1
    config = load_config(_write(tmp_path, f"[server]\nprocesses = 4\n{SHARED_AC}"))
    assert config.server.processes == 4
    # A memory store as the per-process fast cache of a shared filesystem store is fine.
    load_config(
        _write(
            tmp_path,
            f'[server]\nprocesses = 2\n{SHARED_AC}[cas]\ntype = "fast_slow"\n'
            '[cas.fast]\ntype = "memory"\n[cas.slow]\ntype = "filesystem"\n',
        )
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[server]\nprocesses = 0\n", "server.processes: must be between 1 and 64"),
        ("[server]\nprocesses = 65\n", "server.processes: must be between 1 and 64"),
        (
            f'[server]\nprocesses = 2\nlisten = ["127.0.0.1:0"]\n{SHARED_AC}',
            "server.listen[0]: port 0 would give each of the 2 processes its own port",
        ),
        (
            f'[server]\nprocesses = 2\n{SHARED_AC}[cas]\ntype = "memory"\n',
            "cas: type = 'memory' is not shared between processes (server.processes = 2)",
        ),
        (
            f'[server]\nprocesses = 2\n{SHARED_AC}[cas]\ntype = "size_partitioning"\n'
            '[cas.small]\ntype = "memory"\n[cas.large]\ntype = "filesystem"\n',
            "cas.small: type = 'memory' is not shared",
        ),
        (
            "[server]\nprocesses = 2\n",  # the default action cache is on the filesystem
            "action_cache: type = 'filesystem' is not shared between processes",
        ),
        (
            '[server]\nprocesses = 3\n[action_cache]\ntype = "memory"\n',
            "action_cache: type = 'memory' is not shared between processes (server.processes = 3)",
        ),
    ],
)
def test_what_several_processes_cannot_share_is_refused(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert fragment in str(e.value)


# -- under systemd ----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def _start_as_systemd_does(argv: list[str], env: dict[str, str], log_path: Path):
    """WATCHDOG_PID is the main pid: a shell sets it, then execs the daemon, keeping its pid."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            ["sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh", *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


async def test_supervisor_speaks_for_its_processes_to_systemd(aio_loop, tmp_path, redis_url):
    """NotifyAccess=main: only the supervisor notifies. READY once both processes serve,
    watchdog pings, SIGHUP reloads every process, SIGTERM: STOPPING and exit 0."""
    from tests.daemon.test_systemd import Receiver, pumping

    port = free_port()
    cfg = tmp_path / "storage.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nprocesses = 2\ngrace_period_s = 5\n'
        f'[action_cache]\ntype = "redis"\nurl = "{redis_url}"\n'
    )
    data = tmp_path / "data"
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as sock_dir:
        receiver = Receiver(f"{sock_dir}/notify")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env |= {"NOTIFY_SOCKET": f"{sock_dir}/notify", "WATCHDOG_USEC": "400000"}
        env["PYTHONPATH"] = str(REPO)
        argv = [sys.executable, "-m", "reexec.daemon", "storage", "--config", str(cfg)]
        argv += ["--data-dir", str(data)]
        log_path = tmp_path / "supervisor.log"
        proc = _start_as_systemd_does(argv, env, log_path)
        try:
            async with pumping(receiver):

                async def next_with(key: str, timeout: float = 30):
                    with trio.fail_after(timeout):
                        while True:
                            while receiver.cursor < len(receiver.seen):
                                m = receiver.seen[receiver.cursor]
                                receiver.cursor += 1
                                assert m.pid == proc.pid, f"{m.fields} from pid {m.pid}"
                                if key in m.fields:
                                    return m
                            await trio.sleep(0.02)

                ready = await next_with("READY")
                assert ready.fields["STATUS"].startswith("2 processes serving on 127.0.0.1:")
                # READY came after both processes were serving: both status sockets answer.
                for s in (data / "reexecd.sock", data / "reexecd.sock.1"):
                    assert (await trio.to_thread.run_sync(_status, s))["role"] == "storage"
                await next_with("WATCHDOG")
                proc.send_signal(signal.SIGHUP)
                await next_with("RELOADING")
                assert (await next_with("READY")).fields["STATUS"] == "configuration reloaded"
                # Each logs "configuration reloaded", or which changes need a restart.
                await _wait_for(
                    lambda: (
                        len(re.findall(r"configuration reloaded|reloaded the log", _read(log_path)))
                        >= 3
                    ),
                    10,
                    "the supervisor and both processes to reload",
                )
                proc.send_signal(signal.SIGTERM)
                await next_with("STOPPING")
                code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
                assert code == 0, _read(log_path)[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            receiver.close()
