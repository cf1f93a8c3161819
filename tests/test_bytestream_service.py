"""ByteStream Read / Write / QueryWriteStatus against an in-process daemon."""

from __future__ import annotations

import hashlib
import os
import uuid

import blake3
import pytest
import trio
import trio_asyncio
import zstandard
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec import rpc
from reexec.gen.google import bytestream as bs
from tests.conftest import call, collect


def digest_path(data: bytes, fn: str = "") -> str:
    h = blake3.blake3(data).hexdigest() if fn == "blake3" else hashlib.sha256(data).hexdigest()
    return f"{fn + '/' if fn else ''}{h}/{len(data)}"


def upload_name(data: bytes, instance: str = "", fn: str = "", compressed: bool = False) -> str:
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    prefix = f"{instance}/" if instance else ""
    return f"{prefix}uploads/{uuid.uuid4()}/{kind}/{digest_path(data, fn)}"


def chunks(name: str, data: bytes, size: int = 1000, start: int = 0, finish: bool = True):
    out = []
    offset = start
    while True:
        piece = data[offset - start : offset - start + size]
        last = offset - start + size >= len(data)
        out.append(
            bs.WriteRequest(
                resource_name=name if offset == start else "",
                write_offset=offset,
                data=piece,
                finish_write=last and finish,
            )
        )
        offset += len(piece)
        if last:
            return out


@pytest.fixture
def stub(channel):
    return bs.ByteStreamStub(channel)


async def read_all(stub, name: str, offset: int = 0, limit: int = 0) -> bytes:
    parts = await collect(
        stub.read, bs.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
    )
    return b"".join(p.data for p in parts)


async def test_write_then_read_with_instance_prefix(stub):
    data = os.urandom(3 * 1024 * 1024 + 17)
    name = upload_name(data, instance="team/a")
    resp = await call(stub.write, chunks(name, data, size=64 * 1024))
    assert resp.committed_size == len(data)
    assert await read_all(stub, f"team/a/blobs/{digest_path(data)}") == data
    # The CAS is shared across instance names.
    assert await read_all(stub, f"blobs/{digest_path(data)}") == data


async def test_read_offset_and_limit(stub):
    data = bytes(range(256)) * 10
    await call(stub.write, chunks(upload_name(data), data))
    name = f"blobs/{digest_path(data)}"
    assert await read_all(stub, name, offset=100, limit=50) == data[100:150]
    assert await read_all(stub, name, offset=len(data)) == b""
    for offset, limit, status in [
        (-1, 0, Status.OUT_OF_RANGE),
        (len(data) + 1, 0, Status.OUT_OF_RANGE),
        (0, -5, Status.INVALID_ARGUMENT),
    ]:
        with pytest.raises(GRPCError) as e:
            await read_all(stub, name, offset=offset, limit=limit)
        assert e.value.status is status, (offset, limit)


async def test_read_missing_and_malformed(stub):
    with pytest.raises(GRPCError) as e:
        await read_all(stub, f"blobs/{digest_path(b'never stored')}")
    assert e.value.status is Status.NOT_FOUND
    for bad in ["blobs/abc", "nothing/here", f"blobs/{'a' * 64}/x", "uploads/u/blobs/" + "a" * 64]:
        with pytest.raises(GRPCError) as e:
            await read_all(stub, bad)
        assert e.value.status is Status.INVALID_ARGUMENT, bad
        assert "resource name" in e.value.message


async def test_empty_blob_always_readable(stub):
    assert await read_all(stub, f"blobs/{digest_path(b'')}") == b""


async def test_write_hash_mismatch_stores_nothing(stub):
    data = b"real data"
    name = f"uploads/{uuid.uuid4()}/blobs/{hashlib.sha256(b'other').hexdigest()}/{len(data)}"
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(name, data))
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "hash mismatch" in e.value.message
    with pytest.raises(GRPCError) as e:
        await read_all(stub, name.split("/", 2)[2])
    assert e.value.status is Status.NOT_FOUND


async def test_write_too_much_or_too_little(stub):
    data = b"0123456789"
    too_big = f"uploads/{uuid.uuid4()}/blobs/{hashlib.sha256(data).hexdigest()}/5"
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(too_big, data))
    assert e.value.status is Status.INVALID_ARGUMENT
    short = upload_name(data + b"more")
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(short, data))
    assert e.value.status is Status.INVALID_ARGUMENT


async def test_write_bad_offset(stub):
    data = b"x" * 3000
    name = upload_name(data)
    reqs = chunks(name, data)
    reqs[1].write_offset += 1
    with pytest.raises(GRPCError) as e:
        await call(stub.write, reqs)
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "write_offset" in e.value.message


