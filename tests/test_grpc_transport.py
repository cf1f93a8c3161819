"""The server's HTTP/2 plumbing (reexec/daemon/grpc_server.py): coalesced writes and DATA frames
sent as memoryview slices, under flow control."""

from __future__ import annotations

import asyncio
import hashlib
import os

import trio

from reexec.daemon.grpc_server import _COALESCE_MAX_BYTES, _CoalescingTransport
from reexec.gen.google import bytestream as bs
from tests.conftest import call, collect


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_writes_of_one_turn_leave_together_and_in_order() -> None:
    async def scenario() -> list[list[bytes]]:
        inner = RecordingTransport()
        t = _CoalescingTransport(inner)  # type: ignore[arg-type]
        seen: list[list[bytes]] = []
        t.write(b"headers")
        t.write(b"")  # nothing to send: no write
        t.write(b"data")
        t.write(b"trailers")
        seen.append(list(inner.writes))  # nothing sent within the turn
        await asyncio.sleep(0)
        seen.append(list(inner.writes))  # one write at the end of it
        big = bytes(_COALESCE_MAX_BYTES)
        t.write(b"small")
        t.write(big)  # flushes what is buffered first, then goes straight through
        seen.append(list(inner.writes))
        t.write(b"after")
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)
        t.close()  # flushes before closing
        seen.append(list(inner.writes))
        t.write(b"too late")
        await asyncio.sleep(0)
        seen.append(list(inner.writes))  # a closing transport gets nothing more
        return seen

    seen = asyncio.run(scenario())
    big = bytes(_COALESCE_MAX_BYTES)
    assert seen[0] == []
    assert seen[1] == [b"headersdatatrailers"]
    assert seen[2] == [b"headersdatatrailers", b"small", big]
    assert seen[3] == [b"headersdatatrailers", b"small", big, b"after"]
    assert seen[4] == seen[3]


async def test_large_reads_side_by_side_on_one_connection(channel) -> None:
    """Two 9 MiB reads at once on one connection: each outgrows its 4 MiB stream window and
    both share the connection's, so the server's DATA frames wait for WINDOW_UPDATEs."""
    stub = bs.ByteStreamStub(channel)
    blobs = [os.urandom(9 * 1024 * 1024 + i) for i in range(2)]
    for data in blobs:
        h = hashlib.sha256(data).hexdigest()
        name = f"uploads/{h[:8]}-0000-0000-0000-000000000000/blobs/{h}/{len(data)}"
        step = 1 << 20
        requests = [
            bs.WriteRequest(
                resource_name=name if off == 0 else "",
                write_offset=off,
                data=data[off : off + step],
                finish_write=off + step >= len(data),
            )
            for off in range(0, len(data), step)
        ]
        assert (await call(stub.write, requests)).committed_size == len(data)

    got: dict[int, bytes] = {}

    async def read(i: int) -> None:
        h = hashlib.sha256(blobs[i]).hexdigest()
        request = bs.ReadRequest(resource_name=f"blobs/{h}/{len(blobs[i])}")
        parts = await collect(stub.read, request)
        assert all(len(p.data) <= 1 << 20 for p in parts)
        got[i] = b"".join(p.data for p in parts)

    async with trio.open_nursery() as nursery:
        for i in range(2):
            nursery.start_soon(read, i)
    assert got == {0: blobs[0], 1: blobs[1]}
