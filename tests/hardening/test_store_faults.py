"""A store that raises: every RPC answers with a precise status, and service resumes after.

The in-process daemon's CAS and action cache are wrapped (at the services that hold them) in
stores whose methods raise OSError while `failing` is set: EIO (a broken disk: a genuine server
fault, so UNAVAILABLE, or INTERNAL with a message naming the failure, is acceptable) and ENOSPC
(disk full: RESOURCE_EXHAUSTED). Never UNKNOWN, never a hang, never a dead daemon; once the
store recovers every RPC works again and nothing half-written is visible.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from reexec import fastpb
from reexec.daemon.config import SchedulerConfig
from tests.conftest import make_config
from tests.hardening.conftest import (
    AC,
    BYTESTREAM,
    CALL_TIMEOUT_S,
    CAS,
    EXECUTION,
    RawClient,
    ThreadDaemon,
    sha,
)

STORE_METHODS = ("find_missing", "open_read", "open_write", "has", "get_bytes", "put_bytes",
                 "local_files", "get", "put",
                 # the fast paths' synchronous twins (reexec/cas/store.py)
                 "find_missing_nowait", "get_bytes_nowait", "put_bytes_nowait",
                 "get_nowait")  # fmt: skip


class FailingStore:
    """Delegates to `inner`; while `errno` is set, the store methods raise OSError(errno)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.errno: int | None = None
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in STORE_METHODS or not callable(attr):
            return attr

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.errno is not None:
                self.calls += 1
                raise OSError(self.errno, f"{errno.errorcode[self.errno]} injected by the test")
            return attr(*args, **kwargs)

        return wrapper


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadDaemon, list]]:
    data = tmp_path_factory.mktemp("store-faults") / "data"
    d = ThreadDaemon(make_config(data, scheduler=SchedulerConfig()), fake_worker=True).start()
    wrapped: list[FailingStore] = []
    by_id: dict[int, FailingStore] = {}

    def wrap(obj: Any) -> Any:
        if id(obj) not in by_id:
            by_id[id(obj)] = FailingStore(obj)
            wrapped.append(by_id[id(obj)])
        return by_id[id(obj)]

    def install() -> None:
        assert d.daemon is not None
        holders = [*d.daemon.services]
        if d.daemon.scheduler is not None:
            holders.append(d.daemon.scheduler)
        for holder in holders:
            for attr in ("cas", "ac"):
                if hasattr(holder, attr):
                    setattr(holder, attr, wrap(getattr(holder, attr)))

    async def install_in_daemon() -> None:
        install()

    d.run_in_daemon(install_in_daemon)
    try:
        yield d, wrapped
    finally:
        d.stop()


@pytest.fixture(scope="module")
def client(faulty: tuple[ThreadDaemon, list]) -> Iterator[RawClient]:
    c = RawClient(faulty[0].port)
    yield c
    c.close()


def set_errno(wrapped: list, value: int | None) -> None:
    for store in wrapped:
        store.errno = value


def _requests(client: RawClient) -> dict[str, Any]:
    """One valid call of each store-backed RPC; returns name -> thunk giving an Outcome."""
    data = b"store fault blob"
    d = sha(data)
    present = sha(b"stored before the fault")
    fm = fastpb.FindMissingBlobsRequest()
    fm.blob_digests.add().CopyFrom(present)
    bu = fastpb.BatchUpdateBlobsRequest()
    r = bu.requests.add(data=data)
    r.digest.CopyFrom(d)
    br = fastpb.BatchReadBlobsRequest()
    br.digests.add().CopyFrom(present)
    root = fastpb.Directory().SerializeToString()
    gt = fastpb.GetTreeRequest()
    gt.root_digest.CopyFrom(sha(root))
    rd = fastpb.ReadRequest(resource_name=f"blobs/{present.hash}/{present.size_bytes}")
    wr = fastpb.WriteRequest(
        resource_name=f"uploads/6a1f7c52-5b7e-4c3e-9d0b-1e8f2a3b4c5d/blobs/{d.hash}/{d.size_bytes}",
        data=data,
        finish_write=True,
    )
    ga = fastpb.GetActionResultRequest()
    ga.action_digest.CopyFrom(present)
    ua = fastpb.UpdateActionResultRequest()
    ua.action_digest.CopyFrom(sha(b"some action"))
    ua.action_result.exit_code = 0
    ex = fastpb.ExecuteRequest()
    ex.action_digest.CopyFrom(present)
    return {
        "FindMissingBlobs": lambda: client.unary(CAS + "FindMissingBlobs", fm.SerializeToString()),
        "BatchUpdateBlobs": lambda: client.unary(CAS + "BatchUpdateBlobs", bu.SerializeToString()),
        "BatchReadBlobs": lambda: client.unary(CAS + "BatchReadBlobs", br.SerializeToString()),
        "GetTree": lambda: client.server_stream(CAS + "GetTree", gt.SerializeToString()),
        "Read": lambda: client.server_stream(BYTESTREAM + "Read", rd.SerializeToString()),
        "Write": lambda: client.client_stream(BYTESTREAM + "Write", [wr.SerializeToString()]),
        "GetActionResult": lambda: client.unary(AC + "GetActionResult", ga.SerializeToString()),
        "UpdateActionResult": lambda: client.unary(
            AC + "UpdateActionResult", ua.SerializeToString()
        ),
        "Execute": lambda: client.server_stream(
            EXECUTION + "Execute", ex.SerializeToString(), timeout=CALL_TIMEOUT_S
        ),
    }


