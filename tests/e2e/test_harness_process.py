"""ReexecdProcess against a stand-in daemon module (no reexec, no Bazel needed)."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from tests.e2e.harness import ReexecdError, ReexecdProcess, free_port

FAKE_DAEMON = textwrap.dedent(
    """
    import os, signal, socket, sys, time

    args = sys.argv[1:]
    assert args[0] == "serve", args
    host, port = args[args.index("--listen") + 1].rsplit(":", 1)
    os.makedirs(args[args.index("--data-dir") + 1], exist_ok=True)
    mode = os.environ.get("FAKE_MODE", "serve")
    print("fake daemon starting", mode, file=sys.stderr, flush=True)
    if mode == "crash":
        print("FAKE_CRASH_MESSAGE", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if mode == "never_listen":
        time.sleep(60)
    sock = socket.create_server((host, int(port)))
    print("fake daemon listening", file=sys.stderr, flush=True)
    while True:
        conn, _ = sock.accept()
        conn.close()
    """
)


@pytest.fixture
def fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "fake_reexecd.py").write_text(FAKE_DAEMON)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "fake_reexecd"


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535


def test_start_and_stop(tmp_path: Path, fake_module: str) -> None:
    daemon = ReexecdProcess(tmp_path / "data", log_dir=tmp_path / "log", module=fake_module)
    with daemon:
        assert daemon.address == f"grpc://127.0.0.1:{daemon.port}"
        assert daemon.returncode is None
        assert "fake daemon listening" in daemon.log_text()
        assert daemon.stop() == 0
    assert (tmp_path / "data").is_dir()
    assert daemon.log_path == tmp_path / "log" / "reexecd.log"


def test_context_exit_stops_daemon(tmp_path: Path, fake_module: str) -> None:
    with ReexecdProcess(tmp_path / "data", module=fake_module) as daemon:
        pass
    assert daemon.returncode == 0


def test_stop_with_sigkill_reports_signal(tmp_path: Path, fake_module: str) -> None:
    with ReexecdProcess(tmp_path / "data", module=fake_module) as daemon:
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL


def test_crash_at_startup_fails_with_log_tail(tmp_path: Path, fake_module: str) -> None:
    daemon = ReexecdProcess(tmp_path / "data", module=fake_module, env={"FAKE_MODE": "crash"})
    with pytest.raises(ReexecdError, match=r"(?s)exited with code 3.*FAKE_CRASH_MESSAGE"):
        daemon.start()


def test_startup_timeout_kills_daemon(tmp_path: Path, fake_module: str) -> None:
    daemon = ReexecdProcess(
        tmp_path / "data",
        module=fake_module,
        env={"FAKE_MODE": "never_listen"},
        startup_timeout=1.0,
    )
    with pytest.raises(ReexecdError, match=r"(?s)did not listen.*fake daemon starting"):
        daemon.start()
    assert daemon.returncode == -signal.SIGKILL


def test_stop_timeout_kills_and_raises(tmp_path: Path, fake_module: str) -> None:
    daemon = ReexecdProcess(tmp_path / "data", module=fake_module, env={"FAKE_MODE": "ignore_term"})
    with daemon:
        with pytest.raises(ReexecdError, match="did not exit"):
            daemon.stop(timeout=1.0)
        assert daemon.returncode == -signal.SIGKILL
