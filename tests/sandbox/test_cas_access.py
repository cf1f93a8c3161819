"""How the worker reaches the CAS: store capabilities in process, error mapping over gRPC."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec.cas.digest import digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.memory import MemoryStore
from reexec.cas.verify import VerifyingStore
from reexec.errors import Internal, InvalidArgument, ResourceExhausted, Unavailable
from reexec.sandbox import cas_access
from reexec.sandbox.cas_access import GrpcAccess, LocalStoreAccess


async def test_outputs_entering_the_store_are_hashed(tmp_path: Path) -> None:
    """Issue 9 item 8: an output file is hashed by the store, not only size-checked."""
    fs = FilesystemStore(tmp_path / "cas", 0)
    await fs.start()
    src = tmp_path / "out"
    src.write_bytes(b"what the action wrote")
    os.chmod(src, 0o444)
    wrong = digest_of(b"WHAT THE ACTION WROTE")  # same size: a size check alone accepts it
    for store in (fs, VerifyingStore(fs)):
        with pytest.raises(InvalidArgument, match="does not hold"):
            await LocalStoreAccess(store).upload({wrong: src})
        assert await fs.find_missing([wrong]) == [wrong]


async def test_store_limits_and_holds_are_offered_to_the_worker(tmp_path: Path) -> None:
    mem = MemoryStore(1000, max_blob_bytes=100)
    access = LocalStoreAccess(VerifyingStore(mem))
    assert access.max_blob_bytes() == 100
    big = b"x" * 101
    with pytest.raises(ResourceExhausted):
        await access.upload({digest_of(big): big})
    held = digest_of(b"held")
    with access.hold([held]):
        await access.upload({held: b"held"})
        for i in range(30):
            data = bytes([i]) * 90
            await access.upload({digest_of(data): data})
        assert await mem.find_missing([held]) == []


class _FakeStream:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send_message(self, message: Any, end: bool = False) -> None:
        self.sent.append(message)

    async def recv_message(self) -> Any:
        return None


def _fake_grpc(monkeypatch: pytest.MonkeyPatch, stream: _FakeStream) -> None:
    @asynccontextmanager
    async def open_stream(*args: Any, **kwargs: Any) -> Any:
        yield stream

    async def aio(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await fn(*args, **kwargs)

    monkeypatch.setattr(cas_access, "open_stream", open_stream)
    monkeypatch.setattr(cas_access, "aio", aio)


async def test_write_of_a_file_that_shrank_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9 item 10: it used to send empty chunks until the upload timeout."""
    stream = _FakeStream()
    _fake_grpc(monkeypatch, stream)
    data = b"y" * (3 << 20)
    d = digest_of(data)
    src = tmp_path / "out"
    src.write_bytes(data[: 1 << 20])  # truncated after it was hashed
    access = GrpcAccess(channel=None)  # type: ignore[arg-type]
    with pytest.raises(Internal, match="shrank to 1048576 bytes"):
        await access._write(d, src)
    assert len(stream.sent) == 1
    small = b"z" * 10
    src.write_bytes(small + b"more")  # grew within the last chunk read
    with pytest.raises(Internal, match="grew past"):
        await access._write(digest_of(small), src)
    src.write_bytes(data)
    stream.sent.clear()
    await access._write(d, src)
    assert [m.finish_write for m in stream.sent] == [False, False, True]


async def test_grpc_failures_become_reexec_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise GRPCError(Status.UNAVAILABLE, "connection reset")

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    async def internal(*args: Any, **kwargs: Any) -> Any:
        raise GRPCError(Status.INTERNAL, "boom")

    access = GrpcAccess(channel=None)  # type: ignore[arg-type]
    d = digest_of(b"d")
    for fake, error in ((unavailable, Unavailable), (refused, Unavailable), (internal, Internal)):
        monkeypatch.setattr(cas_access, "unary", fake)
        with pytest.raises(error):
            await access.find_missing([d])


async def test_find_missing_is_sent_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large input tree must not become one request over the server's message limit."""
    from reexec import fastpb

    sizes: list[int] = []

    async def fake_unary(channel, path, req, response_type, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(len(req.blob_digests))
        resp = fastpb.FindMissingBlobsResponse()
        for d in req.blob_digests[::2]:  # every other one is missing
            resp.missing_blob_digests.add(hash=d.hash, size_bytes=d.size_bytes)
        return resp

    monkeypatch.setattr(cas_access, "unary", fake_unary)
    digests = [digest_of(str(i).encode()) for i in range(25_000)]
    missing = await GrpcAccess(channel=None).find_missing(digests)  # type: ignore[arg-type]
    assert sizes == [10_000, 10_000, 5_000]
    assert len(missing) == 12_500 and missing[0] == digests[0] and missing[-1] == digests[-2]