async def test_write_of_existing_blob_completes_early(stub):
    data = os.urandom(5000)
    await call(stub.write, chunks(upload_name(data), data))
    # Only the first chunk is sent; the server already has the blob and answers at once.
    first = chunks(upload_name(data), data)[0]
    resp = await call(stub.write, [first])
    assert resp.committed_size == len(data)


async def test_resumable_write(stub, channel):
    data = os.urandom(200_000)
    name = upload_name(data)
    sent = chunks(name, data, size=50_000)

    async def broken_upload():
        async def gen():
            for r in sent[:2]:
                yield r
            await trio_asyncio.trio_as_aio(trio.sleep)(0.2)
            raise RuntimeError("client went away")

        await stub.write(gen())

    with pytest.raises(RuntimeError):
        await trio_asyncio.aio_as_trio(broken_upload)()

    status = None
    for _ in range(50):  # the server notices the reset asynchronously
        status = await call(stub.query_write_status, bs.QueryWriteStatusRequest(resource_name=name))
        if status.committed_size == 100_000:
            break
        await trio.sleep(0.02)
    assert status.committed_size == 100_000 and not status.complete
    rest = chunks(name, data[100_000:], size=50_000, start=100_000)
    rest[0].resource_name = name
    resp = await call(stub.write, rest)
    assert resp.committed_size == len(data)
    done = await call(stub.query_write_status, bs.QueryWriteStatusRequest(resource_name=name))
    assert done.complete and done.committed_size == len(data)
    assert await read_all(stub, f"blobs/{digest_path(data)}") == data


async def test_query_write_status_unknown_upload(stub):
    with pytest.raises(GRPCError) as e:
        await call(
            stub.query_write_status,
            bs.QueryWriteStatusRequest(resource_name=upload_name(b"never started")),
        )
    assert e.value.status is Status.NOT_FOUND


async def test_zstd_write_and_read(stub):
    data = b"abcdefgh" * 200_000 + os.urandom(1000)
    compressed = zstandard.ZstdCompressor().compress(data)
    name = upload_name(data, compressed=True)
    resp = await call(stub.write, chunks(name, compressed, size=10_000))
    assert resp.committed_size == len(compressed)
    # A second compressed upload of the same blob completes early with -1.
    again = await call(stub.write, chunks(upload_name(data, compressed=True), compressed)[:1])
    assert again.committed_size == -1
    plain = await read_all(stub, f"blobs/{digest_path(data)}")
    assert plain == data
    # Compressed read from an offset: offsets count uncompressed bytes.
    parts = await collect(
        stub.read,
        bs.ReadRequest(
            resource_name=f"compressed-blobs/zstd/{digest_path(data)}", read_offset=1000
        ),
    )
    out = zstandard.ZstdDecompressor().decompressobj().decompress(b"".join(p.data for p in parts))
    assert out == data[1000:]
    with pytest.raises(GRPCError) as e:
        await read_all(stub, f"compressed-blobs/zstd/{digest_path(data)}", limit=10)
    assert e.value.status is Status.INVALID_ARGUMENT


async def test_blake3_resource_names(stub):
    data = b"blake3 content"
    await call(stub.write, chunks(upload_name(data, fn="blake3"), data))
    assert await read_all(stub, f"blobs/{digest_path(data, 'blake3')}") == data
    # Same hash without the function segment means SHA256: a different blob.
    with pytest.raises(GRPCError) as e:
        await read_all(stub, f"blobs/{blake3.blake3(data).hexdigest()}/{len(data)}")
    assert e.value.status is Status.NOT_FOUND


async def test_unsupported_compressor(stub):
    with pytest.raises(GRPCError) as e:
        await read_all(stub, f"compressed-blobs/deflate/{digest_path(b'x')}")
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "deflate" in e.value.message


def bytestream_service(daemon):
    from reexec.cas.bytestream_service import ByteStreamService

    return next(s for s in daemon.services if isinstance(s, ByteStreamService))


