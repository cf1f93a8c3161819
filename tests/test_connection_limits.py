"""reexecd survives file-descriptor exhaustion and idle-connection hogs (issue 9, item 3).

The daemon runs as a subprocess under a low RLIMIT_NOFILE. Idle TCP connections beyond what it
can hold must never kill it: it caps connections, backs off when accept() fails with EMFILE,
closes connections idle for too long, and keeps serving the clients it has.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import time
from pathlib import Path

import trio
import trio_asyncio
from grpclib.client import Channel

from reexec.gen.build.bazel.remote.execution import v2 as re
from reexec.rpc import StatusDetailsCodec
from tests.conftest import call
from tests.e2e.harness import ReexecdProcess

NOFILE = 256


class LimitedReexecd(ReexecdProcess):
    """reexecd started with RLIMIT_NOFILE lowered to `nofile` (soft and hard)."""

    def __init__(self, *a, nofile: int = NOFILE, **kw) -> None:
        super().__init__(*a, **kw)
        self.nofile = nofile

    def command(self) -> list[str]:
        boot = (
            "import resource, runpy; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({self.nofile}, {self.nofile})); "
            f"runpy.run_module({self.module!r}, run_name='__main__', alter_sys=True)"
        )
        return [sys.executable, "-c", boot, *self.args]


def _write_config(path: Path, port: int, data_dir: Path, extra: str = "") -> Path:
    path.write_text(
        f'data_dir = "{data_dir}"\n[server]\nlisten = ["127.0.0.1:{port}"]\n{extra}\n'
        '[status]\nsocket = ""\n'
    )
    return path


async def _channel(port: int) -> Channel:
    async def make() -> Channel:
        return Channel("127.0.0.1", port, status_details_codec=StatusDetailsCodec())

    return await trio_asyncio.aio_as_trio(make)()


async def _find_missing(channel: Channel) -> float:
    stub = re.ContentAddressableStorageStub(channel)
    digest = re.Digest(hash=hashlib.sha256(b"probe").hexdigest(), size_bytes=5)
    started = time.monotonic()
    with trio.fail_after(10):
        resp = await call(
            stub.find_missing_blobs, re.FindMissingBlobsRequest(blob_digests=[digest])
        )
    assert len(resp.missing_blob_digests) == 1
    return time.monotonic() - started


def _hog(port: int, n: int) -> list[socket.socket]:
    """Open up to `n` idle TCP connections (stops when the client itself runs out)."""
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            break
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket) -> bool:
    """Whether the server closed `s` (EOF or reset), after draining what it sent (SETTINGS,
    GOAWAY)."""
    s.setblocking(False)
    try:
        while True:
            if s.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_survives_more_idle_connections_than_file_descriptors(aio_loop, tmp_path):
    data_dir = tmp_path / "data"
    daemon = LimitedReexecd(data_dir, log_dir=tmp_path / "log")
    with daemon:
        first = await _channel(daemon.port)
        await _find_missing(first)  # an established client before the flood
        hogs = await trio.to_thread.run_sync(_hog, daemon.port, 2 * NOFILE)
        try:
            assert len(hogs) > NOFILE  # more connections than the daemon has descriptors
            await trio.sleep(1.0)
            assert daemon.returncode is None, daemon.log_path.read_text()[-3000:]
            # The established client is still served; the daemon answers promptly.
            assert await _find_missing(first) < 2.0
        finally:
            for s in hogs:
                s.close()
            first.close()
        # Once the hogs are gone, new clients are accepted again.
        with trio.fail_after(20):
            while True:
                ch = await _channel(daemon.port)
                try:
                    await _find_missing(ch)
                    break
                except (OSError, ConnectionError, TimeoutError, trio.TooSlowError):
                    await trio.sleep(0.5)
                finally:
                    ch.close()
        assert daemon.returncode is None


async def test_idle_connections_are_closed(aio_loop, tmp_path):
    data_dir = tmp_path / "data"
    port_holder = LimitedReexecd(data_dir, log_dir=tmp_path / "log")
    config = _write_config(
        tmp_path / "reexecd.toml",
        port_holder.port,
        data_dir,
        "connection_idle_timeout_s = 1.0\nmax_connections = 20",
    )
    daemon = LimitedReexecd(
        data_dir,
        log_dir=tmp_path / "log",
        port=port_holder.port,
        args=["serve", "--config", str(config)],
    )
    with daemon:
        busy = await _channel(daemon.port)
        hogs = await trio.to_thread.run_sync(_hog, daemon.port, 40)
        try:
            # Over max_connections: the extra ones are closed at once.
            await trio.sleep(0.5)
            closed_early = sum(_closed_by_peer(s) for s in hogs)
            assert closed_early >= 20, closed_early
            # The rest are closed once idle for connection_idle_timeout_s.
            await trio.sleep(2.5)
            assert all(_closed_by_peer(s) for s in hogs)
            # A client that keeps calling is not idle, and a closed idle client reconnects.
            for _ in range(3):
                await _find_missing(busy)
                await trio.sleep(0.5)
            await trio.sleep(2.0)
            await _find_missing(busy)
        finally:
            for s in hogs:
                s.close()
            busy.close()
        assert daemon.returncode is None


def test_default_max_connections_follows_the_fd_limit(monkeypatch):
    import resource

    from reexec.daemon import grpc_server

    for soft, want in [(256, 128), (20, 16), (1 << 20, 10_000), (resource.RLIM_INFINITY, 10_000)]:
        monkeypatch.setattr(resource, "getrlimit", lambda _, soft=soft: (soft, soft))
        assert grpc_server.default_max_connections() == want
