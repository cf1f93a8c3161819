"""reexecd as a subprocess: crash safety under SIGKILL, graceful drain, TLS, config errors."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from reexec.gen.build.bazel.remote.execution import v2 as re
from reexec.gen.google import bytestream as bs
from reexec.rpc import StatusDetailsCodec
from tests.conftest import call
from tests.e2e.harness import ReexecdProcess

CHUNK = 256 * 1024


async def _channel(port: int, **kw) -> Channel:
    async def make() -> Channel:
        return Channel("127.0.0.1", port, status_details_codec=StatusDetailsCodec(), **kw)

    return await trio_asyncio.aio_as_trio(make)()


def _requests(data: bytes, pause: float = 0.0):
    name = f"uploads/{uuid.uuid4()}/blobs/{hashlib.sha256(data).hexdigest()}/{len(data)}"

    async def gen():
        for off in range(0, len(data), CHUNK):
            if pause:
                await trio_asyncio.trio_as_aio(trio.sleep)(pause)
            yield bs.WriteRequest(
                resource_name=name if off == 0 else "",
                write_offset=off,
                data=data[off : off + CHUNK],
                finish_write=off + CHUNK >= len(data),
            )

    return gen()


def _verify_store(data_dir: Path) -> list[str]:
    """Every committed blob's content matches its name; returns the hashes found."""
    found = []
    for path in (data_dir / "cas" / "blobs" / "sha256").glob("*/*"):
        h, size = path.name.split("-")
        content = path.read_bytes()
        assert len(content) == int(size), path
        assert hashlib.sha256(content).hexdigest() == h, f"corrupt blob {path}"
        found.append(h)
    return found


async def test_sigkill_during_uploads_leaves_no_partial_blob(aio_loop, tmp_path):
    data_dir = tmp_path / "data"
    blobs = [os.urandom(4 * 1024 * 1024 + i) for i in range(6)]
    finished: list[bytes] = []
    with ReexecdProcess(data_dir, log_dir=tmp_path / "log") as daemon:
        ch = await _channel(daemon.port)
        stub = bs.ByteStreamStub(ch)
        # Two complete uploads, then several slow ones killed mid-stream.
        for b in blobs[:2]:
            await call(stub.write, _requests(b))
            finished.append(b)

        async def slow(b: bytes) -> None:
            try:
                await call(stub.write, _requests(b, pause=0.05))
            except (StreamTerminatedError, ConnectionError, GRPCError, OSError):
                pass

        async with trio.open_nursery() as nursery:
            for b in blobs[2:]:
                nursery.start_soon(slow, b)
            await trio.sleep(0.4)  # uploads are a few chunks in
            os.kill(daemon.pid, signal.SIGKILL)
        ch.close()
        daemon.wait(10)
    # Temp files of the killed uploads are on disk now, but never under blobs/.
    assert list((data_dir / "cas" / "tmp").iterdir())
    present = _verify_store(data_dir)
    assert sorted(present) == sorted(hashlib.sha256(b).hexdigest() for b in finished)

    with ReexecdProcess(data_dir, log_dir=tmp_path / "log2") as daemon:
        assert not list((data_dir / "cas" / "tmp").iterdir()), "leftover temp files not cleaned"
        ch = await _channel(daemon.port)
        try:
            cas = re.ContentAddressableStorageStub(ch)
            digests = [
                re.Digest(hash=hashlib.sha256(b).hexdigest(), size_bytes=len(b)) for b in blobs
            ]
            missing = await call(
                cas.find_missing_blobs, re.FindMissingBlobsRequest(blob_digests=digests)
            )
            assert {d.hash for d in missing.missing_blob_digests} == {d.hash for d in digests[2:]}
        finally:
            ch.close()
        assert daemon.stop() == 0


