"""Store limits and capabilities (issue 9 items 4, 5, 8, 10; issue 8 item 3).

- no blob larger than `max_blob_bytes` (a fraction of capacity) is accepted;
- open writers reserve their size against capacity; a reservation that cannot fit is refused;
- blobs held by an in-flight action are never evicted, even ones written while held;
- files adopted from a worker are hashed before they become blobs;
- the local-file capabilities are answered through decorators (no isinstance in callers);
- with fsync the directory is synced after the rename.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from reexec.cas import config as c
from reexec.cas.digest import digest_of
from reexec.cas.factory import build_store
from reexec.cas.fast_slow import FastSlowStore
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.memory import MemoryStore
from reexec.cas.store import Store, blob_limit
from reexec.cas.verify import VerifyingStore
from reexec.errors import InvalidArgument, ResourceExhausted
from tests.cas.store_contract import blob, write_chunked


async def fs_store(root: Path, max_bytes: int = 0, **kw: object) -> FilesystemStore:
    store = FilesystemStore(root, max_bytes, **kw)  # type: ignore[arg-type]
    await store.start()
    return store


def test_blob_limit() -> None:
    assert blob_limit(1000, 0.1) == 100
    assert blob_limit(0, 0.1) is None


async def test_factory_applies_the_default_fraction(tmp_path: Path) -> None:
    store = await build_store(c.VerifyStoreConfig(inner=c.FilesystemStoreConfig()), tmp_path)
    assert store.max_blob_bytes() == (10 << 30) // 10
    mem = await build_store(c.MemoryStoreConfig(max_bytes="1000", max_blob_fraction=0.5), tmp_path)
    assert mem.max_blob_bytes() == 500
    both = await build_store(
        c.FastSlowStoreConfig(
            fast=c.MemoryStoreConfig(max_bytes="100"),
            slow=c.FilesystemStoreConfig(max_bytes="1000", max_blob_fraction=1.0),
        ),
        tmp_path,
    )
    assert both.max_blob_bytes() == 1000  # the slow store is the source of truth


@pytest.mark.parametrize("kind", ["memory", "filesystem"])
async def test_oversized_blobs_are_refused_and_nothing_is_evicted(
    tmp_path: Path, kind: str
) -> None:
    store: Store = (
        MemoryStore(1000, max_blob_bytes=100)
        if kind == "memory"
        else await fs_store(tmp_path / "cas", 1000, max_blob_bytes=100)
    )
    small = [digest_of(blob(90, i)) for i in range(5)]
    for i, d in enumerate(small):
        await store.put_bytes(d, blob(90, i))
    big = blob(101)
    with pytest.raises(ResourceExhausted, match="larger than the 100 bytes"):
        await store.put_bytes(digest_of(big), big)
    with pytest.raises(ResourceExhausted):
        await store.open_write(digest_of(big))
    assert await store.find_missing(small) == []
    assert store.stats()["reserved_bytes"] == 0


@pytest.mark.parametrize("kind", ["memory", "filesystem"])
async def test_open_writers_reserve_capacity(tmp_path: Path, kind: str) -> None:
    store: Store = MemoryStore(300) if kind == "memory" else await fs_store(tmp_path / "cas", 300)
    old = [digest_of(blob(100, i)) for i in range(3)]
    for i, d in enumerate(old):
        await store.put_bytes(d, blob(100, i))
    # A partial upload makes room up front: the oldest blob goes when the writer opens.
    w1 = await store.open_write(digest_of(blob(100, 10)))
    assert await store.find_missing(old) == [old[0]]
    w2 = await store.open_write(digest_of(blob(100, 11)))
    w3 = await store.open_write(digest_of(blob(100, 12)))
    assert store.stats()["reserved_bytes"] == 300
    # Partial uploads already fill the store: another cannot be satisfied now.
    with pytest.raises(ResourceExhausted, match="uploads in progress"):
        await store.open_write(digest_of(blob(1, 13)))
    await w1.write(blob(100, 10))
    await w1.commit()
    await w2.abort()
    await w3.abort()
    await w3.abort()  # released once only
    assert store.stats()["reserved_bytes"] == 0
    assert store.stats()["bytes"] <= 300
    # A failed commit (short data) releases too, once the caller aborts.
    w4 = await store.open_write(digest_of(blob(100, 14)))
    await w4.write(blob(50, 14))
    with pytest.raises(InvalidArgument):
        await w4.commit()
    await w4.abort()
    assert store.stats()["reserved_bytes"] == 0


@pytest.mark.parametrize("kind", ["memory", "filesystem", "verify", "fast_slow"])
async def test_held_blobs_survive_later_writes(tmp_path: Path, kind: str) -> None:
    """One action's outputs must not evict each other (nor other held blobs)."""
    if kind == "memory":
        store: Store = MemoryStore(300)
    elif kind == "filesystem":
        store = await fs_store(tmp_path / "cas", 300)
    elif kind == "verify":
        store = VerifyingStore(await fs_store(tmp_path / "cas", 300))
    else:
        store = FastSlowStore(MemoryStore(300), await fs_store(tmp_path / "cas", 300))
    stdout = digest_of(blob(100, 0))
    outputs = [digest_of(blob(100, i)) for i in range(1, 5)]
    with store.hold([stdout, outputs[0]]):
        await store.put_bytes(stdout, blob(100, 0))  # written while held: pinned as it lands
        for i, d in enumerate(outputs, 1):
            await write_chunked(store, d, blob(100, i))
        assert await store.find_missing([stdout, outputs[0]]) == []
    # Released: ordinary LRU again.
    for i in range(7, 10):
        await store.put_bytes(digest_of(blob(100, i)), blob(100, i))
    assert await store.find_missing([stdout]) == [stdout]


