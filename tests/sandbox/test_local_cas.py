"""The worker's local CAS cache (LocalCas) and the in-process CAS access (LocalStoreAccess)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from reexec.cas.digest import Digest, digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.memory import MemoryStore
from reexec.cas.store import BlobNotFound
from reexec.cas.verify import VerifyingStore
from reexec.errors import Internal
from reexec.sandbox.cas_access import LocalStoreAccess
from reexec.sandbox.local_cas import Entry, LocalCas, MissingInputs
from tests.sandbox.fakes import FakeAccess, append, inode, overwrite


async def open_cache(root: Path, access, max_bytes: int = 0) -> LocalCas:  # type: ignore[no-untyped-def]
    cache = LocalCas(root, max_bytes, access)
    await cache.start()
    return cache


def mode_of(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def entries_on_disk(cache: LocalCas) -> list[str]:
    return sorted(p.name for p in cache.index.files.rglob("*") if p.is_file())


@pytest.fixture(params=[False, True], ids=["one-by-one", "batched"])
def batched(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


# -- fetching ---------------------------------------------------------------------------------


async def test_concurrent_ensure_fetches_each_blob_once(tmp_path: Path, batched: bool) -> None:
    access = FakeAccess(delay=0.05, prefers_batches=batched)
    blobs = [access.put(f"blob {i}".encode()) for i in range(4)]
    entries = [Entry(d, False) for d in blobs]
    cache = await open_cache(tmp_path / "cache", access)
    finished = []

    async def want(es: list[Entry]) -> None:
        await cache.ensure(es)
        # Whatever call did the fetch, every entry is there when ensure returns.
        for e in es:
            assert cache.path(e).read_bytes() == access.blobs[e.digest]
        finished.append(len(es))

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(want, entries if i % 2 else entries[i % 4 :])
    assert len(finished) == 6
    if batched:
        read = [d for call in access.read_small_calls for d in call]
        assert sorted(read) == sorted(blobs)
        assert not access.fetches
    else:
        assert access.fetches == dict.fromkeys(blobs, 1)
    assert cache.stats.fetched_blobs == 4
    for e in entries:
        assert mode_of(cache.path(e)) == 0o444

    # Present now: no more calls.
    access.fetches.clear()
    access.read_small_calls.clear()
    await cache.ensure(entries)
    assert not access.fetches and not access.read_small_calls


async def test_exec_and_non_exec_are_distinct_entries(tmp_path: Path, batched: bool) -> None:
    access = FakeAccess(prefers_batches=batched)
    d = access.put(b"#!/bin/sh\n")
    cache = await open_cache(tmp_path / "cache", access)
    plain, exe = Entry(d, False), Entry(d, True)
    await cache.ensure([plain, exe])
    assert cache.path(plain) != cache.path(exe)
    assert cache.path(exe).name.endswith("-x")
    assert mode_of(cache.path(plain)) == 0o444
    assert mode_of(cache.path(exe)) == 0o555
    assert inode(cache.path(plain)) != inode(cache.path(exe))
    assert cache.path(exe).read_bytes() == cache.path(plain).read_bytes() == b"#!/bin/sh\n"


async def test_empty_blob_needs_no_cas(tmp_path: Path, batched: bool) -> None:
    access = FakeAccess(prefers_batches=batched)
    empty = digest_of(b"")
    cache = await open_cache(tmp_path / "cache", access)
    await cache.ensure([Entry(empty, False), Entry(empty, True)])
    assert cache.path(Entry(empty, True)).read_bytes() == b""
    assert mode_of(cache.path(Entry(empty, True))) == 0o555


async def test_missing_inputs_lists_every_missing_digest(tmp_path: Path, batched: bool) -> None:
    access = FakeAccess(prefers_batches=batched)
    present = access.put(b"here")
    gone = sorted(digest_of(f"gone {i}".encode()) for i in range(3))
    cache = await open_cache(tmp_path / "cache", access)
    wanted = [Entry(present, False), *(Entry(d, i == 0) for i, d in enumerate(gone))]
    with pytest.raises(MissingInputs) as info:
        await cache.ensure(wanted)
    assert info.value.missing == gone
    assert gone[0].blob_path in info.value.message and "3 input blob(s)" in info.value.message
    # What was there was still fetched; nothing is left in tmp/.
    assert cache.path(Entry(present, False)).read_bytes() == b"here"
    assert list(cache.index.tmp.iterdir()) == []
    # Nothing is stuck in flight: asking again asks the CAS again.
    with pytest.raises(MissingInputs):
        await cache.ensure(wanted)


async def test_access_failure_is_raised_plainly_not_as_a_group(tmp_path: Path) -> None:
    class Broken(FakeAccess):
        async def fetch_to(self, digest: Digest, path: Path) -> None:
            raise Internal("the CAS is on fire")

    access = Broken()
    d = access.put(b"x")
    cache = await open_cache(tmp_path / "cache", access)
    with pytest.raises(Internal, match="on fire"):
        await cache.ensure([Entry(d, False), Entry(access.put(b"y"), False)])
    assert list(cache.index.tmp.iterdir()) == []


# -- eviction ---------------------------------------------------------------------------------


async def test_eviction_is_lru_and_spares_leased_entries(tmp_path: Path) -> None:
    access = FakeAccess()
    a, b, c, d, e = (Entry(access.put(bytes([65 + i]) * 10), False) for i in range(5))
    cache = await open_cache(tmp_path / "cache", access, max_bytes=30)
    for x in (a, b, c):
        await cache.ensure([x])
    await cache.ensure([a])  # touch: b is now the least recently used
    await cache.ensure([d])
    assert not cache.path(b).exists()
    assert all(cache.path(x).exists() for x in (a, c, d))

    with cache.lease([c]):  # c is the oldest now, but in use
        await cache.ensure([e])
        assert cache.path(c).exists()
        assert not cache.path(a).exists()
    assert all(cache.path(x).exists() for x in (c, d, e))
    s = cache.stats_dict()
    assert s["evictions"] == 2 and s["files"] == 3 and s["bytes"] == 30
    assert entries_on_disk(cache) == sorted(cache.path(x).name for x in (c, d, e))


async def test_leased_entries_larger_than_the_cache_stay(tmp_path: Path) -> None:
    access = FakeAccess()
    small = Entry(access.put(b"s" * 10), False)
    big = Entry(access.put(b"b" * 100), False)
    cache = await open_cache(tmp_path / "cache", access, max_bytes=50)
    await cache.ensure([small])
    with cache.lease([big, big]):
        await cache.ensure([big])
        assert cache.path(big).exists()
        assert not cache.path(small).exists()
    assert cache.path(big).read_bytes() == b"b" * 100


# -- restart ----------------------------------------------------------------------------------


async def test_restart_keeps_good_files_and_drops_corrupt_ones(tmp_path: Path) -> None:
    access = FakeAccess()
    good = [Entry(access.put(b"good"), False), Entry(access.put(b"good"), True)]
    short = Entry(access.put(b"will be truncated"), False)
    chmodded = Entry(access.put(b"will be chmodded"), True)
    root = tmp_path / "cache"
    cache = await open_cache(root, access)
    await cache.ensure([*good, short, chmodded])
    os.chmod(cache.path(short), 0o644)
    cache.path(short).write_bytes(b"trunc")
    os.chmod(cache.path(short), 0o444)
    os.chmod(cache.path(chmodded), 0o755)
    foreign = cache.path(good[0]).parent / "not-an-entry"
    foreign.write_bytes(b"?")
    (cache.index.tmp / "partial-download").write_bytes(b"half")

    access.fetches.clear()
    again = await open_cache(root, access)
    assert again.stats_dict()["files"] == 2
    assert list(again.index.tmp.iterdir()) == []
    assert not again.path(short).exists() and not again.path(chmodded).exists()
    assert not foreign.exists()
    await again.ensure(good)
    assert not access.fetches  # kept entries are not fetched again
    await again.ensure([short, chmodded])
    assert access.fetches == {short.digest: 1, chmodded.digest: 1}
    assert again.path(short).read_bytes() == b"will be truncated"
    assert mode_of(again.path(chmodded)) == 0o555
    # The restarted cache checks intactness against the mtimes it found.
    assert await again.tamper.check(good) == []


# -- tamper detection -------------------------------------------------------------------------


async def test_check_intact_detects_changes_and_removes_the_file(tmp_path: Path) -> None:
    access = FakeAccess()
    names = ["intact", "appended", "chmodded", "rewritten", "deleted", "touched"]
    es = {n: Entry(access.put(f"content of {n}".encode()), False) for n in names}
    cache = await open_cache(tmp_path / "cache", access)
    await cache.ensure(es.values())

    append(cache.path(es["appended"]), b"!")  # root ignores the 0444 mode
    os.chmod(cache.path(es["chmodded"]), 0o644)
    overwrite(cache.path(es["rewritten"]), b"CONTENT")  # same size, other bytes
    st = os.stat(cache.path(es["rewritten"]))
    os.utime(cache.path(es["rewritten"]), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.unlink(cache.path(es["deleted"]))
    # Only the time changed (as when the CAS store reads a blob sharing the inode): intact.
    st = os.stat(cache.path(es["touched"]))
    os.utime(cache.path(es["touched"]), ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))

    broken = await cache.tamper.check(es.values())
    assert sorted(broken) == sorted(es[n] for n in ("appended", "chmodded", "rewritten", "deleted"))
    for e in broken:
        assert not cache.path(e).exists()
    assert cache.path(es["intact"]).exists() and cache.path(es["touched"]).exists()
    assert await cache.tamper.check([es["touched"]]) == []

    assert cache.stats_dict()["repaired"] == 4
    access.fetches.clear()
    await cache.ensure(es.values())
    assert set(access.fetches) == {e.digest for e in broken}
    for n, e in es.items():
        assert cache.path(e).read_bytes() == f"content of {n}".encode()
    assert await cache.tamper.check(es.values()) == []


async def test_check_intact_mtime_change_with_same_size_is_detected(tmp_path: Path) -> None:
    access = FakeAccess()
    e = Entry(access.put(b"0123456789"), True)
    cache = await open_cache(tmp_path / "cache", access)
    await cache.ensure([e])
    path = cache.path(e)
    st = os.stat(path)
    overwrite(path, b"9876543210")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert await cache.tamper.check([e]) == [e]
    assert not path.exists()


# -- outputs ----------------------------------------------------------------------------------


async def test_adopt_moves_the_file_and_takes_ownership(tmp_path: Path) -> None:
    access = FakeAccess()
    cache = await open_cache(tmp_path / "cache", access)
    out = tmp_path / "out"
    out.write_bytes(b"output")
    os.chmod(out, 0o640)
    if os.geteuid() == 0:
        os.chown(out, 12345, 12345)  # written by an action that ran as another user
    before = inode(out)
    e = Entry(digest_of(b"output"), True)
    adopted = cache.adopter.adopt_sync(out, e)
    final = cache.path(e)
    assert final == cache.path(e) and not out.exists()
    assert inode(final) == before
    st = os.lstat(final)
    assert stat.S_IMODE(st.st_mode) == 0o555
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    await cache.adopter.register([adopted])
    assert await cache.tamper.check([e]) == []

    # The same output again: the new file is dropped, the entry stays.
    out.write_bytes(b"output")
    assert cache.adopter.adopt_sync(out, e).entry == e and not out.exists()
    assert inode(final) == before


# -- LocalStoreAccess -------------------------------------------------------------------------


async def fs_store(root: Path) -> FilesystemStore:
    store = FilesystemStore(root, 0)
    await store.start()
    return store


async def test_fetch_to_hardlinks_from_a_filesystem_store(tmp_path: Path) -> None:
    fs = await fs_store(tmp_path / "cas")
    for store in (fs, VerifyingStore(fs)):
        access = LocalStoreAccess(store)
        data = f"blob for {type(store).__name__}".encode()
        d = digest_of(data)
        await fs.put_bytes(d, data)
        target = tmp_path / f"fetched-{type(store).__name__}"
        await access.fetch_to(d, target)
        assert inode(target) == inode(fs.blob_path(d))
        assert (access.links, access.copies) == (1, 0)
        with pytest.raises(BlobNotFound):
            await access.fetch_to(digest_of(b"absent"), tmp_path / "absent")
        assert not (tmp_path / "absent").exists()


async def test_fetch_to_copies_from_a_memory_store(tmp_path: Path) -> None:
    mem = MemoryStore(0)
    access = LocalStoreAccess(mem)
    data = b"in memory" * 1000
    d = digest_of(data)
    await mem.put_bytes(d, data)
    await access.fetch_to(d, tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == data
    assert (access.links, access.copies) == (0, 1)
    with pytest.raises(BlobNotFound):
        await access.fetch_to(digest_of(b"absent"), tmp_path / "g")


async def test_cache_over_filesystem_store_shares_inodes_but_never_modes(tmp_path: Path) -> None:
    fs = await fs_store(tmp_path / "cas")
    data = b"#!/bin/sh\nexit 0\n"
    d = digest_of(data)
    await fs.put_bytes(d, data)
    access = LocalStoreAccess(VerifyingStore(fs))
    cache = await open_cache(tmp_path / "cache", access)
    plain, exe = Entry(d, False), Entry(d, True)
    await cache.ensure([exe])
    await cache.ensure([plain])
    assert inode(cache.path(plain)) == inode(fs.blob_path(d))  # zero copy
    # The executable entry needs another mode: a hardlink would chmod the store's blob too.
    assert inode(cache.path(exe)) != inode(fs.blob_path(d))
    assert mode_of(fs.blob_path(d)) == 0o444
    assert mode_of(cache.path(plain)) == 0o444
    assert mode_of(cache.path(exe)) == 0o555
    assert await cache.tamper.check([plain, exe]) == []


async def test_store_reading_a_shared_blob_is_not_tampering(tmp_path: Path) -> None:
    fs = await fs_store(tmp_path / "cas")
    data = b"shared with the store"
    d = digest_of(data)
    await fs.put_bytes(d, data)
    cache = await open_cache(tmp_path / "cache", LocalStoreAccess(fs))
    e = Entry(d, False)
    await cache.ensure([e])
    st = os.stat(fs.blob_path(d))
    os.utime(fs.blob_path(d), ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # make it visible
    assert await fs.get_bytes(d) == data  # the store touches the blob it reads
    assert await cache.tamper.check([e]) == []
    assert cache.path(e).exists()


async def test_tampered_entry_sharing_the_stores_inode_is_dropped_from_the_store(
    tmp_path: Path,
) -> None:
    fs = await fs_store(tmp_path / "cas")
    data = b"pristine"
    d = digest_of(data)
    await fs.put_bytes(d, data)
    other = digest_of(b"other")
    await fs.put_bytes(other, b"other")
    access = LocalStoreAccess(VerifyingStore(fs))
    cache = await open_cache(tmp_path / "cache", access)
    e, e2 = Entry(d, False), Entry(other, False)
    await cache.ensure([e, e2])
    append(cache.path(e), b" and corrupted")
    broken = await cache.tamper.check([e, e2])
    assert broken == [e]
    # The store held the same (now corrupted) inode: it no longer claims to have the blob.
    assert await fs.find_missing([d, other]) == [d]
    assert not fs.blob_path(d).exists()
    with pytest.raises(MissingInputs):
        await cache.ensure([e])
    # A client uploads it again; the next fetch is a correct copy.
    await fs.put_bytes(d, data)
    await cache.ensure([e])
    assert cache.path(e).read_bytes() == data


async def test_tampered_copy_leaves_the_store_alone(tmp_path: Path) -> None:
    fs = await fs_store(tmp_path / "cas")
    data = b"copied, not linked"
    d = digest_of(data)
    await fs.put_bytes(d, data)
    cache = await open_cache(tmp_path / "cache", LocalStoreAccess(fs))
    e = Entry(d, True)  # a copy (other mode than the store's blob)
    await cache.ensure([e])
    append(cache.path(e), b"!")
    assert await cache.tamper.check([e]) == [e]
    assert await fs.find_missing([d]) == []
    await cache.ensure([e])
    assert cache.path(e).read_bytes() == data


async def test_upload_links_read_only_files_into_the_filesystem_store(tmp_path: Path) -> None:
    fs = await fs_store(tmp_path / "cas")
    access = LocalStoreAccess(fs)
    ro = tmp_path / "ro"
    ro.write_bytes(b"read-only output")
    os.chmod(ro, 0o444)
    rw = tmp_path / "rw"
    rw.write_bytes(b"writable output")
    os.chmod(rw, 0o644)
    exe = tmp_path / "exe"
    exe.write_bytes(b"executable output")
    os.chmod(exe, 0o555)
    inline = b"inline bytes"
    present = digest_of(b"already there")
    await fs.put_bytes(present, b"already there")
    blobs: dict[Digest, Path | bytes] = {
        digest_of(b"read-only output"): ro,
        digest_of(b"writable output"): rw,
        digest_of(b"executable output"): exe,
        digest_of(inline): inline,
        present: tmp_path / "never opened",
    }
    await access.upload(blobs)
    assert await fs.find_missing(list(blobs)) == []
    assert inode(fs.blob_path(digest_of(b"read-only output"))) == inode(ro)
    for path in (rw, exe):
        blob = fs.blob_path(digest_of(path.read_bytes()))
        assert inode(blob) != inode(path)
        assert mode_of(blob) == 0o444
        assert blob.read_bytes() == path.read_bytes()
    assert mode_of(rw) == 0o644 and mode_of(exe) == 0o555  # the sources are left as they were
    assert await fs.get_bytes(digest_of(inline)) == inline


async def test_upload_through_a_verifying_store_and_a_memory_store(tmp_path: Path) -> None:
    fs = await fs_store(tmp_path / "cas")
    src = tmp_path / "out"
    src.write_bytes(b"output" * 1000)
    os.chmod(src, 0o444)
    d = digest_of(src.read_bytes())
    for store in (VerifyingStore(fs), MemoryStore(0)):
        await LocalStoreAccess(store).upload({d: src, digest_of(b"b"): b"b"})
        assert await store.get_bytes(d) == src.read_bytes()
        assert await store.get_bytes(digest_of(b"b")) == b"b"
