"""Execute bounds the input tree from its DAG before queuing (issue 9, item 1).

A 41-directory DAG whose levels each name the previous one twice expands to 2^40 entries; it
must be refused at once with INVALID_ARGUMENT while other RPCs stay responsive.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.cas.digest import make_digest
from reexec.cas.memory import MemoryStore
from reexec.cas.tree_size import SizeCache, TreeTooLarge
from reexec.daemon.config import SchedulerConfig
from reexec.gen.build.bazel.remote.execution import v2 as re
from reexec.sched.validation import input_tree_size
from tests.conftest import call, make_config, open_channel, start_daemon
from tests.fake_worker import ExecuteCall, execute_request, sha


def _node(parent: fastpb.Message, field: str, name: str, raw: bytes) -> None:
    n = getattr(parent, field).add(name=name)
    n.digest.hash = hashlib.sha256(raw).hexdigest()
    n.digest.size_bytes = len(raw)


def bomb_blobs(levels: int) -> tuple[bytes, list[bytes]]:
    """(root Directory bytes, every blob of the DAG): each level names the previous twice."""
    leaf_file = b"payload"
    d = fastpb.Directory()
    _node(d, "files", "f", leaf_file)
    raw = d.SerializeToString(deterministic=True)
    blobs = [leaf_file, raw]
    for _ in range(levels - 1):
        d = fastpb.Directory()
        _node(d, "directories", "a", raw)
        _node(d, "directories", "b", raw)
        raw = d.SerializeToString(deterministic=True)
        blobs.append(raw)
    return raw, blobs


async def upload(channel, blobs: list[bytes]) -> None:
    cas = re.ContentAddressableStorageStub(channel)
    resp = await call(
        cas.batch_update_blobs,
        re.BatchUpdateBlobsRequest(
            requests=[re.BatchUpdateBlobsRequestRequest(digest=sha(b), data=b) for b in blobs]
        ),
    )
    assert all(r.status is None or r.status.code == 0 for r in resp.responses)


async def action_with_root(channel, root: bytes, extra: list[bytes]) -> re.Digest:
    command = bytes(re.Command(arguments=["true"]))
    action = bytes(re.Action(command_digest=sha(command), input_root_digest=sha(root)))
    await upload(channel, [command, action, *extra])
    return sha(action)


async def execute_error(channel, digest) -> GRPCError:
    c = ExecuteCall(channel, execute_request(digest))
    with trio.fail_after(10):  # an accepted Execute would wait for a worker forever
        await c.run()
    assert isinstance(c.error, GRPCError), (c.error, c.operations)
    return c.error


@pytest.fixture
async def env(aio_loop, tmp_path, nursery):
    daemon = await start_daemon(
        nursery, make_config(tmp_path / "data", scheduler=SchedulerConfig())
    )
    channel = await open_channel(daemon.port)
    yield daemon, channel
    channel.close()


async def test_directory_bomb_is_refused_without_stalling_other_rpcs(env):
    _, channel = env
    root, blobs = bomb_blobs(41)
    digest = await action_with_root(channel, root, blobs)
    cas = re.ContentAddressableStorageStub(channel)
    latencies: list[float] = []
    done = trio.Event()

    async def probe() -> None:
        while not done.is_set():
            t = time.monotonic()
            await call(cas.find_missing_blobs, re.FindMissingBlobsRequest(blob_digests=[sha(b"x")]))
            latencies.append(time.monotonic() - t)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        started = time.monotonic()
        err = await execute_error(channel, digest)
        elapsed = time.monotonic() - started
        done.set()
    assert err.status is Status.INVALID_ARGUMENT
    assert "more than 2,000,000 entries" in err.message
    assert sha(root).hash in err.message
    assert elapsed < 2.0
    assert max(latencies) < 1.0


async def test_missing_subdirectory_is_a_missing_violation(env):
    _, channel = env
    child = fastpb.Directory()
    _node(child, "files", "f", b"data")
    child_raw = child.SerializeToString(deterministic=True)
    root = fastpb.Directory()
    _node(root, "directories", "sub", child_raw)
    root_raw = root.SerializeToString(deterministic=True)
    digest = await action_with_root(channel, root_raw, [root_raw])  # the child is not uploaded
    err = await execute_error(channel, digest)
    assert err.status is Status.FAILED_PRECONDITION
    subjects = [v.subject for d in err.details for v in d.violations]
    assert subjects == [f"blobs/{sha(child_raw).hash}/{len(child_raw)}"]


async def test_invalid_subdirectory_is_invalid_argument(env):
    _, channel = env
    garbage = b"\xff\xff\xff"
    root = fastpb.Directory()
    _node(root, "directories", "sub", garbage)
    root_raw = root.SerializeToString(deterministic=True)
    digest = await action_with_root(channel, root_raw, [root_raw, garbage])
    err = await execute_error(channel, digest)
    assert err.status is Status.INVALID_ARGUMENT
    assert "not a valid Directory" in err.message


async def test_sizes_are_cached_by_digest():
    store = MemoryStore(1 << 30)
    root, blobs = bomb_blobs(12)
    for b in blobs:
        await store.put_bytes(make_digest(hashlib.sha256(b).hexdigest(), len(b)), b)
    root_digest = make_digest(hashlib.sha256(root).hexdigest(), len(root))
    cache = SizeCache()
    size = await input_tree_size(store, root_digest, cache)
    assert size.entries == 2**11 + 2**12 - 2 and size.depth == 11
    assert len(cache) == 12  # one entry per distinct directory
    reads = []
    real = store.get_bytes

    async def counting(d):
        reads.append(d)
        return await real(d)

    store.get_bytes = counting  # type: ignore[method-assign]
    assert await input_tree_size(store, root_digest, cache) == size
    assert reads == []
    with pytest.raises(TreeTooLarge):
        await input_tree_size(store, root_digest, SizeCache(), max_entries=1000)


async def test_wide_tree_is_sized_in_a_thread(monkeypatch):
    """Many directories: parsing and sizing leave the Trio thread."""
    store = MemoryStore(1 << 30)
    leaves = []
    for i in range(600):
        d = fastpb.Directory()
        d.symlinks.add(name="s", target=f"{i}/" + "t" * 200)  # ~128 KiB of Directory messages
        leaves.append(d.SerializeToString(deterministic=True))
    root = fastpb.Directory()
    for i, raw in enumerate(leaves):
        _node(root, "directories", f"d{i:04}", raw)
    root_raw = root.SerializeToString(deterministic=True)
    for b in [*leaves, root_raw]:
        await store.put_bytes(make_digest(hashlib.sha256(b).hexdigest(), len(b)), b)
    threaded = []
    real = trio.to_thread.run_sync

    async def spy(fn, *args, **kw):
        threaded.append(getattr(fn, "__name__", fn))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    digest = make_digest(hashlib.sha256(root_raw).hexdigest(), len(root_raw))
    size = await input_tree_size(store, digest, SizeCache())
    assert size.entries == 1200
    assert "_parse_level" in threaded and "size_all" in threaded


# -- GetTree ------------------------------------------------------------------------------------


async def get_tree(channel, root: bytes, page_size: int = 0) -> list[re.GetTreeResponse]:
    from tests.conftest import collect

    cas = re.ContentAddressableStorageStub(channel)
    return await collect(
        cas.get_tree, re.GetTreeRequest(root_digest=sha(root), page_size=page_size)
    )


async def test_get_tree_of_a_bomb_sends_each_directory_once(env):
    _, channel = env
    root, blobs = bomb_blobs(41)
    await upload(channel, blobs)
    started = time.monotonic()
    pages = await get_tree(channel, root)
    assert time.monotonic() - started < 2.0
    assert sum(len(p.directories) for p in pages) == 41


async def test_get_tree_bounds_distinct_directories(env, monkeypatch):
    import reexec.cas.cas_service as cas_service

    monkeypatch.setattr(cas_service, "MAX_TREE_ENTRIES", 10)
    _, channel = env
    leaves = [
        bytes(re.Directory(symlinks=[re.SymlinkNode(name="s", target=str(i))])) for i in range(20)
    ]
    root = fastpb.Directory()
    for i, raw in enumerate(leaves):
        _node(root, "directories", f"d{i:02}", raw)
    root_raw = root.SerializeToString(deterministic=True)
    await upload(channel, [*leaves, root_raw])
    with pytest.raises(GRPCError) as e:
        await get_tree(channel, root_raw)
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "more than 10 directories" in e.value.message


async def test_get_tree_parses_wide_levels_in_a_thread(env, monkeypatch):
    _, channel = env
    leaves = [
        bytes(re.Directory(symlinks=[re.SymlinkNode(name="s", target=f"{i}/" + "t" * 300)]))
        for i in range(300)
    ]  # ~90 KiB of Directory messages in one level
    root = fastpb.Directory()
    for i, raw in enumerate(leaves):
        _node(root, "directories", f"d{i:03}", raw)
    root_raw = root.SerializeToString(deterministic=True)
    await upload(channel, [*leaves, root_raw])
    threaded = []
    real = trio.to_thread.run_sync

    async def spy(fn, *args, **kw):
        threaded.append(getattr(fn, "__name__", fn))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    pages = await get_tree(channel, root_raw)
    assert sum(len(p.directories) for p in pages) == 301
    assert "_level_children" in threaded


async def test_get_tree_pages_stay_small_whatever_page_size_asks(env):
    _, channel = env
    # 40 directories of ~40 KiB each (~1.6 MiB): more than one page's bytes.
    leaves = [
        bytes(
            re.Directory(
                symlinks=[re.SymlinkNode(name=f"s{j}", target="t" * 1000) for j in range(40)]
                + [re.SymlinkNode(name="i", target=str(i))]
            )
        )
        for i in range(40)
    ]
    root = fastpb.Directory()
    for i, raw in enumerate(leaves):
        _node(root, "directories", f"d{i:02}", raw)
    root_raw = root.SerializeToString(deterministic=True)
    await upload(channel, [*leaves, root_raw])
    pages = await get_tree(channel, root_raw, page_size=2**31 - 1)
    assert len(pages) >= 2
    assert sum(len(p.directories) for p in pages) == 41
    assert all(len(bytes(p)) <= (1 << 20) + 64 * 1024 for p in pages)