async def test_adopt_file_hashes_before_storing(tmp_path: Path) -> None:
    fs = await fs_store(tmp_path / "cas")
    src = tmp_path / "out"
    src.write_bytes(b"output bytes")
    os.chmod(src, 0o444)
    wrong = digest_of(b"output BYTES")  # same size, other content
    for store in (fs, VerifyingStore(fs), FastSlowStore(MemoryStore(0), fs)):
        with pytest.raises(InvalidArgument, match="does not hold"):
            await store.adopt_file(wrong, str(src))
        assert await fs.find_missing([wrong]) == [wrong]
        assert list((tmp_path / "cas" / "tmp").iterdir()) == []
    d = digest_of(b"output bytes")
    assert await VerifyingStore(fs).adopt_file(d, str(src))
    assert os.stat(fs.blob_path(d)).st_ino == os.stat(src).st_ino  # linked, not copied
    assert stat.S_IMODE(os.stat(src).st_mode) == 0o444


async def test_adopt_file_respects_the_blob_limit(tmp_path: Path) -> None:
    fs = await fs_store(tmp_path / "cas", 1000, max_blob_bytes=10)
    src = tmp_path / "out"
    src.write_bytes(b"more than ten bytes")
    with pytest.raises(ResourceExhausted):
        await fs.adopt_file(digest_of(src.read_bytes()), str(src))


async def test_capabilities_through_decorators(tmp_path: Path) -> None:
    fs = await fs_store(tmp_path / "cas")
    mem = MemoryStore(0)
    d = digest_of(b"blob")
    await fs.put_bytes(d, b"blob")
    await mem.put_bytes(d, b"blob")
    absent = digest_of(b"absent")
    for store in (fs, VerifyingStore(fs), FastSlowStore(mem, fs), FastSlowStore(fs, mem)):
        assert await store.local_files([d, absent]) == {d: str(fs.blob_path(d))}
    # A store without files says so: nothing to link, nothing adopted.
    src = tmp_path / "f"
    src.write_bytes(b"blob")
    for store in (mem, VerifyingStore(mem)):
        assert await store.local_files([d]) == {}
        assert not await store.adopt_file(d, str(src))
        assert not await store.discard_if_same_file(d, 0, 0)
    st = os.stat(fs.blob_path(d))
    assert await VerifyingStore(fs).discard_if_same_file(d, st.st_dev, st.st_ino)
    assert await fs.find_missing([d]) == [d]


async def test_fast_store_refusing_a_large_blob_is_not_an_error(tmp_path: Path) -> None:
    slow = await fs_store(tmp_path / "cas")
    store = FastSlowStore(MemoryStore(1000, max_blob_bytes=10), slow)
    data = blob(500)
    d = digest_of(data)
    await write_chunked(store, d, data)
    await store.put_bytes(digest_of(blob(400)), blob(400))
    assert await store.get_bytes(d) == data
    async with store.open_read(d) as reader:
        assert await reader.read(1000) == data


async def test_fsync_syncs_the_directory_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await fs_store(tmp_path / "cas", fsync=True)
    synced: list[bool] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    data = blob(100)
    await store.put_bytes(digest_of(data), data)
    assert synced == [False, True]  # the file, then its directory
    synced.clear()
    await write_chunked(store, digest_of(blob(70_000, 1)), blob(70_000, 1))
    assert synced == [False, True]