def spy(monkeypatch, obj, name: str) -> list[tuple]:
    calls: list[tuple] = []
    real = getattr(obj, name)

    def wrapper(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


async def test_write_messages_cross_into_trio_in_batches(daemon, stub, monkeypatch):
    from reexec.cas import bytestream_service as bss

    batches = spy(monkeypatch, bss, "recv_batch")
    data = os.urandom(3 * 1024 * 1024 + 5)
    name = upload_name(data)
    resp = await call(stub.write, chunks(name, data, size=16 * 1024))
    assert resp.committed_size == len(data)
    # The first message alone (received by the handler itself), then ~1 MiB per crossing
    # instead of one per 16 KiB message.
    assert len(batches) == 3
    assert await read_all(stub, f"blobs/{digest_path(data)}") == data


async def test_bad_offset_inside_a_batch_keeps_the_valid_prefix(daemon, stub):
    data = os.urandom(10_000)
    name = upload_name(data)
    reqs = chunks(name, data)
    reqs[4].write_offset += 1  # all ten messages arrive in one batch
    with pytest.raises(GRPCError) as e:
        await call(stub.write, reqs)
    assert e.value.status is Status.INVALID_ARGUMENT
    assert e.value.message == (
        f"write_offset {reqs[4].write_offset} does not match the 4000 bytes committed for {name}"
    )
    # As with one message at a time: the four good messages were kept, the upload resumes.
    status = await call(stub.query_write_status, bs.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == 4000 and not status.complete
    rest = chunks(name, data[4000:], start=4000)
    rest[0].resource_name = name
    assert (await call(stub.write, rest)).committed_size == len(data)
    assert await read_all(stub, f"blobs/{digest_path(data)}") == data
    # A stream that ends without finish_write: same message, with the bytes kept.
    data2 = os.urandom(3000)
    name2 = upload_name(data2)
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(name2, data2, finish=False))
    assert e.value.message == f"Write stream for {name2} ended without finish_write at 3000 bytes"


async def test_one_message_write_goes_through_put_bytes(daemon, stub, monkeypatch):
    # The Trio path (tests/test_fast_paths.py covers the fast one that normally serves these).
    monkeypatch.setattr(rpc, "FAST_PATHS", False)
    service = bytestream_service(daemon)
    puts = spy(monkeypatch, service.cas, "put_bytes")
    opens = spy(monkeypatch, service.cas, "open_write")
    data = os.urandom(4096)
    name = upload_name(data)
    resp = await call(stub.write, chunks(name, data, size=len(data)))
    assert resp.committed_size == len(data)
    assert len(puts) == 1 and opens == [] and service.uploads.uploads == {}
    assert await read_all(stub, f"blobs/{digest_path(data)}") == data
    # Same statuses as the streaming path: a wrong hash is refused and nothing is stored.
    bad = f"uploads/{uuid.uuid4()}/blobs/{hashlib.sha256(b'other').hexdigest()}/{len(data)}"
    with pytest.raises(GRPCError) as e:
        await call(stub.write, chunks(bad, data, size=len(data)))
    assert e.value.status is Status.INVALID_ARGUMENT and "hash mismatch" in e.value.message
    # Several messages, or a compressed one, take the streaming path.
    data2 = os.urandom(4096)
    await call(stub.write, chunks(upload_name(data2), data2, size=1024))
    compressed = zstandard.ZstdCompressor().compress(data2 + b"z")
    await call(stub.write, chunks(upload_name(data2 + b"z", compressed=True), compressed, 10**6))
    assert len(puts) == 2 and len(opens) == 2


async def test_small_read_is_one_get_bytes_and_one_response(daemon, stub, monkeypatch):
    monkeypatch.setattr(rpc, "FAST_PATHS", False)  # the Trio path, as above
    service = bytestream_service(daemon)
    data = os.urandom(5000)
    await call(stub.write, chunks(upload_name(data), data))
    gets = spy(monkeypatch, service.cas, "get_bytes")
    opens = spy(monkeypatch, service.cas, "open_read")
    name = f"blobs/{digest_path(data)}"
    parts = await collect(stub.read, bs.ReadRequest(resource_name=name))
    assert [p.data for p in parts] == [data]
    assert len(gets) == 1 and opens == []
    # With an offset or limit, or past one chunk, the streaming path, with the same bytes.
    assert await read_all(stub, name, offset=10, limit=100) == data[10:110]
    monkeypatch.setattr(service, "read_chunk", 2000)
    parts = await collect(stub.read, bs.ReadRequest(resource_name=name))
    assert [len(p.data) for p in parts] == [2000, 2000, 1000]
    assert b"".join(p.data for p in parts) == data
    assert len(gets) == 1 and len(opens) == 2
    with pytest.raises(GRPCError) as e:
        await read_all(stub, f"blobs/{digest_path(b'not there')}")
    assert e.value.status is Status.NOT_FOUND


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 1 << 20, (1 << 21) + 3])
def test_read_response_wire_is_the_protobuf_encoding(size: int) -> None:
    from reexec import fastpb
    from reexec.cas.bytestream_service import ReadResponseWire

    data = os.urandom(size)
    wire = ReadResponseWire(data).SerializeToString()
    assert wire == fastpb.ReadResponse(data=data).SerializeToString()
    assert fastpb.ReadResponse.FromString(wire).data == data
