"""Behaviour every Store must have; test modules subclass `StoreContract` with a factory.

Not a test module itself (no `test_` prefix, class not named `Test*`), so pytest collects the
contract only through its subclasses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.lowlevel

from reexec.cas.digest import Digest, DigestFunction, digest_of, empty_digest
from reexec.cas.store import BlobNotFound, Store
from reexec.errors import InvalidArgument, OutOfRange

ALL_FUNCTIONS = [
    DigestFunction.SHA256,
    DigestFunction.SHA1,
    DigestFunction.SHA384,
    DigestFunction.SHA512,
    DigestFunction.BLAKE3,
]


def blob(n: int, seed: int = 0) -> bytes:
    """`n` deterministic, seed-dependent bytes."""
    pattern = bytes((seed * 31 + i * 7) % 251 for i in range(256))
    return (pattern * (n // 256 + 1))[:n]


async def read_all(store: Store, digest: Digest, offset: int = 0, chunk: int = 1000) -> bytes:
    parts: list[bytes] = []
    async with store.open_read(digest, offset) as reader:
        assert reader.size == digest.size
        while part := await reader.read(chunk):
            assert len(part) <= chunk
            parts.append(part)
    return b"".join(parts)


async def write_chunked(store: Store, digest: Digest, data: bytes, chunk: int = 777) -> None:
    writer = await store.open_write(digest)
    try:
        for i in range(0, len(data), chunk):
            await writer.write(data[i : i + chunk])
            assert writer.committed_size == min(i + chunk, len(data))
        await writer.commit()
    except BaseException:
        await writer.abort()
        raise


class StoreContract:
    """Subclasses implement `make`; every store in reexec.cas must pass these."""

    async def make(self, tmp_path: Path) -> Store:
        raise NotImplementedError

    async def inspect(self, store: Store, digest: Digest) -> bool:
        """Whether `digest` is present, asked of the store's innermost layers (for leaks)."""
        return await store.has(digest)

    # -- find_missing ---------------------------------------------------------------------------

    async def test_find_missing_order_duplicates_and_empty(self, tmp_path: Path) -> None:
        store = await self.make(tmp_path)
        a, b, c, d = (digest_of(blob(100 + i, i)) for i in range(4))
        await store.put_bytes(a, blob(100, 0))
        await store.put_bytes(c, blob(102, 2))
        empties = [empty_digest(f) for f in ALL_FUNCTIONS]
        query = [d, a, empties[0], b, d, c, b, *empties, d]
        assert await store.find_missing(query) == [d, b]
        assert await store.find_missing([]) == []
        assert await store.find_missing(empties) == []
        assert await store.has(a)
        assert not await store.has(b)

    @pytest.mark.parametrize("fn", ALL_FUNCTIONS)
    async def test_functions_never_collide(self, tmp_path: Path, fn: DigestFunction) -> None:
        store = await self.make(tmp_path)
        data = blob(64, 9)
        d = digest_of(data, fn)
        await store.put_bytes(d, data)
        assert await store.get_bytes(d) == data
        # The same hash and size under any other function is a different blob.
        others = [Digest(d.hash, d.size, g) for g in ALL_FUNCTIONS if g is not fn]
        assert await store.find_missing(others) == others

    # -- the synchronous fast paths ------------------------------------------------------------

    async def test_nowait_methods_answer_as_their_async_twins(self, tmp_path: Path) -> None:
        """Each `*_nowait` method may decline (None/False); when it answers, the answer (or
        error) is the async method's."""
        store = await self.make(tmp_path)
        stored = {digest_of(blob(n, n)): blob(n, n) for n in (10, 4000, 70_000)}
        for d, data in stored.items():
            await store.put_bytes(d, data)
        absent = digest_of(b"absent")
        query = [absent, *stored, empty_digest(DigestFunction.SHA256), absent]
        answer = store.find_missing_nowait(query)
        if answer is not None:
            assert answer == await store.find_missing(query) == [absent]
        for d, data in [*stored.items(), (empty_digest(DigestFunction.SHA256), b"")]:
            got = store.get_bytes_nowait(d)
            assert got is None or got == data
        try:
            got = store.get_bytes_nowait(absent)
        except BlobNotFound:
            pass
        else:
            assert got is None
        new = blob(300, 77)
        d = digest_of(new)
        with pytest.raises(InvalidArgument):
            if not store.put_bytes_nowait(d, new + b"x"):
                raise InvalidArgument("declined; the async put refuses it")
        assert not await self.inspect(store, d)
        if store.put_bytes_nowait(d, new):
            assert await store.get_bytes(d) == new
            assert store.put_bytes_nowait(d, new) in (True, False)  # again: harmless
            assert await store.find_missing([d]) == []

    # -- whole-blob put/get -----------------------------------------------------------------

    @pytest.mark.parametrize("fn", ALL_FUNCTIONS)
    async def test_put_get_round_trip(self, tmp_path: Path, fn: DigestFunction) -> None:
        store = await self.make(tmp_path)
        for n in (1, 5000, 70_000):
            data = blob(n, n)
            d = digest_of(data, fn)
            await store.put_bytes(d, data)
            assert await store.get_bytes(d) == data
            assert await read_all(store, d) == data
            # A second put of the same blob is harmless.
            await store.put_bytes(d, data)
            assert await store.get_bytes(d) == data

    @pytest.mark.parametrize("fn", ALL_FUNCTIONS)
    async def test_empty_blob_always_present(self, tmp_path: Path, fn: DigestFunction) -> None:
        store = await self.make(tmp_path)
        e = empty_digest(fn)
        assert await store.has(e)
        assert await store.get_bytes(e) == b""
        assert await read_all(store, e) == b""
        await store.put_bytes(e, b"")
        writer = await store.open_write(e)
        await writer.commit()
        assert await store.get_bytes(e) == b""
        with pytest.raises(OutOfRange):
            async with store.open_read(e, 1):
                pass

    async def test_put_wrong_length_stores_nothing(self, tmp_path: Path) -> None:
        store = await self.make(tmp_path)
        data = blob(50)
        d = digest_of(data)
        with pytest.raises(InvalidArgument, match=r"50|51|49"):
            await store.put_bytes(d, data + b"x")
        with pytest.raises(InvalidArgument):
            await store.put_bytes(d, data[:-1])
        assert not await self.inspect(store, d)

    async def test_not_found(self, tmp_path: Path) -> None:
        store = await self.make(tmp_path)
        d = digest_of(b"never stored")
        with pytest.raises(BlobNotFound) as e:
            await store.get_bytes(d)
        assert e.value.digest == d
        assert d.blob_path in e.value.message
        with pytest.raises(BlobNotFound):
            async with store.open_read(d):
                pass
        with pytest.raises(BlobNotFound):
            async with store.open_read(d, 3):
                pass

    # -- streaming writes ---------------------------------------------------------------------

    @pytest.mark.parametrize("fn", [DigestFunction.SHA256, DigestFunction.BLAKE3])
    async def test_streaming_write(self, tmp_path: Path, fn: DigestFunction) -> None:
        store = await self.make(tmp_path)
        data = blob(2_500_000, 3)  # crosses the filesystem store's 1 MiB write buffer
        d = digest_of(data, fn)
        writer = await store.open_write(d)
        assert writer.committed_size == 0
        for i in range(0, len(data), 300_000):
            await writer.write(data[i : i + 300_000])
            assert not await store.has(d), "visible before commit"
        assert writer.committed_size == len(data)
        await writer.commit()
        assert await store.has(d)
        assert await read_all(store, d, chunk=1 << 20) == data

    async def test_abort_stores_nothing(self, tmp_path: Path) -> None:
        store = await self.make(tmp_path)
        data = blob(3000)
        d = digest_of(data)
        writer = await store.open_write(d)
        await writer.write(data[:1000])
        await writer.abort()
        await writer.abort()  # idempotent
        assert not await self.inspect(store, d)
        # The digest can still be written afterwards.
        await write_chunked(store, d, data)
        assert await store.get_bytes(d) == data

    async def test_write_more_than_declared(self, tmp_path: Path) -> None:
        store = await self.make(tmp_path)
        data = blob(1000)
        d = digest_of(data)
        writer = await store.open_write(d)
        await writer.write(data[:600])
        with pytest.raises(InvalidArgument, match="1000"):
            await writer.write(data[600:] + b"extra")
        await writer.abort()
        assert not await self.inspect(store, d)

    async def test_commit_with_fewer_bytes(self, tmp_path: Path) -> None:
        store = await self.make(tmp_path)
        data = blob(1000)
        d = digest_of(data)
        writer = await store.open_write(d)
        await writer.write(data[:999])
        with pytest.raises(InvalidArgument, match="999"):
            await writer.commit()
        assert not await store.has(d)
        await writer.abort()
        assert not await self.inspect(store, d)

    async def test_concurrent_writers_of_same_blob(self, tmp_path: Path) -> None:
        store = await self.make(tmp_path)
        data = blob(40_000, 5)
        d = digest_of(data)

        async def upload(chunk: int) -> None:
            writer = await store.open_write(d)
            for i in range(0, len(data), chunk):
                await writer.write(data[i : i + chunk])
                await trio.lowlevel.checkpoint()
            await writer.commit()

        async with trio.open_nursery() as nursery:
            for chunk in (1000, 3000, 7000):
                nursery.start_soon(upload, chunk)
            nursery.start_soon(store.put_bytes, d, data)
        assert await store.get_bytes(d) == data
        assert await store.find_missing([d]) == []

    # -- reads ------------------------------------------------------------------------------

    async def test_open_read_offsets(self, tmp_path: Path) -> None:
        store = await self.make(tmp_path)
        data = blob(5000, 7)
        d = digest_of(data)
        await store.put_bytes(d, data)
        for offset in (0, 1, 999, 4999, 5000):
            assert await read_all(store, d, offset, chunk=700) == data[offset:]
        with pytest.raises(OutOfRange, match="past the end"):
            async with store.open_read(d, 5001):
                pass
        with pytest.raises(OutOfRange, match="negative"):
            async with store.open_read(d, -1):
                pass

    async def test_stats_are_ints(self, tmp_path: Path) -> None:
        store = await self.make(tmp_path)
        await store.put_bytes(digest_of(b"abc"), b"abc")
        assert all(isinstance(v, int) for v in store.stats().values())
