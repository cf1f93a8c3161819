"""Action caches: memory, filesystem and the completeness-checking decorator."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from reexec import fastpb
from reexec.cas.action_cache import (
    ActionCache,
    ActionKey,
    FilesystemActionCache,
    MemoryActionCache,
)
from reexec.cas.completeness import (
    CompletenessCheckingActionCache,
    direct_references,
    missing_references,
)
from reexec.cas.digest import Digest, DigestFunction, digest_of, empty_digest
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.memory import MemoryStore
from reexec.cas.redis_action_cache import RedisActionCache
from reexec.cas.store import BlobNotFound
from reexec.errors import InvalidArgument


def key(instance: str, n: int, fn: DigestFunction = DigestFunction.SHA256) -> ActionKey:
    return ActionKey(instance, digest_of(f"action {n}".encode(), fn))


def result_bytes(n: int, size: int = 20) -> bytes:
    return (f"result {n} ".encode() * size)[:size]


async def new_fs_ac(root: Path, max_bytes: int = 0) -> FilesystemActionCache:
    ac = FilesystemActionCache(root, max_bytes)
    await ac.start()
    return ac


Factory = Callable[[Path, int], Awaitable[ActionCache]]


async def new_memory_ac(root: Path, max_bytes: int = 0) -> MemoryActionCache:
    return MemoryActionCache(max_bytes)


@pytest.fixture(params=["memory", "filesystem", "redis"])
async def make_ac(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    if request.param != "redis":
        yield new_memory_ac if request.param == "memory" else new_fs_ac
        return
    url = request.getfixturevalue("redis_server").url
    opened: list[ActionCache] = []

    async def new_redis_ac(root: Path, max_bytes: int = 0) -> ActionCache:
        # max_bytes has no meaning here: Redis bounds itself (TTL, maxmemory-policy).
        opened.append(await RedisActionCache.open(url, key_prefix=f"{root}:", timeout_s=2))
        return opened[-1]

    try:
        yield new_redis_ac
    finally:
        for ac in opened:
            await ac.aclose()


async def test_get_put_and_per_instance_keys(make_ac: Factory, tmp_path: Path) -> None:
    ac = await make_ac(tmp_path / "ac", 0)
    k = key("", 1)
    assert await ac.get(k) is None
    await ac.put(k, b"first")
    assert await ac.get(k) == b"first"
    # Same digest, other instances: separate entries.
    for inst in ("a", "a/b", "b", "with spaces/and/slashes"):
        assert await ac.get(ActionKey(inst, k.digest)) is None
    await ac.put(ActionKey("a", k.digest), b"for a")
    await ac.put(ActionKey("a/b", k.digest), b"for a/b")
    assert await ac.get(k) == b"first"
    assert await ac.get(ActionKey("a", k.digest)) == b"for a"
    assert await ac.get(ActionKey("a/b", k.digest)) == b"for a/b"
    # Same hash under another digest function: another entry.
    assert await ac.get(ActionKey("", k.digest._replace(function=DigestFunction.BLAKE3))) is None
    # Overwrite.
    await ac.put(k, b"second")
    assert await ac.get(k) == b"second"
    if "entries" in ac.stats():  # Redis counts nothing locally
        assert ac.stats()["entries"] == 3


async def test_empty_result_is_a_hit(make_ac: Factory, tmp_path: Path) -> None:
    # An ActionResult with every field at its default serializes to b"".
    ac = await make_ac(tmp_path / "ac", 0)
    await ac.put(key("", 1), b"")
    assert await ac.get(key("", 1)) == b""


async def test_eviction_lru(make_ac: Factory, tmp_path: Path) -> None:
    ac = await make_ac(tmp_path / "ac", 60)
    if isinstance(ac, RedisActionCache):
        pytest.skip("Redis evicts by its own maxmemory-policy and TTLs, not by max_bytes")
    keys = [key("i", n) for n in range(4)]
    for n, k in enumerate(keys[:3]):
        await ac.put(k, result_bytes(n))
    assert await ac.get(keys[0]) == result_bytes(0)  # keys[1] is now the oldest
    await ac.put(keys[3], result_bytes(3))
    got = [await ac.get(k) for k in keys]
    assert got == [result_bytes(0), None, result_bytes(2), result_bytes(3)]
    assert ac.stats()["evictions"] == 1
    assert ac.stats()["bytes"] == 60
    # Overwriting with a bigger result re-accounts its size.
    await ac.put(keys[0], result_bytes(0, 40))
    assert ac.stats()["bytes"] <= 60
    assert await ac.get(keys[0]) == result_bytes(0, 40)


async def test_filesystem_persists_across_restart(tmp_path: Path) -> None:
    ac = await new_fs_ac(tmp_path)
    entries = {
        key(inst, n, fn): result_bytes(n + len(inst))
        for n in range(3)
        for inst in ("", "x")
        for fn in (DigestFunction.SHA256, DigestFunction.BLAKE3)
    }
    for k, v in entries.items():
        await ac.put(k, v)
    again = await new_fs_ac(tmp_path)
    for k, v in entries.items():
        assert await again.get(k) == v
    assert again.stats()["entries"] == len(entries)
    assert again.stats()["bytes"] == sum(map(len, entries.values()))


async def test_filesystem_restart_evicts_oldest_by_mtime_and_cleans_tmp(tmp_path: Path) -> None:
    ac = await new_fs_ac(tmp_path)
    keys = [key("", n) for n in range(3)]
    for n, k in enumerate(keys):
        await ac.put(k, result_bytes(n))
    for age, n in enumerate((1, 0, 2)):  # oldest first
        t = 1_700_000_000 + 10 * age
        os.utime(tmp_path / ac._rel_path(keys[n]), (t, t))
    (tmp_path / "tmp" / "leftover").write_bytes(b"partial")
    again = await new_fs_ac(tmp_path, max_bytes=40)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [await again.get(k) for k in keys] == [result_bytes(0), None, result_bytes(2)]
    assert not (tmp_path / ac._rel_path(keys[1])).exists()


async def test_filesystem_entry_deleted_behind_our_back_is_a_miss(tmp_path: Path) -> None:
    ac = await new_fs_ac(tmp_path)
    k = key("", 1)
    await ac.put(k, b"x")
    (tmp_path / ac._rel_path(k)).unlink()
    assert await ac.get(k) is None
    assert ac.stats()["entries"] == 0


# -- completeness ---------------------------------------------------------------------------


class Blobs:
    """Blobs for an ActionResult, stored in a MemoryStore on demand."""

    def __init__(self, fn: DigestFunction = DigestFunction.SHA256) -> None:
        self.fn = fn
        self.cas = MemoryStore(0)
        self.data: dict[Digest, bytes] = {}

    def make(self, content: bytes) -> Digest:
        d = digest_of(content, self.fn)
        self.data[d] = content
        return d

    async def store(self, *except_: Digest) -> None:
        for d, content in self.data.items():
            if d not in except_:
                await self.cas.put_bytes(d, content)


def wire(d: Digest) -> object:
    return fastpb.Digest(hash=d.hash, size_bytes=d.size)


def build_result(blobs: Blobs) -> tuple[bytes, dict[str, Digest]]:
    """An ActionResult with two output files, stdout/stderr and an output directory."""
    named: dict[str, Digest] = {
        "out1": blobs.make(b"output file one"),
        "out2": blobs.make(b"output file two"),
        "stdout": blobs.make(b"hello from stdout"),
        "stderr": blobs.make(b"warnings"),
        "nested_a": blobs.make(b"file a inside the tree"),
        "nested_b": blobs.make(b"file b in a subdirectory"),
    }
    child = fastpb.Directory(files=[fastpb.FileNode(name="b.txt", digest=wire(named["nested_b"]))])
    child_digest = blobs.make(child.SerializeToString())
    root = fastpb.Directory(
        files=[
            fastpb.FileNode(name="a.txt", digest=wire(named["nested_a"])),
            fastpb.FileNode(name="empty", digest=wire(empty_digest(blobs.fn))),
        ],
        directories=[fastpb.DirectoryNode(name="sub", digest=wire(child_digest))],
    )
    tree = fastpb.Tree(root=root, children=[child])
    named["tree"] = blobs.make(tree.SerializeToString())
    result = fastpb.ActionResult(
        output_files=[
            fastpb.OutputFile(path="out/1", digest=wire(named["out1"])),
            fastpb.OutputFile(path="out/2", digest=wire(named["out2"])),
            fastpb.OutputFile(path="out/empty", digest=wire(empty_digest(blobs.fn))),
        ],
        output_directories=[
            fastpb.OutputDirectory(path="out/dir", tree_digest=wire(named["tree"]))
        ],
        stdout_digest=wire(named["stdout"]),
        stderr_digest=wire(named["stderr"]),
        exit_code=0,
    )
    return result.SerializeToString(), named


@pytest.mark.parametrize("fn", [DigestFunction.SHA256, DigestFunction.BLAKE3])
async def test_complete_entry_is_visible(fn: DigestFunction) -> None:
    blobs = Blobs(fn)
    data, _ = build_result(blobs)
    await blobs.store()
    ac = CompletenessCheckingActionCache(MemoryActionCache(0), blobs.cas)
    k = ActionKey("inst", digest_of(b"the action", fn))
    await ac.put(k, data)
    assert await ac.get(k) == data
    assert ac.stats()["incomplete"] == 0
    assert await ac.get(ActionKey("other", k.digest)) is None


@pytest.mark.parametrize(
    "missing", ["out1", "out2", "stdout", "stderr", "tree", "nested_a", "nested_b"]
)
async def test_entry_hidden_when_a_blob_is_missing(missing: str) -> None:
    blobs = Blobs()
    data, named = build_result(blobs)
    await blobs.store(named[missing])
    inner = MemoryActionCache(0)
    ac = CompletenessCheckingActionCache(inner, blobs.cas)
    k = key("", 1)
    await ac.put(k, data)
    assert await inner.get(k) == data  # stored, only hidden
    assert await ac.get(k) is None
    assert ac.stats()["incomplete"] == 1
    result = fastpb.ActionResult.FromString(data)
    assert await missing_references(result, DigestFunction.SHA256, blobs.cas) == [named[missing]]
    # Re-uploading the blob makes the entry visible again.
    await blobs.cas.put_bytes(named[missing], blobs.data[named[missing]])
    assert await ac.get(k) == data


async def test_direct_references() -> None:
    blobs = Blobs()
    data, named = build_result(blobs)
    result = fastpb.ActionResult.FromString(data)
    refs = direct_references(result, DigestFunction.SHA256)
    assert refs == [
        named["out1"],
        named["out2"],
        empty_digest(DigestFunction.SHA256),
        named["tree"],
        named["stdout"],
        named["stderr"],
    ]
    # Unset stdout/stderr digests name nothing.
    bare = fastpb.ActionResult(exit_code=1)
    assert direct_references(bare, DigestFunction.SHA256) == []


async def test_unreadable_entries_are_misses() -> None:
    blobs = Blobs()
    inner = MemoryActionCache(0)
    ac = CompletenessCheckingActionCache(inner, blobs.cas)
    await ac.put(key("", 1), b"\xff\xff\xff not a protobuf")
    assert await ac.get(key("", 1)) is None
    # A malformed digest inside the result.
    bad = fastpb.ActionResult(
        output_files=[fastpb.OutputFile(path="x", digest=fastpb.Digest(hash="XYZ", size_bytes=1))]
    )
    await ac.put(key("", 2), bad.SerializeToString())
    assert await ac.get(key("", 2)) is None
    # A tree blob that does not parse as a Tree.
    junk = blobs.make(b"\xff\xff\xff")
    await blobs.store()
    with_tree = fastpb.ActionResult(
        output_directories=[fastpb.OutputDirectory(path="d", tree_digest=wire(junk))]
    )
    with pytest.raises(InvalidArgument, match="is not a valid Tree"):
        await missing_references(with_tree, DigestFunction.SHA256, blobs.cas)
    await ac.put(key("", 3), with_tree.SerializeToString())
    assert await ac.get(key("", 3)) is None


async def test_action_result_digests_use_the_action_digest_function() -> None:
    # A 64-hex-digit hash in a BLAKE3 action's result is a BLAKE3 digest, not a SHA256 one:
    # a CAS holding the same hashes under SHA256 does not make the entry complete.
    blobs = Blobs(DigestFunction.BLAKE3)
    data, _ = build_result(blobs)
    sha_cas = MemoryStore(0)  # does not verify content, so it accepts these mislabelled digests
    for d, content in blobs.data.items():
        await sha_cas.put_bytes(d._replace(function=DigestFunction.SHA256), content)
    ac = CompletenessCheckingActionCache(MemoryActionCache(0), sha_cas)
    k = key("", 1, DigestFunction.BLAKE3)
    await ac.put(k, data)
    assert await ac.get(k) is None


# -- completeness: skipping the check while the CAS has lost nothing -----------------------


async def fs_blobs(tmp_path: Path, max_bytes: int = 0) -> tuple[Blobs, FilesystemStore]:
    blobs = Blobs()
    blobs.cas = FilesystemStore(tmp_path / "cas", max_bytes)  # type: ignore[assignment]
    await blobs.cas.start()
    return blobs, blobs.cas  # type: ignore[return-value]


async def test_check_skipped_while_cas_unchanged_and_redone_after_a_put(tmp_path: Path) -> None:
    blobs, fs = await fs_blobs(tmp_path)
    data, _ = build_result(blobs)
    await blobs.store()
    ac = CompletenessCheckingActionCache(MemoryActionCache(0), fs)
    k = key("", 1)
    await ac.put(k, data)
    assert await ac.get(k) == data and ac.skipped == 0  # checked
    assert await ac.get(k) == data and ac.skipped == 1  # same bytes, check skipped
    assert await ac.get(k) == data and ac.skipped == 2
    # A put invalidates: the new entry (naming a blob the CAS lacks) is checked and hidden.
    other = fastpb.ActionResult(
        output_files=[fastpb.OutputFile(path="x", digest=wire(digest_of(b"never stored")))]
    )
    await ac.put(k, other.SerializeToString())
    assert await ac.get(k) is None
    assert ac.skipped == 2 and ac.stats()["incomplete"] == 1


async def test_entry_replaced_through_a_shared_cache_is_checked_again(tmp_path: Path) -> None:
    """Two frontends over one shared inner cache (as with redis or grpc): B has checked and
    remembered an entry; A replaces it with one naming a blob only A's CAS holds. B must check
    the new entry (and hide it), not skip the check because nothing changed in B."""
    shared = MemoryActionCache(0)
    blobs_a, fs_a = await fs_blobs(tmp_path / "a")
    blobs_b, fs_b = await fs_blobs(tmp_path / "b")
    data, _ = build_result(blobs_a)
    blobs_b.data = blobs_a.data
    await blobs_a.store()
    await blobs_b.store()
    a = CompletenessCheckingActionCache(shared, fs_a)
    b = CompletenessCheckingActionCache(shared, fs_b)
    k = key("", 1)
    await a.put(k, data)
    assert await b.get(k) == data and await b.get(k) == data and b.skipped == 1
    only_in_a = b"an output only frontend A has"
    await fs_a.put_bytes(digest_of(only_in_a), only_in_a)
    replaced = fastpb.ActionResult(
        output_files=[fastpb.OutputFile(path="x", digest=wire(digest_of(only_in_a)))]
    ).SerializeToString()
    await a.put(k, replaced)
    assert await a.get(k) == replaced
    assert await b.get(k) is None
    assert b.skipped == 1 and b.stats()["incomplete"] == 1
    await fs_b.put_bytes(digest_of(only_in_a), only_in_a)
    assert await b.get(k) == replaced and await b.get(k) == replaced and b.skipped == 2


@pytest.mark.parametrize("how", ["evicted", "vanished", "discarded"])
async def test_any_blob_removal_the_store_knows_of_forces_a_recheck(
    tmp_path: Path, how: str
) -> None:
    blobs, fs = await fs_blobs(tmp_path)
    data, named = build_result(blobs)
    await blobs.store()
    ac = CompletenessCheckingActionCache(MemoryActionCache(0), fs)
    k = key("", 1)
    await ac.put(k, data)
    assert await ac.get(k) == data
    assert await ac.get(k) == data and ac.skipped == 1
    gone = named["out1"]
    if how == "evicted":
        # Shrink the budget so the next insertion evicts the least recently used blobs.
        await fs.find_missing([d for d in blobs.data if d != gone])
        fs._lru.max_bytes = fs._lru.total_bytes
        filler = b"x" * gone.size
        await fs.put_bytes(digest_of(filler), filler)
        assert fs.stats()["evictions"] >= 1
    elif how == "vanished":
        fs.blob_path(gone).unlink()
        with pytest.raises(BlobNotFound):
            await fs.get_bytes(gone)
        assert fs.stats()["forgotten"] == 1
    else:
        st = fs.blob_path(gone).stat()
        assert await fs.discard_if_same_file(gone, st.st_dev, st.st_ino)
        assert fs.stats()["forgotten"] == 1
    assert await fs.find_missing([gone]) == [gone]
    assert await ac.get(k) is None
    assert ac.skipped == 1 and ac.stats()["incomplete"] == 1


async def test_stores_without_removal_counters_are_always_checked() -> None:
    blobs = Blobs()  # MemoryStore: reports evictions but no "forgotten" count
    data, _ = build_result(blobs)
    await blobs.store()
    ac = CompletenessCheckingActionCache(MemoryActionCache(0), blobs.cas)
    await ac.put(key("", 1), data)
    for _ in range(3):
        assert await ac.get(key("", 1)) == data
    assert ac.skipped == 0


async def test_filesystem_ac_reads_small_entries_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ac = await new_fs_ac(tmp_path / "ac")
    small, big = result_bytes(1, 1000), result_bytes(2, 100_000)
    await ac.put(key("", 1), small)
    await ac.put(key("", 2), big)
    hops: list[object] = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):  # type: ignore[no-untyped-def]
        hops.append(fn)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    assert await ac.get(key("", 1)) == small
    assert hops == []
    assert await ac.get(key("", 2)) == big
    assert len(hops) == 1
    # A vanished small entry is still a miss, and forgotten.
    os.unlink(tmp_path / "ac" / ac._rel_path(key("", 1)))
    assert await ac.get(key("", 1)) is None
    assert ac.stats()["entries"] == 1
