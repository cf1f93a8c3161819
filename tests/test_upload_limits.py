"""Uploads that could never complete are refused before anything is buffered (issue 9, items 5-6).

- A declared size above the store's `max_blob_bytes()` is RESOURCE_EXHAUSTED, for ByteStream
  Write and for each BatchUpdateBlobs entry.
- Resumable uploads open at once are capped (`server.max_open_uploads`).
- zstd uploads may not decompress to more than the declared size.
"""

from __future__ import annotations

import hashlib

import pytest
import zstandard
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec.cas.bytestream_service import BoundedZstd, ByteStreamService
from reexec.errors import InvalidArgument
from reexec.gen.build.bazel.remote.execution import v2 as re
from reexec.gen.google import bytestream as bs
from tests.conftest import call, make_config, open_channel, start_daemon
from tests.test_bytestream_service import chunks, digest_path, read_all, upload_name


@pytest.fixture
def stub(channel):
    return bs.ByteStreamStub(channel)


def limit_blobs(daemon, monkeypatch, limit: int) -> None:
    """Make the daemon's CAS report a per-blob limit, as a bounded store does."""
    monkeypatch.setattr(daemon.cas, "max_blob_bytes", lambda: limit)


async def test_write_larger_than_the_store_accepts_is_refused_up_front(daemon, stub, monkeypatch):
    limit_blobs(daemon, monkeypatch, 1000)
    opened = []
    real_open = daemon.cas.open_write

    async def spy(digest):
        opened.append(digest)
        return await real_open(digest)

    monkeypatch.setattr(daemon.cas, "open_write", spy)
    data = b"x" * 5000
    name = upload_name(data)
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(name, data, size=1000, finish=False)[:1])
    assert e.value.status is Status.RESOURCE_EXHAUSTED
    assert "5000 bytes" in e.value.message and "1000 bytes" in e.value.message
    assert opened == []
    bytestream = next(s for s in daemon.services if isinstance(s, ByteStreamService))
    assert not bytestream.uploads.uploads  # nothing left behind for QueryWriteStatus
    # A declared size within the limit still works.
    small = b"y" * 1000
    resp = await call(stub.write, chunks(upload_name(small), small, size=300))
    assert resp.committed_size == 1000


async def test_compressed_write_larger_than_the_store_accepts(daemon, stub, monkeypatch):
    limit_blobs(daemon, monkeypatch, 1000)
    data = b"z" * 4096
    name = upload_name(data, compressed=True)
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(name, zstandard.compress(data)))
    assert e.value.status is Status.RESOURCE_EXHAUSTED


async def test_batch_entry_larger_than_the_store_accepts(daemon, channel, monkeypatch):
    limit_blobs(daemon, monkeypatch, 10)
    cas = re.ContentAddressableStorageStub(channel)
    big, small = b"b" * 11, b"s" * 10
    resp = await call(
        cas.batch_update_blobs,
        re.BatchUpdateBlobsRequest(
            requests=[
                re.BatchUpdateBlobsRequestRequest(
                    digest=re.Digest(hash=hashlib.sha256(b).hexdigest(), size_bytes=len(b)),
                    data=b,
                )
                for b in (big, small)
            ]
        ),
    )
    codes = [r.status.code if r.status else 0 for r in resp.responses]
    assert codes == [Status.RESOURCE_EXHAUSTED.value, 0]
    assert "11 bytes" in resp.responses[0].status.message


async def test_open_uploads_are_capped(aio_loop, tmp_path, nursery):
    daemon = await start_daemon(nursery, make_config(tmp_path / "data", max_open_uploads=2))
    channel = await open_channel(daemon.port)
    try:
        stub = bs.ByteStreamStub(channel)
        blobs = [bytes([i]) * 3000 for i in range(3)]
        names = [upload_name(b) for b in blobs]
        for name, data in zip(names[:2], blobs[:2], strict=True):
            # A stream that ends without finish_write leaves its upload open for resumption.
            with pytest.raises(GRPCError) as e:
                await call(stub.write, chunks(name, data, size=1000, finish=False)[:1])
            assert e.value.status is Status.INVALID_ARGUMENT
        with pytest.raises(GRPCError) as e:
            await call(stub.write, chunks(names[2], blobs[2], size=1000))
        assert e.value.status is Status.RESOURCE_EXHAUSTED
        assert "max_open_uploads 2" in e.value.message
        # Open uploads can still be resumed and finished, which frees a place.
        rest = chunks(names[0], blobs[0][1000:], size=1000, start=1000)
        rest[0].resource_name = names[0]
        assert (await call(stub.write, rest)).committed_size == 3000
        resp = await call(stub.write, chunks(names[2], blobs[2], size=1000))
        assert resp.committed_size == 3000
    finally:
        channel.close()