def _per_blob_codes(rpc: str, out: Any) -> list[int]:
    if not out.ok or rpc not in ("BatchUpdateBlobs", "BatchReadBlobs"):
        return []
    cls = fastpb.message_class(f"build.bazel.remote.execution.v2.{rpc}Response")
    return [r.status.code for r in cls.FromString(out.responses[0]).responses]


RPCS = ["FindMissingBlobs", "BatchUpdateBlobs", "BatchReadBlobs", "GetTree", "Read", "Write",
        "GetActionResult", "UpdateActionResult", "Execute"]  # fmt: skip


def _status_seen(faulty: tuple[ThreadDaemon, list], client: RawClient, rpc: str, err: int):
    daemon, wrapped = faulty
    client.upload(b"stored before the fault", fastpb.Directory().SerializeToString())
    calls = _requests(client)
    set_errno(wrapped, err)
    try:
        out = calls[rpc]()
    finally:
        set_errno(wrapped, None)
    assert daemon.alive(), f"the daemon died after {rpc} met {errno.errorcode[err]}"
    # Service resumes: the same call now works (or fails only for a client reason).
    again = calls[rpc]()
    assert again.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (rpc, again)
    assert client.find_missing(sha(b"stored before the fault")) == []
    return out


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("rpc", RPCS)
def test_store_failure_leaves_the_daemon_serving(faulty, client, rpc: str, err: int) -> None:
    """Whatever status the failed call got, the daemon lives and the same call works after."""
    out = _status_seen(faulty, client, rpc, err)
    assert out.code is not grpc.StatusCode.UNKNOWN, (rpc, str(out))
    assert out.code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc} hung on a failing store"


@pytest.mark.parametrize("rpc", RPCS)
def test_eio_gives_a_server_fault_status_with_a_message(faulty, client, rpc: str) -> None:
    """(Generic 'internal error in <method>', whole batches failed, until e35ca4f: F3.)"""
    out = _status_seen(faulty, client, rpc, errno.EIO)
    codes = _per_blob_codes(rpc, out)
    if codes:  # batch RPCs report per blob
        assert all(c in (grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.INTERNAL.value[0])
                   for c in codes), (rpc, codes)  # fmt: skip
        return
    assert out.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), (rpc, str(out))
    assert out.details and "internal error in" not in out.details, (
        f"{rpc}: a store I/O error should be named, got {out}"
    )


@pytest.mark.parametrize("rpc", ["BatchUpdateBlobs", "Write", "UpdateActionResult"])
def test_enospc_on_a_write_is_resource_exhausted(faulty, client, rpc: str) -> None:
    out = _status_seen(faulty, client, rpc, errno.ENOSPC)
    codes = _per_blob_codes(rpc, out)
    if codes:
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]], (rpc, codes)
    else:
        assert out.code is grpc.StatusCode.RESOURCE_EXHAUSTED, (rpc, str(out))


def test_store_recovers_and_data_is_intact(faulty, client) -> None:
    daemon, wrapped = faulty
    blob = hashlib.sha256(b"after the faults").digest() * 100
    (d,) = client.upload(blob)
    assert client.read_blob(d) == blob
    assert daemon.alive()
