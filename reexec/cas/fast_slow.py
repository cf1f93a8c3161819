"""FastSlowStore: reads try `fast` first and fill it from `slow`; writes go to both.

The slow store is the source of truth: its `max_blob_bytes` is the limit, and a blob the fast
store refuses (too large for it) is simply not cached there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager, contextmanager

import trio

from reexec.cas.digest import Digest
from reexec.cas.store import READ_CHUNK, BlobNotFound, BlobReader, BlobWriter, Store
from reexec.errors import ResourceExhausted

# How long a cancelled read may spend finishing its copy into the fast store.
TEE_FINISH_TIMEOUT_S = 30.0


class FastSlowStore(Store):
    def __init__(self, fast: Store, slow: Store) -> None:
        self.fast = fast
        self.slow = slow

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        not_fast = await self.fast.find_missing(digests)
        if not not_fast:
            return []
        return await self.slow.find_missing(not_fast)

    async def _open_fast(
        self, stack: AsyncExitStack, digest: Digest, offset: int
    ) -> BlobReader | None:
        """A reader from the fast store, or None on a miss.

        Only *opening* is guarded: a BlobNotFound raised later by the caller's own code inside
        `async with open_read(...)` must propagate, not be taken for a fast-store miss.
        """
        try:
            return await stack.enter_async_context(self.fast.open_read(digest, offset))
        except BlobNotFound:
            return None

    @asynccontextmanager
    async def open_read(self, digest: Digest, offset: int = 0) -> AsyncIterator[BlobReader]:
        async with AsyncExitStack() as stack:
            reader = await self._open_fast(stack, digest, offset)
            if reader is not None:
                yield reader
                return
        if offset:
            # A partial read cannot fill the fast store; fetch the whole blob first.
            await self._fill(digest)
            async with AsyncExitStack() as stack:
                reader = await self._open_fast(stack, digest, offset)
                if reader is not None:
                    yield reader
                    return
            # The fast store could not keep it (e.g. larger than its max_bytes): read slow.
            async with self.slow.open_read(digest, offset) as reader:
                yield reader
            return
        async with self.slow.open_read(digest) as slow_reader:
            writer = await self._fast_writer(digest)
            if writer is None:
                yield slow_reader
                return
            tee = _TeeReader(slow_reader, writer)
            try:
                yield tee
            finally:
                # Bounded: a stuck fast store must not keep a cancelled reader alive forever;
                # an unfinished tee leaves the blob absent from the fast store, nothing worse.
                with trio.move_on_after(TEE_FINISH_TIMEOUT_S, shield=True):
                    await tee.finish()

    async def _fast_writer(self, digest: Digest) -> BlobWriter | None:
        """A writer into the fast store, or None if it refuses the blob (too large for it)."""
        try:
            return await self.fast.open_write(digest)
        except ResourceExhausted:
            return None

    async def _fill(self, digest: Digest) -> None:
        async with self.slow.open_read(digest) as reader:
            writer = await self._fast_writer(digest)
            if writer is None:
                return
            try:
                while chunk := await reader.read(READ_CHUNK):
                    await writer.write(chunk)
                await writer.commit()
            except BaseException:
                await writer.abort()
                raise

    async def get_bytes(self, digest: Digest) -> bytes:
        try:
            return await self.fast.get_bytes(digest)
        except BlobNotFound:
            data = await self.slow.get_bytes(digest)
            try:
                await self.fast.put_bytes(digest, data)
            except ResourceExhausted:
                pass
            return data

    async def open_write(self, digest: Digest) -> BlobWriter:
        slow = await self.slow.open_write(digest)
        try:
            fast = await self._fast_writer(digest)
        except BaseException:
            await slow.abort()
            raise
        return slow if fast is None else _BothWriter(digest, fast, slow)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        # Slow first, like _BothWriter.commit: the fast store never holds a blob the slow one
        # refused. (Concurrently, a fast store without checkpoints would store it regardless,
        # and errors would surface wrapped in an ExceptionGroup instead of their own status.)
        await self.slow.put_bytes(digest, data)
        try:
            await self.fast.put_bytes(digest, data)
        except ResourceExhausted:
            pass

    def max_blob_bytes(self) -> int | None:
        return self.slow.max_blob_bytes()

    async def local_files(self, digests: Sequence[Digest]) -> dict[Digest, str]:
        found = await self.fast.local_files(digests)
        rest = [d for d in digests if d not in found]
        return found | (await self.slow.local_files(rest) if rest else {})

    async def adopt_file(self, digest: Digest, path: str) -> bool:
        """The slow store first (the source of truth); the fast one only caches it if it can."""
        if not await self.slow.adopt_file(digest, path):
            return False
        try:
            await self.fast.adopt_file(digest, path)
        except ResourceExhausted:
            pass
        return True

    async def discard_if_same_file(self, digest: Digest, st_dev: int, st_ino: int) -> bool:
        fast = await self.fast.discard_if_same_file(digest, st_dev, st_ino)
        slow = await self.slow.discard_if_same_file(digest, st_dev, st_ino)
        return fast or slow

    @contextmanager
    def _hold_both(self, digests: Sequence[Digest]) -> Iterator[None]:
        with self.fast.hold(digests), self.slow.hold(digests):
            yield

    def hold(self, digests: Sequence[Digest]) -> AbstractContextManager[None]:
        return self._hold_both(digests)

    async def aclose(self) -> None:
        await self.fast.aclose()
        await self.slow.aclose()

    def stats(self) -> dict[str, int]:
        return {f"fast_{k}": v for k, v in self.fast.stats().items()} | {
            f"slow_{k}": v for k, v in self.slow.stats().items()
        }


class _TeeReader:
    """Reads from the slow store and copies what it reads into the fast store."""

    def __init__(self, reader: BlobReader, writer: BlobWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.size = reader.size
        self._copied = 0
        self._failed = False

    async def read(self, n: int = READ_CHUNK) -> bytes:
        chunk = await self._reader.read(n)
        if chunk and not self._failed:
            try:
                await self._writer.write(chunk)
                self._copied += len(chunk)
            except Exception:
                self._failed = True
        return chunk

    async def finish(self) -> None:
        # Complete once every byte was copied, whether or not the caller went on to read the
        # final b"" (ByteStream.Read stops as soon as it has sent `size` bytes).
        if self._copied == self.size and not self._failed:
            try:
                await self._writer.commit()
                return
            except Exception:
                pass
        await self._writer.abort()


class _BothWriter:
    def __init__(self, digest: Digest, fast: BlobWriter, slow: BlobWriter) -> None:
        self.digest = digest
        self._fast = fast
        self._slow = slow

    @property
    def committed_size(self) -> int:
        return self._slow.committed_size

    async def write(self, data: bytes) -> None:
        await self._slow.write(data)
        await self._fast.write(data)

    async def commit(self) -> None:
        # The slow store is the source of truth: commit it first so the fast store never holds
        # a blob the slow one refused.
        await self._slow.commit()
        try:
            await self._fast.commit()
        except Exception:
            await self._fast.abort()

    async def abort(self) -> None:
        await self._slow.abort()
        await self._fast.abort()