async def test_zstd_bomb_is_bounded_by_the_declared_size(stub):
    declared = b"\0" * 1000
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    assert len(bomb) < 4096
    name = upload_name(declared, compressed=True)
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(name, bomb, size=1000))
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "decompresses to more than the declared 1000 bytes" in e.value.message
    # The upload is gone, not resumable.
    with pytest.raises(GRPCError) as e:
        await call(stub.query_write_status, bs.QueryWriteStatusRequest(resource_name=name))
    assert e.value.status is Status.NOT_FOUND


def test_bounded_zstd_streams_within_the_limit():
    data = bytes(range(256)) * 10_000
    frame = zstandard.compress(data)
    z = BoundedZstd(len(data))
    out = b"".join(z.decompress(frame[i : i + 100]) for i in range(0, len(frame), 100))
    assert out == data
    with pytest.raises(InvalidArgument, match="more than the declared"):
        BoundedZstd(len(data) - 1).decompress(frame)
    with pytest.raises(InvalidArgument, match="invalid zstd data"):
        BoundedZstd(100).decompress(b"not zstd at all")


async def test_zstd_upload_of_the_exact_size_still_succeeds(stub):
    data = b"0123456789" * 300_000
    name = upload_name(data, compressed=True)
    resp = await call(stub.write, chunks(name, zstandard.compress(data), size=500))
    assert resp.committed_size > 0
    assert await read_all(stub, f"blobs/{digest_path(data)}") == data


async def test_zstd_upload_of_endless_skippable_frames_is_refused(stub):
    import struct

    declared = b"q" * 1000
    # A skippable frame: magic 0x184D2A50, a length, then that many ignored bytes.
    skippable = struct.pack("<II", 0x184D2A50, 4096) + bytes(4096)
    stream = skippable * 40  # ~160 KiB that decompress to nothing
    name = upload_name(declared, compressed=True)
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(name, stream, size=8192, finish=False))
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "more than any encoding of 1000 bytes needs" in e.value.message


# -- storage failures ---------------------------------------------------------------------------


async def test_batch_entry_storage_failure_is_a_per_blob_status(daemon, channel, monkeypatch):
    import errno

    async def full(digest, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(daemon.cas, "put_bytes", full)
    cas = re.ContentAddressableStorageStub(channel)
    b = b"will not fit"
    resp = await call(
        cas.batch_update_blobs,
        re.BatchUpdateBlobsRequest(
            requests=[
                re.BatchUpdateBlobsRequestRequest(
                    digest=re.Digest(hash=hashlib.sha256(b).hexdigest(), size_bytes=len(b)),
                    data=b,
                )
            ]
        ),
    )
    (r,) = resp.responses
    assert r.status.code == Status.RESOURCE_EXHAUSTED.value
    assert "storage is full" in r.status.message


async def test_write_that_meets_a_full_disk_is_not_kept_for_resumption(daemon, stub, monkeypatch):
    import errno

    real_open = daemon.cas.open_write

    async def open_write(digest):
        writer = await real_open(digest)

        async def write(data):
            raise OSError(errno.ENOSPC, "No space left on device")

        writer.write = write
        return writer

    monkeypatch.setattr(daemon.cas, "open_write", open_write)
    data = b"w" * 5000
    name = upload_name(data)
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(name, data, size=1000, finish=False)[:2])
    assert e.value.status is Status.RESOURCE_EXHAUSTED
    # Its partial data is gone at once, not kept (filling the disk) for upload_idle_timeout_s.
    with pytest.raises(GRPCError) as e:
        await call(stub.query_write_status, bs.QueryWriteStatusRequest(resource_name=name))
    assert e.value.status is Status.NOT_FOUND