async def test_sigterm_drains_inflight_rpcs_and_refuses_new_ones(aio_loop, tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    with ReexecdProcess(tmp_path / "data", log_dir=tmp_path / "log") as daemon:
        ch = await _channel(daemon.port)
        stub = bs.ByteStreamStub(ch)
        caps = re.CapabilitiesStub(ch)
        await call(caps.get_capabilities, re.GetCapabilitiesRequest())
        result = {}

        async def upload() -> None:
            result["write"] = await call(stub.write, _requests(data, pause=0.1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await trio.sleep(0.35)
            os.kill(daemon.pid, signal.SIGTERM)
            await trio.sleep(0.2)
            # Live connection, new RPC while draining: refused with UNAVAILABLE.
            with pytest.raises(GRPCError) as e:
                await call(caps.get_capabilities, re.GetCapabilitiesRequest())
            assert e.value.status is Status.UNAVAILABLE
        # The in-flight upload finished despite the SIGTERM.
        assert result["write"].committed_size == len(data)
        ch.close()
        assert daemon.wait(15) == 0
        assert "draining" in daemon.log_text()


def _make_cert(
    directory: Path, name: str, ca: tuple[Path, Path] | None = None
) -> tuple[Path, Path]:
    key, crt = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509" if ca is None else "-new", "-newkey", "rsa:2048", "-nodes",
         "-keyout", str(key), "-subj", f"/CN={name}",
         *(["-out", str(crt), "-days", "2", "-addext", "subjectAltName=IP:127.0.0.1"] if ca is None
           else ["-out", str(directory / f"{name}.csr")])],
        check=True, capture_output=True,
    )  # fmt: skip
    if ca is not None:
        ext = directory / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        subprocess.run(
            ["openssl", "x509", "-req", "-in", str(directory / f"{name}.csr"), "-CA", str(ca[1]),
             "-CAkey", str(ca[0]), "-CAcreateserial", "-out", str(crt), "-days", "2",
             "-extfile", str(ext)],
            check=True, capture_output=True,
        )  # fmt: skip
    return key, crt


async def test_tls_with_client_certificates(aio_loop, tmp_path):
    import ssl

    ca = _make_cert(tmp_path, "ca")
    server_key, server_crt = _make_cert(tmp_path, "server", ca)
    client_key, client_crt = _make_cert(tmp_path, "client", ca)
    port_holder = ReexecdProcess(tmp_path / "data")  # only to pick a free port
    config = tmp_path / "tls.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[server]\nlisten = ["127.0.0.1:{port_holder.port}"]\n'
        f'[server.tls]\ncert = "{server_crt}"\nkey = "{server_key}"\nclient_ca = "{ca[1]}"\n'
    )
    with ReexecdProcess(
        tmp_path / "data", port=port_holder.port, args=["serve", "--config", str(config)],
        log_dir=tmp_path / "log",
    ) as daemon:  # fmt: skip

        def client_ctx(with_cert: bool) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(ca[1]))
            ctx.set_alpn_protocols(["h2"])
            if with_cert:
                ctx.load_cert_chain(str(client_crt), str(client_key))
            return ctx

        ch = await _channel(daemon.port, ssl=client_ctx(True))
        caps = await call(re.CapabilitiesStub(ch).get_capabilities, re.GetCapabilitiesRequest())
        assert caps.low_api_version.major == 2
        ch.close()
        ch = await _channel(daemon.port, ssl=client_ctx(False))
        with pytest.raises((ssl.SSLError, ConnectionError, StreamTerminatedError, OSError)):
            await call(re.CapabilitiesStub(ch).get_capabilities, re.GetCapabilitiesRequest())
        ch.close()
        assert daemon.stop() == 0


def test_config_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[cas]\ntype = "fast_slow"\nfast = {type = "memory"}\nslow = {type = "disk"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "reexec.daemon", "serve", "--config", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert str(bad) in proc.stderr
    assert "cas.slow.type" in proc.stderr and "filesystem" in proc.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    with ReexecdProcess(tmp_path / "a", log_dir=tmp_path / "la") as first:
        proc = subprocess.run(
            [sys.executable, "-m", "reexec.daemon", "serve", "--listen", f"127.0.0.1:{first.port}",
             "--data-dir", str(tmp_path / "b")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 1
        assert "address already in use" in proc.stderr.lower()


def test_json_log_format(tmp_path):
    import json

    from tests.e2e.harness import free_port

    port = free_port()
    daemon = ReexecdProcess(
        tmp_path / "data",
        args=[
            "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
            "--log-format", "json",
        ],
        port=port,
        log_dir=tmp_path / "log",
    )  # fmt: skip
    with daemon:
        assert daemon.stop() == 0, daemon.log_text()
    records = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    assert any(r["msg"] == "reexecd ready" and "pid" in r for r in records)
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)


def test_sigterm_during_start_up_is_a_clean_drain(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.e2e.harness import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reexec.daemon", "serve", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(tmp_path / "data")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    # As soon as the port is bound (possibly before the daemon says it is ready).
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.05).close()
            break
        except OSError:
            time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.stderr.read()
