"""Faults around a `reexecd serve` subprocess: disk full, SIGKILL and SIGSTOP/SIGCONT of the
daemon mid-upload, clients that vanish mid-stream (ByteStream Write, Execute).

Each scenario checks that nothing committed is lost or corrupted, nothing partial becomes
visible, and the daemon (or its restart) serves normal requests afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zstandard

from reexec import fastpb
from tests.e2e.harness import ReexecdProcess
from tests.hardening.conftest import BYTESTREAM, CAS, EXECUTION, Outcome, RawClient, sha

CHUNK = 64 * 1024
REPO = Path(__file__).resolve().parents[2]


def write_requests(data: bytes, name: str, pause: float = 0.0, start: int = 0) -> Iterator[bytes]:
    for off in range(start, len(data), CHUNK):
        if pause:
            time.sleep(pause)
        yield fastpb.WriteRequest(
            resource_name=name if off == start else "",
            write_offset=off,
            data=data[off : off + CHUNK],
            finish_write=off + CHUNK >= len(data),
        ).SerializeToString()


def upload_name(data: bytes) -> str:
    return f"uploads/{uuid.uuid4()}/blobs/{hashlib.sha256(data).hexdigest()}/{len(data)}"


def bytestream_upload(client: RawClient, data: bytes, pause: float = 0.0) -> Outcome:
    return client.client_stream(
        BYTESTREAM + "Write", write_requests(data, upload_name(data), pause), timeout=60
    )


def verify_store(data_dir: Path, strict: bool = True) -> Any:
    """Every blob file under cas/blobs holds exactly the content its name promises. Returns the
    hashes found; with strict=False, {"found": hashes, "partial": names} instead of asserting."""
    found, partial = set(), []
    for path in (data_dir / "cas" / "blobs").rglob("*"):
        if not path.is_file():
            continue
        h, _, size = path.name.partition("-")
        content = path.read_bytes()
        ok = not size.isdigit() or len(content) == int(size)
        if len(h) == 64 and "sha256" in path.parts:
            ok = ok and hashlib.sha256(content).hexdigest() == h
        if not ok:
            assert not strict, f"partial or corrupt blob {path}"
            partial.append(f"{path.name} ({len(content)} bytes)")
        found.add(h)
    return found if strict else {"found": found, "partial": partial}


def healthy(client: RawClient, tag: bytes) -> None:
    """A fresh blob round-trips."""
    blob = b"health check " + tag
    (d,) = client.upload(blob)
    assert client.read_blob(d) == blob


@pytest.fixture
def clients() -> Iterator[list[RawClient]]:
    made: list[RawClient] = []
    yield made
    for c in made:
        c.close()


def _client(clients: list[RawClient], port: int) -> RawClient:
    c = RawClient(port)
    clients.append(c)
    return c


# -- disk full --------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(base: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at base/data (skips the test where mounting is not allowed)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    data_dir = base / "data"
    data_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(data_dir)], capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield data_dir
    finally:
        subprocess.run(["umount", "-l", str(data_dir)], capture_output=True)


def fill(path: Path, leave: int) -> None:
    """Someone else fills the disk, leaving about `leave` bytes free."""
    with path.open("wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(path.parent).free - leave))


@pytest.fixture(scope="module")
def stream_full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """reexecd on an 8 MiB tmpfs; a 12 MiB ByteStream upload cannot fit. What was observed."""
    base = tmp_path_factory.mktemp("stream-full")
    seen: dict[str, Any] = {}
    with small_disk(base) as data_dir, ReexecdProcess(data_dir, log_dir=base / "log") as daemon:
        client = RawClient(daemon.port)
        try:
            seen["small"] = client.upload(b"committed before the disk filled")[0]
            free_before = shutil.disk_usage(data_dir).free
            too_big = os.urandom(12 * 1024 * 1024)
            seen["too_big"] = sha(too_big)
            seen["outcome"] = bytestream_upload(client, too_big)
            seen["missing"] = client.find_missing(sha(too_big))
            seen["freed"] = shutil.disk_usage(data_dir).free >= free_before - 256 * 1024
            # Space is there for a blob that fits: does an upload succeed now?
            blob = os.urandom(2 * 1024 * 1024)
            seen["after"] = bytestream_upload(client, blob)
            seen["read_after"] = client.read_blob(sha(blob)) == blob if seen["after"].ok else None
            seen["small_after"] = client.find_missing(seen["small"])
            seen["alive"] = daemon.returncode is None
            seen["store"] = verify_store(data_dir)
        finally:
            client.close()
    yield seen


def test_stream_upload_too_big_for_the_disk(stream_full: dict[str, Any]) -> None:
    s = stream_full
    assert s["outcome"].code is grpc.StatusCode.RESOURCE_EXHAUSTED, s["outcome"]
    assert s["missing"] == [s["too_big"].hash], "a partial blob is visible"
    assert s["too_big"].hash not in s["store"]
    assert s["small_after"] == [] and s["small"].hash in s["store"]
    assert s["alive"]


def test_stream_upload_failure_gives_its_space_back(stream_full: dict[str, Any]) -> None:
    """(The failed upload's temp file stayed as a resumable upload until e35ca4f: F5.)"""
    s = stream_full
    assert s["freed"], "the failed upload's temporary data still fills the disk"
    assert s["after"].ok, s["after"]
    assert s["read_after"]


UPLOADS = ("batch", "single-message Write", "streamed Write")


def _upload_by(client: RawClient, how: str, blob: bytes) -> tuple[Outcome, int | None]:
    """Upload `blob` one of three ways; returns the RPC outcome and the per-blob code (batch)."""
    if how == "batch":
        req = fastpb.BatchUpdateBlobsRequest()
        r = req.requests.add(data=blob)
        r.digest.CopyFrom(sha(blob))
        out = client.unary(CAS + "BatchUpdateBlobs", req.SerializeToString())
        if not out.ok:
            return out, None
        return out, fastpb.BatchUpdateBlobsResponse.FromString(out.responses[0]).responses[
            0
        ].status.code
    if how == "single-message Write":
        name = upload_name(blob)
        msg = fastpb.WriteRequest(resource_name=name, data=blob, finish_write=True)
        return client.client_stream(BYTESTREAM + "Write", [msg.SerializeToString()]), None
    return bytestream_upload(client, blob), None


@pytest.fixture(scope="module")
def nearly_full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """reexecd on an 8 MiB tmpfs that someone else fills to 512 KiB free; a 1 MiB blob is
    uploaded each of three ways (the disk refilled before each), then the space returns."""
    base = tmp_path_factory.mktemp("nearly-full")
    seen: dict[str, Any] = {"blobs": {how: os.urandom(1024 * 1024) for how in UPLOADS}}
    with small_disk(base) as data_dir, ReexecdProcess(data_dir, log_dir=base / "log") as daemon:
        client = RawClient(daemon.port)
        try:
            seen["small"] = client.upload(b"committed before the disk filled")[0]
            filler = data_dir / "filler"
            for how, blob in seen["blobs"].items():
                fill(filler, 512 * 1024)
                seen[how] = _upload_by(client, how, blob)
                seen[how, "missing"] = client.find_missing(sha(blob)) == [sha(blob).hash]
                filler.unlink()
            seen["alive"] = daemon.returncode is None
            seen["store_when_full"] = verify_store(data_dir, strict=False)
            for how, blob in seen["blobs"].items():  # space returned
                seen[how, "after"] = _upload_by(client, how, blob)
                seen[how, "read"] = client.read_blob(sha(blob)) == blob
            seen["small_after"] = client.find_missing(seen["small"])
        finally:
            client.close()
    yield seen


def _partial(seen: dict[str, Any], how: str) -> list[str]:
    h = sha(seen["blobs"][how]).hash
    return [p for p in seen["store_when_full"]["partial"] if p.startswith(h)]


def test_disk_full_refuses_uploads_precisely_and_recovers(nearly_full: dict[str, Any]) -> None:
    s = nearly_full
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    out, _ = s["streamed Write"]
    assert out.code is exhausted, out
    assert s["streamed Write", "missing"] and not _partial(s, "streamed Write")
    for how in UPLOADS:
        assert s[how][0].code in (grpc.StatusCode.OK, exhausted), (how, s[how][0])
    assert s["alive"]
    # Space returned: uploads work again and every blob reads back whole.
    for how in UPLOADS:
        assert s[how, "after"][0].ok, (how, s[how, "after"])
        assert s[how, "read"], how
    assert s["small_after"] == []


@pytest.mark.parametrize("how", ["batch", "single-message Write"])
def test_disk_full_never_stores_a_partial_blob(nearly_full: dict[str, Any], how: str) -> None:
    """(Until 8abb2e2 a blob written in one piece was stored truncated and reported stored: F6.)"""
    s = nearly_full
    out, code = s[how]
    assert not _partial(s, how), f"partial blob in cas/blobs after a {how}: {_partial(s, how)}"
    if out.ok and code in (None, 0):  # reported stored: then it must be complete
        assert not s[how, "missing"]
    else:
        assert s[how, "missing"]
    assert s[how, "read"], "the blob reads back truncated after space returned"


# -- SIGKILL / SIGSTOP of the daemon mid-upload -----------------------------------------------


class SlowUploads:
    """ByteStream uploads in background threads, a chunk every `pause` seconds."""

    def __init__(self, client: RawClient, blobs: list[bytes], pause: float) -> None:
        self.results: list[Outcome | None] = [None] * len(blobs)

        def run(i: int) -> None:
            self.results[i] = bytestream_upload(client, blobs[i], pause=pause)

        self.threads = [threading.Thread(target=run, args=(i,), daemon=True)
                        for i in range(len(blobs))]  # fmt: skip
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> list[Outcome | None]:
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "an upload thread is stuck"
        return self.results


def test_sigkill_mid_upload_keeps_every_committed_blob(tmp_path: Path, clients) -> None:
    data_dir = tmp_path / "data"
    committed = [os.urandom(300 * 1024 + i) for i in range(4)]
    small = [b"small committed %d" % i for i in range(20)]
    inflight = [os.urandom(2 * 1024 * 1024 + i) for i in range(4)]
    with ReexecdProcess(data_dir, log_dir=tmp_path / "log") as daemon:
        client = _client(clients, daemon.port)
        client.upload(*small)
        for b in committed:
            assert bytestream_upload(client, b).ok
        uploads = SlowUploads(client, inflight, pause=0.05)
        time.sleep(0.5)  # a few chunks in
        os.kill(daemon.pid, signal.SIGKILL)
        assert daemon.wait(10) == -signal.SIGKILL
        results = uploads.join(30)
    assert all(r is not None and not r.ok for r in results), results
    present = verify_store(data_dir)
    for b in inflight:
        assert hashlib.sha256(b).hexdigest() not in present, "a killed upload became visible"
    with ReexecdProcess(data_dir, log_dir=tmp_path / "log2") as daemon:
        client = _client(clients, daemon.port)
        for b in committed:
            assert client.read_blob(sha(b)) == b
        assert client.find_missing(*(sha(b) for b in small)) == []
        assert sorted(client.find_missing(*(sha(b) for b in inflight))) == sorted(
            sha(b).hash for b in inflight
        )
        # The interrupted uploads can be done again.
        assert bytestream_upload(client, inflight[0]).ok
        assert client.read_blob(sha(inflight[0])) == inflight[0]
        healthy(client, b"after SIGKILL")


def test_sigstop_sigcont_mid_upload_completes_intact(tmp_path: Path, clients) -> None:
    blobs = [os.urandom(1024 * 1024 + i) for i in range(4)]
    with ReexecdProcess(tmp_path / "data", log_dir=tmp_path / "log") as daemon:
        client = _client(clients, daemon.port)
        healthy(client, b"before SIGSTOP")
        uploads = SlowUploads(client, blobs, pause=0.02)
        time.sleep(0.2)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            time.sleep(2)
            # A client with a short deadline gives up while the daemon is stopped.
            req = fastpb.FindMissingBlobsRequest()
            stopped = client.unary(CAS + "FindMissingBlobs", req.SerializeToString(), timeout=0.5)
            assert stopped.code is grpc.StatusCode.DEADLINE_EXCEEDED, stopped
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        results = uploads.join(60)
        assert all(r is not None and r.ok for r in results), [str(r) for r in results]
        for b in blobs:
            assert client.read_blob(sha(b)) == b
        healthy(client, b"after SIGCONT")
        assert daemon.stop() == 0
    verify_store(tmp_path / "data")


# -- clients that vanish mid-stream -----------------------------------------------------------

_VANISHING_WRITER = """
import sys, time, grpc
sys.path.insert(0, {repo!r})
from tests.hardening.test_process_faults import write_requests
data = bytes(range(256)) * ({size} // 256)
ch = grpc.insecure_channel("127.0.0.1:{port}")
def reqs():
    for i, r in enumerate(write_requests(data, {name!r})):
        if i == 4:
            print("sent", flush=True)
            time.sleep(60)   # killed here
        yield r
ch.stream_unary("/google.bytestream.ByteStream/Write")(reqs(), timeout=120)
"""


def test_writer_killed_mid_stream_leaves_a_resumable_upload(tmp_path: Path, clients) -> None:
    size = 1024 * 1024
    data = bytes(range(256)) * (size // 256)
    name = upload_name(data)
    with ReexecdProcess(tmp_path / "data", log_dir=tmp_path / "log") as daemon:
        client = _client(clients, daemon.port)
        script = _VANISHING_WRITER.format(repo=str(REPO), size=size, port=daemon.port, name=name)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "sent"
            time.sleep(0.3)
        finally:
            child.kill()
            child.wait(10)
        time.sleep(0.3)
        healthy(client, b"after a vanished writer")
        assert client.find_missing(sha(data)) == [sha(data).hash], "a partial blob is visible"
        # The upload can be resumed where the server says it stands, and completes intact.
        q = fastpb.message_class("google.bytestream.QueryWriteStatusRequest")(resource_name=name)
        out = client.unary(BYTESTREAM + "QueryWriteStatus", q.SerializeToString())
        if out.ok:
            status = fastpb.message_class("google.bytestream.QueryWriteStatusResponse")
            committed = status.FromString(out.responses[0]).committed_size
            assert 0 <= committed <= 4 * CHUNK and committed % CHUNK == 0, committed
        else:
            assert out.code is grpc.StatusCode.NOT_FOUND, out
            committed = 0
        resumed = client.client_stream(
            BYTESTREAM + "Write", write_requests(data, name, start=committed)
        )
        assert resumed.ok, resumed
        assert client.read_blob(sha(data)) == data
        assert daemon.stop() == 0


def test_execute_client_that_vanishes_leaves_the_daemon_healthy(tmp_path: Path, clients) -> None:
    with ReexecdProcess(tmp_path / "data", log_dir=tmp_path / "log") as daemon:
        client = _client(clients, daemon.port)
        # Several clients start slow actions and go away after the first answer.
        calls = []
        for i in range(4):
            req = client.action_request(["/bin/sh", "-c", "sleep 1; echo slow"], salt=b"%d" % i)
            call = client.channel.unary_stream(EXECUTION + "Execute")(req, timeout=30)
            first = fastpb.Operation.FromString(next(call))
            assert not first.done
            calls.append(call)
        for call in calls:
            call.cancel()
        # A fresh client on a fresh connection: normal requests work, an action runs.
        other = _client(clients, daemon.port)
        healthy(other, b"after vanished Execute clients")
        resp = other.execute(other.action_request(["/bin/sh", "-c", "echo hello"], salt=b"a"))
        assert resp.status.code == 0, resp.status
        assert resp.result.exit_code == 0
        assert resp.result.stdout_raw == b"hello\n" or resp.result.HasField("stdout_digest")
        if resp.result.HasField("stdout_digest"):
            assert other.read_blob(resp.result.stdout_digest) == b"hello\n"
        assert daemon.stop() == 0


def test_sigkill_mid_action_then_restart(tmp_path: Path, clients) -> None:
    """The daemon dies while actions run (and write outputs): after a restart, what was stored
    before is intact, no half-written output is visible, and the same action runs to the end."""
    data_dir = tmp_path / "data"
    kept = [os.urandom(200 * 1024 + i) for i in range(3)]
    script = "head -c 3000000 /dev/urandom > out.bin; sleep 5; echo done"
    with ReexecdProcess(data_dir, log_dir=tmp_path / "log") as daemon:
        client = _client(clients, daemon.port)
        client.upload(*kept)
        req = client.action_request(
            ["/bin/sh", "-c", script], salt=b"kill", output_paths=["out.bin"]
        )
        call = client.channel.unary_stream(EXECUTION + "Execute")(req, timeout=30)
        stages = []
        for msg in call:  # wait until it executes
            meta = fastpb.ExecuteOperationMetadata()
            fastpb.Operation.FromString(msg).metadata.Unpack(meta)
            stages.append(meta.stage)
            if meta.stage == 3:  # EXECUTING
                break
        time.sleep(0.5)
        os.kill(daemon.pid, signal.SIGKILL)
        assert daemon.wait(10) == -signal.SIGKILL
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.INTERNAL), e.value  # fmt: skip
    verify_store(data_dir)
    with ReexecdProcess(data_dir, log_dir=tmp_path / "log2") as daemon:
        client = _client(clients, daemon.port)
        for b in kept:
            assert client.read_blob(sha(b)) == b
        quick = client.action_request(["/bin/sh", "-c", "echo again > out.bin; echo done"],
                                      salt=b"kill", output_paths=["out.bin"])  # fmt: skip
        resp = client.execute(quick)
        assert resp.status.code == 0 and resp.result.exit_code == 0, resp
        (out,) = resp.result.output_files
        assert client.read_blob(out.digest) == b"again\n"
        assert daemon.stop() == 0
    verify_store(data_dir)


def test_readers_that_vanish_mid_stream(tmp_path: Path, clients) -> None:
    """Many clients start reading a large blob and go away after the first chunk: the daemon
    keeps serving, and the blob (held while read) is still there and intact."""
    blob = os.urandom(8 * 1024 * 1024)
    with ReexecdProcess(tmp_path / "data", log_dir=tmp_path / "log") as daemon:
        client = _client(clients, daemon.port)
        assert bytestream_upload(client, blob).ok
        req = fastpb.ReadRequest(resource_name=f"blobs/{sha(blob).hash}/{len(blob)}")
        for _ in range(20):
            call = client.channel.unary_stream(BYTESTREAM + "Read")(
                req.SerializeToString(), timeout=30
            )
            assert fastpb.ReadResponse.FromString(next(call)).data
            call.cancel()
        healthy(client, b"after vanished readers")
        assert client.read_blob(sha(blob)) == blob
        assert daemon.stop() == 0


# -- memory held by refused requests ------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _zstd_bomb_write(client: RawClient) -> Outcome:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))  # ~2 KB
    name = f"uploads/{uuid.uuid4()}/compressed-blobs/zstd/{sha(b'tiny').hash}/4"
    msg = fastpb.WriteRequest(resource_name=name, data=bomb, finish_write=True)
    return client.client_stream(BYTESTREAM + "Write", [msg.SerializeToString()])


def _zstd_bomb_batch(client: RawClient) -> Outcome:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    req = fastpb.BatchUpdateBlobsRequest()
    r = req.requests.add(data=bomb, compressor=1)
    r.digest.CopyFrom(sha(b"tiny"))
    return client.unary(CAS + "BatchUpdateBlobs", req.SerializeToString())


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(
            _zstd_bomb_write,
            id="ByteStream-Write",
        ),
        pytest.param(_zstd_bomb_batch, id="BatchUpdateBlobs"),
    ],
)
def test_refused_zstd_bombs_hold_no_memory(tmp_path: Path, clients, send) -> None:
    """40 zstd bombs (2 KB that decompress to 64 MiB, declared 4 bytes) are each refused, and
    the server's RSS does not grow with them."""
    with ReexecdProcess(tmp_path / "data", log_dir=tmp_path / "log") as daemon:
        client = _client(clients, daemon.port)
        for _ in range(5):  # warm up allocator and caches
            send(client)
        before = _rss_mib(daemon.pid)
        for _ in range(40):
            out = send(client)
            codes = _per_blob(out)
            assert out.code is grpc.StatusCode.INVALID_ARGUMENT or codes == [3], (out, codes)
        grown = _rss_mib(daemon.pid) - before
        healthy(client, b"after zstd bombs")
        assert grown < 16, f"RSS grew {grown:.0f} MiB over 40 refused zstd bombs"
        assert daemon.stop() == 0


def _per_blob(out: Outcome) -> list[int]:
    if not out.ok:
        return []
    resp = fastpb.BatchUpdateBlobsResponse.FromString(out.responses[0])
    return [r.status.code for r in resp.responses]
