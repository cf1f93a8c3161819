"""FilesystemStore: the Store contract, persistence, crash leftovers, eviction."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from reexec.cas.digest import Digest, DigestFunction, digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.store import BlobNotFound, Store
from tests.cas.store_contract import StoreContract, blob, read_all, write_chunked


async def open_store(root: Path, max_bytes: int = 0) -> FilesystemStore:
    store = FilesystemStore(root, max_bytes)
    await store.start()
    return store


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


class TestFilesystemStoreContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        return await open_store(tmp_path / "cas")

    async def inspect(self, store: Store, digest: Digest) -> bool:
        # Beyond the index: no file for the blob, and no temp file left behind.
        assert isinstance(store, FilesystemStore)
        assert list((store.root / "tmp").iterdir()) == []
        on_disk = store.blob_path(digest).exists()
        assert on_disk == await store.has(digest)
        return on_disk


def test_blob_path_layout(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path, 0)
    h = "3f" + "0" * 62
    assert store.blob_path(Digest(h, 12)) == tmp_path / "blobs" / "sha256" / "3f" / f"{h}-12"
    assert (
        store.blob_path(Digest(h, 0, DigestFunction.BLAKE3))
        == tmp_path / "blobs" / "blake3" / "3f" / f"{h}-0"
    )
    h1 = "a1" * 20
    assert store.blob_path(Digest(h1, 7, DigestFunction.SHA1)) == (
        tmp_path / "blobs" / "sha1" / "a1" / f"{h1}-7"
    )


async def test_files_are_read_only_and_where_blob_path_says(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    small, big = blob(10, 1), blob(1_500_000, 2)
    ds = [digest_of(small), digest_of(big, DigestFunction.BLAKE3)]
    await store.put_bytes(ds[0], small)
    await write_chunked(store, ds[1], big, chunk=100_000)
    for d, data in zip(ds, (small, big), strict=True):
        path = store.blob_path(d)
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert path.read_bytes() == data
    assert files_under(tmp_path / "blobs") == sorted(store.blob_path(d) for d in ds)
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_survives_restart(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    blobs = {
        digest_of(blob(100 + i, i), fn): blob(100 + i, i)
        for i, fn in enumerate(DigestFunction)
        if fn in (1, 2, 5, 6, 9)
    }
    for d, data in blobs.items():
        await store.put_bytes(d, data)
    again = await open_store(tmp_path)
    assert await again.find_missing(list(blobs)) == []
    for d, data in blobs.items():
        assert await again.get_bytes(d) == data
        assert await read_all(again, d, 7) == data[7:]
    assert again.stats()["blobs"] == len(blobs)
    assert again.stats()["bytes"] == sum(map(len, blobs.values()))


async def test_uncommitted_upload_is_cleaned_on_start(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    data = blob(2_000_000)
    d = digest_of(data)
    writer = await store.open_write(d)
    await writer.write(data[:1_500_000])  # flushed to a temp file, never committed ("crash")
    assert len(list((tmp_path / "tmp").iterdir())) == 1
    (tmp_path / "tmp" / "stray").write_bytes(b"partial")
    again = await open_store(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not await again.has(d)
    with pytest.raises(BlobNotFound):
        await again.get_bytes(d)
    await writer.abort()


async def test_truncated_and_foreign_files_are_removed_on_start(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    good, trunc = blob(100, 1), blob(100, 2)
    dg, dt = digest_of(good), digest_of(trunc)
    await store.put_bytes(dg, good)
    await store.put_bytes(dt, trunc)
    path = store.blob_path(dt)
    path.chmod(0o644)
    path.write_bytes(trunc[:60])  # e.g. damaged by something outside reexec
    shard = store.blob_path(dg).parent
    foreign = [
        shard / "README",
        shard / "notahash-3",  # right shape, not a hash
        shard / f"{'0' * 63}-3",  # wrong hash length
        shard / f"{'A' * 64}-3",  # upper case
        shard / f"{dg.hash}-03",  # non-canonical size
        shard / f"{'9' * 64}-3",  # a valid name in the wrong shard
    ]
    for f in foreign:
        f.write_bytes(b"abc")
    again = await open_store(tmp_path)
    assert not path.exists()
    assert [f for f in foreign if f.exists()] == []
    assert await again.find_missing([dg, dt]) == [dt]
    assert again.stats()["blobs"] == 1
    with pytest.raises(BlobNotFound):
        await again.get_bytes(dt)
    assert await again.get_bytes(dg) == good


async def test_index_is_rebuilt_from_names_without_reading_content(tmp_path: Path) -> None:
    """By design start() trusts a file whose name and size match; it never hashes content.

    Only reexec writes under blobs/ (after verifying, when a VerifyingStore is configured) and
    files are 0444, so checking content would only cost start-up time.
    """
    store = await open_store(tmp_path)
    data = blob(100)
    d = digest_of(data)
    await store.put_bytes(d, data)
    path = store.blob_path(d)
    path.chmod(0o644)
    path.write_bytes(b"x" * 100)  # same size, wrong content
    again = await open_store(tmp_path)
    assert await again.has(d)
    assert await again.get_bytes(d) == b"x" * 100


async def test_file_deleted_behind_our_back_is_forgotten(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    data = blob(100)
    d = digest_of(data)
    await store.put_bytes(d, data)
    store.blob_path(d).unlink()
    with pytest.raises(BlobNotFound):
        async with store.open_read(d):
            pass
    assert not await store.has(d)
    await store.put_bytes(d, data)
    store.blob_path(d).unlink()
    with pytest.raises(BlobNotFound):
        await store.get_bytes(d)
    assert not await store.has(d)


async def test_eviction_in_lru_order_removes_files(tmp_path: Path) -> None:
    store = await open_store(tmp_path, max_bytes=300)
    ds = [digest_of(blob(100, i)) for i in range(4)]
    for i, d in enumerate(ds[:3]):
        await store.put_bytes(d, blob(100, i))
    await store.find_missing([ds[0]])  # ds[1] is now the oldest
    await write_chunked(store, ds[3], blob(100, 3), chunk=30)
    assert await store.find_missing(ds) == [ds[1]]
    assert not store.blob_path(ds[1]).exists()
    assert files_under(tmp_path / "blobs") == sorted(store.blob_path(d) for d in ds if d != ds[1])
    assert store.stats() == {
        "blobs": 3,
        "bytes": 300,
        "max_bytes": 300,
        "reserved_bytes": 0,
        "evictions": 1,
        "forgotten": 0,
    }


async def test_blob_being_read_is_not_evicted(tmp_path: Path) -> None:
    store = await open_store(tmp_path, max_bytes=250)
    a, b, c = (digest_of(blob(100, i)) for i in range(3))
    await store.put_bytes(a, blob(100, 0))
    async with store.open_read(a, 10) as reader:
        await store.put_bytes(b, blob(100, 1))
        await store.put_bytes(c, blob(100, 2))  # a is the oldest but pinned: b goes
        assert await store.has(a)
        assert store.blob_path(a).exists()
        got = b""
        while chunk := await reader.read(7):
            got += chunk
    assert got == blob(100, 0)[10:]
    assert await store.find_missing([a, b, c]) == [b]
    assert not store.blob_path(b).exists()


async def test_restart_with_smaller_budget_evicts_oldest_by_mtime(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    ds = [digest_of(blob(100, i)) for i in range(4)]
    for i, d in enumerate(ds):
        await store.put_bytes(d, blob(100, i))
    # mtime order (oldest first): 2, 0, 3, 1 - not the write order.
    for age, i in enumerate((2, 0, 3, 1)):
        t = 1_700_000_000 + age * 10
        os.utime(store.blob_path(ds[i]), (t, t))
    again = await open_store(tmp_path, max_bytes=200)
    assert await again.find_missing(ds) == [ds[0], ds[2]]
    assert not store.blob_path(ds[2]).exists()


async def test_lru_order_after_restart_follows_mtime(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    ds = [digest_of(blob(100, i)) for i in range(3)]
    for i, d in enumerate(ds):
        await store.put_bytes(d, blob(100, i))
    for age, i in enumerate((1, 2, 0)):
        t = 1_700_000_000 + age * 10
        os.utime(store.blob_path(ds[i]), (t, t))
    again = await open_store(tmp_path, max_bytes=300)
    extra = digest_of(blob(100, 9))
    await again.put_bytes(extra, blob(100, 9))
    assert await again.find_missing([*ds, extra]) == [ds[1]]
    # Reading refreshes the file's mtime, so it survives the next restart's ordering.
    await again.get_bytes(ds[2])
    third = await open_store(tmp_path, max_bytes=200)
    assert await third.find_missing([*ds, extra]) == [ds[0], ds[1]]


async def test_concurrent_commit_and_eviction_keep_disk_and_index_in_step(
    tmp_path: Path,
) -> None:
    store = await open_store(tmp_path, max_bytes=1000)
    datas = [blob(100, i % 15) for i in range(60)]
    # Open writers reserve their size: at most 10 of 100 bytes fit in 1000 at once.
    limit = trio.CapacityLimiter(10)

    async def put(i: int) -> None:
        async with limit:
            await write_chunked(store, digest_of(datas[i]), datas[i], chunk=40)

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(put, i)
    listed = {d for d in map(digest_of, datas) if await store.has(d)}
    on_disk = set(files_under(tmp_path / "blobs"))
    assert on_disk == {store.blob_path(d) for d in listed}
    assert store.stats()["bytes"] == 100 * len(listed) <= 1000
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_unexpected_directories_do_not_break_start(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    data = blob(100)
    d = digest_of(data)
    await store.put_bytes(d, data)
    (store.blob_path(d).parent / f"{d.hash}-0").mkdir()  # a directory with a blob-like name
    (tmp_path / "tmp" / "somedir").mkdir()
    (tmp_path / "blobs" / "blake3").write_bytes(b"a file where a directory belongs")
    (tmp_path / "blobs" / "junk").mkdir()
    again = await open_store(tmp_path)
    assert again.stats()["blobs"] == 1
    assert await again.get_bytes(d) == data
    assert not await again.has(Digest(d.hash, 0))


async def test_commit_cancelled_while_waiting_for_the_lock_can_still_abort(
    tmp_path: Path,
) -> None:
    store = await open_store(tmp_path)
    data = blob(100)
    d = digest_of(data)
    writer = await store.open_write(d)
    await writer.write(data)
    release = trio.Event()

    async def hold_lock(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with store._mutate:  # e.g. another upload being installed
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(hold_lock)
        with trio.move_on_after(0.05) as scope:
            await writer.commit()
        release.set()
    assert scope.cancelled_caught
    await writer.abort()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not await store.has(d)
    assert not store.blob_path(d).exists()


async def test_small_blobs_are_read_and_written_without_a_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(tmp_path)
    hops: list[object] = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):  # type: ignore[no-untyped-def]
        hops.append(fn)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    small, large = blob(64 * 1024, 1), blob(64 * 1024 + 1, 2)
    ds, dl = digest_of(small), digest_of(large)
    await store.put_bytes(ds, small)
    assert await store.get_bytes(ds) == small
    assert hops == []
    await store.put_bytes(dl, large)
    assert await store.get_bytes(dl) == large
    assert len(hops) == 2
    # Same files, same modes, same index as the threaded path.
    for d, data in ((ds, small), (dl, large)):
        path = store.blob_path(d)
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.stats()["blobs"] == 2
    # A small blob whose file vanished: BlobNotFound, forgotten (and counted) inline.
    store.blob_path(ds).unlink()
    with pytest.raises(BlobNotFound):
        await store.get_bytes(ds)
    assert await store.find_missing([ds]) == [ds]
    assert store.stats()["forgotten"] == 1
    assert len(hops) == 2


async def test_a_short_write_never_installs_a_truncated_blob(tmp_path, monkeypatch):
    """A nearly full disk makes write(2) short before it fails with ENOSPC."""
    import errno as _errno

    from reexec.cas import filesystem

    store = FilesystemStore(tmp_path / "cas", 1 << 30)
    await store.start()
    real_write = os.write
    calls = {"n": 0}

    def short_then_full(fd: int, data) -> int:  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(_errno.ENOSPC, "No space left on device")

    data = b"x" * 8192
    digest = digest_of(data)
    monkeypatch.setattr(filesystem.os, "write", short_then_full)
    with pytest.raises(OSError) as e:
        await store.put_bytes(digest, data)
    assert e.value.errno == _errno.ENOSPC
    monkeypatch.setattr(filesystem.os, "write", real_write)
    assert await store.find_missing([digest]) == [digest]
    assert not store.blob_path(digest).exists()
    await store.put_bytes(digest, data)  # space is back
    assert await store.get_bytes(digest) == data


async def test_small_writes_go_to_a_thread_while_the_disk_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FilesystemStore(tmp_path / "cas", 1 << 20)
    await store.start()
    hops: list[object] = []
    real = trio.to_thread.run_sync

    async def counted(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    fast, slow = blob(100, 1), blob(100, 2)
    assert store.put_bytes_nowait(digest_of(fast), fast)  # cheap so far: on the loop
    store.write_cost.average_s = 1e-3  # as if the last writes took 1 ms each
    assert not store.put_bytes_nowait(digest_of(slow), slow)  # declined: nothing written
    assert await store.find_missing([digest_of(slow)]) == [digest_of(slow)]
    await store.put_bytes(digest_of(slow), slow)
    assert store._write_temp in hops and store._install in hops  # both off the loop
    assert await store.get_bytes(digest_of(slow)) == slow
