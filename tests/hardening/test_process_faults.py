"""Faults around a `reexecd serve` subprocess: disk full, SIGKILL and SIGSTOP/SIGCONT of the
daemon mid-upload, clients that vanish mid-stream (ByteStream Write, Execute).

Each scenario checks that nothing committed is lost or corrupted, nothing partial becomes
visible, and the daemon (or its restart) serves normal requests afterwards.
"""

from __future__ import annotations

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


def verify_store(data_dir: Path) -> set[str]:
    """Every blob file under cas/blobs holds exactly the content its name promises."""
    found = set()
    for path in (data_dir / "cas" / "blobs").rglob("*"):
        if not path.is_file():
            continue
        h, _, size = path.name.partition("-")
        content = path.read_bytes()
        if size.isdigit():
            assert len(content) == int(size), f"partial blob {path}"
        if len(h) == 64 and "sha256" in path.parts:
            assert hashlib.sha256(content).hexdigest() == h, f"corrupt blob {path}"
        found.add(h)
    return found


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


@pytest.fixture(scope="module")
def disk_full_scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """reexecd on an 8 MiB tmpfs: a blob that cannot fit, a disk filled by someone else, and the
    space coming back. Returns what was observed; the tests below judge it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    base = tmp_path_factory.mktemp("disk-full")
    data_dir = base / "data"
    data_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data_dir)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    seen: dict[str, Any] = {"data_dir": data_dir}
    try:
        with ReexecdProcess(data_dir, log_dir=base / "log") as daemon:
            client = RawClient(daemon.port)
            try:
                seen["small_before"] = client.upload(b"committed before the disk filled")[0]
                too_big = os.urandom(12 * 1024 * 1024)
                seen["too_big"] = sha(too_big)
                seen["too_big_outcome"] = bytestream_upload(client, too_big)
                seen["too_big_missing"] = client.find_missing(sha(too_big))
                seen["free_after_too_big"] = shutil.disk_usage(data_dir).free
                # Someone else fills the disk, leaving less than the next blob needs.
                filler = data_dir / "filler"
                with filler.open("wb") as f:
                    free = shutil.disk_usage(data_dir).free
                    f.write(b"\0" * max(0, free - 512 * 1024))
                blob = os.urandom(2 * 1024 * 1024)
                seen["blob"] = blob
                req = fastpb.BatchUpdateBlobsRequest()
                r = req.requests.add(data=blob[: 1024 * 1024])
                r.digest.CopyFrom(sha(blob[: 1024 * 1024]))
                seen["batch_outcome"] = client.unary(
                    CAS + "BatchUpdateBlobs", req.SerializeToString()
                )
                seen["write_outcome"] = bytestream_upload(client, blob)
                seen["blob_missing_when_full"] = client.find_missing(sha(blob))
                seen["alive_when_full"] = daemon.returncode is None
                # Space returns.
                filler.unlink()
                seen["write_after"] = bytestream_upload(client, blob)
                seen["read_after"] = client.read_blob(sha(blob)) if seen["write_after"].ok else b""
                seen["small_after"] = client.find_missing(seen["small_before"])
                seen["log"] = daemon.log_text()
            finally:
                client.close()
        seen["store"] = verify_store(data_dir)
        yield seen
    finally:
        subprocess.run(["umount", "-l", str(data_dir)], capture_output=True)


def test_disk_full_loses_nothing(disk_full_scenario: dict[str, Any]) -> None:
    s = disk_full_scenario
    for key in ("too_big_outcome", "batch_outcome", "write_outcome"):
        assert not s[key].ok or key == "batch_outcome", (
            f"{key}: an upload that cannot fit succeeded"
        )
        assert s[key].code is not grpc.StatusCode.UNKNOWN, s[key]
    assert s["alive_when_full"]
    # Nothing partial is visible; what was committed before is intact.
    assert s["too_big_missing"] == [s["too_big"].hash]
    assert s["blob_missing_when_full"] == [sha(s["blob"]).hash]
    assert s["too_big"].hash not in s["store"]
    assert s["small_after"] == []
    assert s["small_before"].hash in s["store"]


@pytest.mark.xfail(
    strict=True,
    reason="issue 9 item F5: a ByteStream Write that fails with ENOSPC keeps its partial temp "
    "file in cas/tmp as a resumable upload (bytestream_service.py _apply abandons the upload "
    "only on InvalidArgument), so the disk stays full for upload_idle_timeout_s (600 s) and "
    "every later upload fails even after the space taken by others is freed",
)
def test_disk_full_recovers_when_space_returns(disk_full_scenario: dict[str, Any]) -> None:
    s = disk_full_scenario
    assert s["free_after_too_big"] > 6 * 1024 * 1024, "the failed upload's temp data stayed"
    assert s["write_after"].ok, s["write_after"]
    assert s["read_after"] == s["blob"]


def test_disk_full_is_resource_exhausted(disk_full_scenario: dict[str, Any]) -> None:
    s = disk_full_scenario
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert s["too_big_outcome"].code is exhausted, s["too_big_outcome"]
    assert s["write_outcome"].code is exhausted, s["write_outcome"]
    out = s["batch_outcome"]
    codes = (
        [
            r.status.code
            for r in fastpb.BatchUpdateBlobsResponse.FromString(out.responses[0]).responses
        ]
        if out.ok
        else [out.code.value[0]]
    )
    assert codes == [exhausted.value[0]], (out, codes)


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
