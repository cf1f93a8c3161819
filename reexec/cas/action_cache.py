"""Action cache stores: serialized ActionResults keyed by (instance name, action digest).

The CAS is shared by all instance names (content addressing makes that safe); the action cache
is per instance name, because the same action may legitimately have different results on
differently configured instances.
"""

from __future__ import annotations

import abc
import enum
import logging
import os
import uuid
from pathlib import Path
from typing import NamedTuple

import trio
import xxhash

from reexec.cas.digest import Digest, DigestFunction
from reexec.cas.lru import LruIndex

log = logging.getLogger(__name__)

# Entries up to this size (nearly all: an ActionResult is ~1 KiB) are read on the event loop;
# a trio.to_thread hop costs far more than the read.
INLINE_READ_LIMIT = 64 * 1024


class ActionKey(NamedTuple):
    instance: str
    digest: Digest


class NoWait(enum.Enum):
    """`ActionCache.get_nowait`'s answer when only the async `get` can tell."""

    WOULD_BLOCK = "would block"


WOULD_BLOCK = NoWait.WOULD_BLOCK


class ActionCache(abc.ABC):
    """Maps an action to its serialized ActionResult."""

    @abc.abstractmethod
    async def get(self, key: ActionKey) -> bytes | None:
        """The stored ActionResult bytes, or None on a miss."""

    def get_nowait(self, key: ActionKey) -> bytes | NoWait | None:
        """`get`'s answer if it can be given without waiting, else WOULD_BLOCK.

        The gRPC edge answers GetActionResult with it on grpclib's side, without crossing into
        Trio (see `Store.find_missing_nowait` for the rules such methods follow)."""
        return WOULD_BLOCK

    @abc.abstractmethod
    async def put(self, key: ActionKey, result: bytes) -> None: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources at shutdown."""

    def stats(self) -> dict[str, int]:
        return {}


class MemoryActionCache(ActionCache):
    def __init__(self, max_bytes: int) -> None:
        self._entries: dict[ActionKey, bytes] = {}
        self._lru: LruIndex[ActionKey] = LruIndex(max_bytes)

    async def get(self, key: ActionKey) -> bytes | None:
        return self._get(key)

    def get_nowait(self, key: ActionKey) -> bytes | NoWait | None:
        return self._get(key)

    def _get(self, key: ActionKey) -> bytes | None:
        result = self._entries.get(key)
        if result is not None:
            self._lru.touch(key)
        return result

    async def put(self, key: ActionKey, result: bytes) -> None:
        self._lru.remove(key)
        self._lru.add(key, len(result))
        self._entries[key] = result
        for victim in self._lru.take_evictions():
            del self._entries[victim]

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self._lru.total_bytes,
            "evictions": self._lru.evictions,
        }


def _instance_tag(instance: str) -> str:
    # File names cannot hold arbitrary instance names; a 128-bit xxh3 tag stands in for them.
    return xxhash.xxh3_128_hexdigest(instance.encode())


class FilesystemActionCache(ActionCache):
    """One file per entry: `{function}/{hash[:2]}/{hash}-{size}-{instance tag}`, atomic renames."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._lru: LruIndex[str] = LruIndex(max_bytes)
        self._mutate = trio.Lock()

    def _rel_path(self, key: ActionKey) -> str:
        d = key.digest
        return f"{d.function.name.lower()}/{d.hash[:2]}/{d.hash}-{d.size}-{_instance_tag(key.instance)}"

    async def start(self) -> None:
        found = await trio.to_thread.run_sync(self._scan)
        for _, rel, size in found:
            self._lru.add(rel, size)
        victims = self._lru.take_evictions()
        if victims:
            await trio.to_thread.run_sync(self._unlink_all, victims)
        log.info("filesystem action cache %s: %d entries", self.root, len(self._lru))

    def _scan(self) -> list[tuple[int, str, int]]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        for leftover in os.scandir(self._tmp):
            os.unlink(leftover.path)
        found: list[tuple[int, str, int]] = []
        for fn_entry in os.scandir(self.root):
            if fn_entry.name == "tmp" or fn_entry.name.upper() not in DigestFunction.__members__:
                continue
            for shard in os.scandir(fn_entry.path):
                for f in os.scandir(shard.path):
                    st = f.stat(follow_symlinks=False)
                    found.append(
                        (st.st_mtime_ns, f"{fn_entry.name}/{shard.name}/{f.name}", st.st_size)
                    )
        found.sort()
        return found

    async def get(self, key: ActionKey) -> bytes | None:
        data = self.get_nowait(key)
        if data is not WOULD_BLOCK:
            return data  # bytes, or None for a miss
        rel = self._rel_path(key)  # a large entry: read in a thread
        self._lru.touch(rel)
        data = await trio.to_thread.run_sync(self._read, rel)
        if data is None:
            self._lru.remove(rel)
        return data

    def get_nowait(self, key: ActionKey) -> bytes | NoWait | None:
        rel = self._rel_path(key)
        size = self._lru.size_of(rel)
        if size is None:
            return None
        if size > INLINE_READ_LIMIT:
            return WOULD_BLOCK
        self._lru.touch(rel)
        data = self._read(rel)
        if data is None:
            self._lru.remove(rel)
        return data

    def _read(self, rel: str) -> bytes | None:
        try:
            with open(self.root / rel, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    async def put(self, key: ActionKey, result: bytes) -> None:
        rel = self._rel_path(key)
        async with self._mutate:
            await trio.to_thread.run_sync(self._write, rel, result)
            self._lru.remove(rel)
            self._lru.add(rel, len(result))
            victims = self._lru.take_evictions()
            if victims:
                await trio.to_thread.run_sync(self._unlink_all, victims)

    def _write(self, rel: str, data: bytes) -> None:
        tmp = self._tmp / uuid.uuid4().hex
        with open(tmp, "wb") as f:
            f.write(data)
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)

    def _unlink_all(self, rels: list[str]) -> None:
        for rel in rels:
            try:
                os.unlink(self.root / rel)
            except FileNotFoundError:
                pass

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._lru),
            "bytes": self._lru.total_bytes,
            "evictions": self._lru.evictions,
        }
