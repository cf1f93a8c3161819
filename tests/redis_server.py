"""A real `redis-server` for tests: a unix socket in a temp dir, no TCP port, no persistence.

    server = RedisServer(tmp_path / "redis")   # or the `redis_server` / `redis_url` fixtures
    server.start()                              # returns once it answers PING
    server.url                                  # "unix:///.../redis.sock"
    server.stop(); server.start()               # "Redis stopped and restarted", same socket
    server.close()                              # stop, bounded (SIGTERM, then SIGKILL)
    RedisServer(dir, tls=(cert, key)).tls_url   # also TLS on 127.0.0.1: "rediss://127.0.0.1:P"

Debian's redis-server comes from scripts/install-system-deps.sh (`make test` runs it). Without
it the tests that need Redis skip, except in CI (`CI` set), where they fail.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def require_redis_server() -> str:
    """The binary's path; skips (fails in CI) when it is not installed."""
    path = redis_server_binary()
    if path is None:
        message = "redis-server is not installed (scripts/install-system-deps.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must have it", pytrace=False)
        pytest.skip(message)
    return path


class RedisServer:
    """One redis-server process at a time on `directory/redis.sock`."""

    def __init__(
        self, directory: Path, *, persistence: bool = False, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_path = self.directory / "redis.sock"
        if len(str(self.socket_path)) > 100:  # AF_UNIX paths are limited to about 108 bytes
            raise ValueError(f"socket path too long for AF_UNIX: {self.socket_path}")
        self.persistence = persistence
        self.binary = require_redis_server()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "redis.log"
        self.tls = tls
        self.tls_port = _free_port() if tls is not None else 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def tls_url(self) -> str:
        assert self.tls is not None, "started without tls=(cert, key)"
        return f"rediss://127.0.0.1:{self.tls_port}"

    def url_for_db(self, db: int) -> str:
        return f"{self.url}?db={db}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (or restart) on the same socket; returns once it answers PING.

        Call it on the test's own thread, not in trio.to_thread: the server dies with the
        thread that started it, and Trio ends idle worker threads after a few seconds.
        """
        if self.running:
            return
        args = [
            self.binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
            "--databases",
            "16",
        ]
        if self.tls is not None:
            cert, key = self.tls
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(cert)]
            args += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
            args += ["--tls-auth-clients", "no"]
        if self.persistence:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ping():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: {self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING: {self._log_tail()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop it (SIGTERM, SIGKILL after STOP_TIMEOUT_S); the socket disappears."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)  # in case it was paused
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        self.socket_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        self.socket_path.unlink(missing_ok=True)

    def pause(self) -> None:
        """SIGSTOP: Redis hangs (connections accepted by the kernel, no replies)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    close = stop

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(str(self.socket_path))
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


def _die_with_parent() -> None:
    """In the child: SIGKILL when the thread that started it ends, so a pytest killed before
    its teardown (a timeout, Ctrl-C twice) leaves no redis-server behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
