"""FilesystemStore shared by several processes (`[server] processes = N`): the Store contract,
visibility across processes, the shared capacity bound, and what an evictor must never remove.

Two stores opened on one directory in one test process stand for two processes: each has its
own open file description of the ledger, so their flock(2) locks exclude each other exactly as
two processes' do. `test_three_processes_churn` runs real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from reexec.cas import filesystem
from reexec.cas.digest import Digest, digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.fs_shared import ProcessShare
from reexec.cas.store import Store
from reexec.errors import ResourceExhausted
from tests.cas.store_contract import StoreContract, blob, read_all, write_chunked

REPO = Path(__file__).resolve().parents[2]


async def open_shared(root: Path, slot: int, max_bytes: int = 0, run: str = "run-1"):
    store = FilesystemStore(root, max_bytes, shared=ProcessShare(slot, run))
    await store.start()
    return store


def bytes_on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "blobs").rglob("*") if p.is_file())


class TestSharedFilesystemStoreContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        return await open_shared(tmp_path / "cas", 0)

    async def inspect(self, store: Store, digest: Digest) -> bool:
        assert isinstance(store, FilesystemStore)
        assert list((store.root / "tmp" / "slot-0").iterdir()) == []
        assert store.stats()["reserved_bytes"] == 0
        on_disk = store.blob_path(digest).exists()
        assert on_disk == await store.has(digest)
        return on_disk


async def test_a_blob_one_process_stores_is_found_by_the_other(tmp_path: Path) -> None:
    a = await open_shared(tmp_path, 0)
    b = await open_shared(tmp_path, 1)
    small, big = blob(100, 1), blob(300_000, 2)
    ds, db = digest_of(small), digest_of(big)
    await a.put_bytes(ds, small)
    await write_chunked(a, db, big, chunk=50_000)
    assert await b.find_missing([ds, db]) == []
    assert await b.get_bytes(ds) == small
    assert await read_all(b, db, chunk=100_000) == big
    # Storing it again from the other process counts nothing twice.
    await b.put_bytes(ds, small)
    await write_chunked(b, db, big, chunk=50_000)
    assert a.stats()["bytes"] == b.stats()["bytes"] == 300_100 == bytes_on_disk(tmp_path)
    assert a.stats()["reserved_bytes"] == 0


async def test_capacity_holds_across_processes(tmp_path: Path) -> None:
    cap = 100_000
    a = await open_shared(tmp_path, 0, cap)
    b = await open_shared(tmp_path, 1, cap)
    for i in range(60):
        store = (a, b)[i % 2]
        data = blob(7_000 + i, i)
        if i % 3:
            await store.put_bytes(digest_of(data), data)
        else:
            await write_chunked(store, digest_of(data), data, chunk=3000)
        on_disk = bytes_on_disk(tmp_path)
        assert on_disk <= cap, f"after blob {i}: {on_disk} bytes on disk"
        assert a.stats()["bytes"] == on_disk
    assert a.stats()["evictions"] > 0


async def test_reservations_count_across_processes(tmp_path: Path) -> None:
    cap = 100_000
    a = await open_shared(tmp_path, 0, cap)
    b = await open_shared(tmp_path, 1, cap)
    first = await a.open_write(digest_of(blob(60_000, 1)))
    with pytest.raises(ResourceExhausted, match="reserve 60000"):
        await b.open_write(digest_of(blob(50_000, 2)))
    await first.abort()
    second = await b.open_write(digest_of(blob(50_000, 2)))
    assert a.stats()["reserved_bytes"] == 50_000
    await second.abort()
    assert a.stats()["reserved_bytes"] == 0


async def test_a_blob_another_process_reads_is_not_evicted(tmp_path: Path, monkeypatch) -> None:
    # Every use is written to the file at once, so b's last use is later than a's.
    monkeypatch.setattr(filesystem, "TOUCH_INTERVAL_NS", 0)
    cap = 50_000
    a = await open_shared(tmp_path, 0, cap)
    b = await open_shared(tmp_path, 1, cap)
    old = blob(20_000, 7)
    d_old = digest_of(old)
    await b.put_bytes(d_old, old)
    async with a.open_read(d_old) as reader:
        first = await reader.read(1000)
        # b used it last (no other process did since), so only a's read lock keeps it.
        assert await b.find_missing([d_old]) == []
        await b.put_bytes(digest_of(blob(20_000, 8)), blob(20_000, 8))
        await b.put_bytes(digest_of(blob(20_000, 9)), blob(20_000, 9))
        assert a.blob_path(d_old).exists(), "evicted while another process read it"
        assert bytes_on_disk(tmp_path) <= cap
        rest = await reader.read(100_000)
    assert first + rest == old


async def test_a_blob_another_process_used_last_is_not_evicted(tmp_path: Path) -> None:
    cap = 50_000
    a = await open_shared(tmp_path, 0, cap)
    b = await open_shared(tmp_path, 1, cap)
    x, y = blob(20_000, 1), blob(20_000, 2)
    await b.put_bytes(digest_of(x), x)
    await b.put_bytes(digest_of(y), y)
    await trio.sleep(0.01)
    # a was told x is present (by FindMissing): to b, x is still its oldest blob.
    assert await a.find_missing([digest_of(x)]) == []
    await b.put_bytes(digest_of(blob(20_000, 3)), blob(20_000, 3))
    assert await a.find_missing([digest_of(x)]) == []
    assert await b.find_missing([digest_of(y)]) == [digest_of(y)]
    assert bytes_on_disk(tmp_path) <= cap


async def test_an_upload_is_never_dropped_as_already_stored(tmp_path: Path) -> None:
    """a used x a moment ago; b evicts it. a's FindMissingBlobs may still trust its recent use
    (within TOUCH_INTERVAL_NS), but a's put of x must store it again."""
    cap = 50_000
    a = await open_shared(tmp_path, 0, cap)
    b = await open_shared(tmp_path, 1, cap)
    x = blob(20_000, 1)
    await a.put_bytes(digest_of(x), x)
    assert await b.find_missing([digest_of(x)]) == []  # b's use is the latest: no veto
    for seed in (2, 3):
        await b.put_bytes(digest_of(blob(20_000, seed)), blob(20_000, seed))
    assert not a.blob_path(digest_of(x)).exists()
    await a.put_bytes(digest_of(x), x)
    assert a.blob_path(digest_of(x)).exists()
    await write_chunked(b, digest_of(blob(20_000, 4)), blob(20_000, 4))  # evicts x again
    await write_chunked(a, digest_of(x), x)
    assert await a.get_bytes(digest_of(x)) == x


async def test_an_index_that_runs_out_is_rebuilt_from_the_directory(tmp_path: Path) -> None:
    cap = 60_000
    a = await open_shared(tmp_path, 0, cap)
    b = await open_shared(tmp_path, 1, cap)
    for i in range(3):  # only a knows these
        await a.put_bytes(digest_of(blob(19_000, i)), blob(19_000, i))
    await trio.sleep(0.01)
    await b.put_bytes(digest_of(blob(19_000, 9)), blob(19_000, 9))
    assert bytes_on_disk(tmp_path) <= cap
    assert b.stats()["evictions"] == 1


async def test_restarted_slot_and_new_run(tmp_path: Path) -> None:
    cap = 100_000
    a = await open_shared(tmp_path, 0, cap)
    b = await open_shared(tmp_path, 1, cap)
    await b.put_bytes(digest_of(blob(1000, 1)), blob(1000, 1))
    await b.open_write(digest_of(blob(30_000, 2)))  # b dies with this upload open
    (tmp_path / "tmp" / "slot-1" / "partial").write_bytes(b"x")
    assert a.stats()["reserved_bytes"] == 30_000
    b2 = await open_shared(tmp_path, 1, cap)  # restarted into the same slot
    assert a.stats()["reserved_bytes"] == 0
    assert b2.stats()["bytes"] == 1000
    assert list((tmp_path / "tmp" / "slot-1").iterdir()) == []
    # A new supervisor run resets the ledger from the directory.
    await a.open_write(digest_of(blob(30_000, 3)))
    (tmp_path / "tmp" / "slot-0" / "partial").write_bytes(b"x")
    c = await open_shared(tmp_path, 1, cap, run="run-2")
    assert c.stats() | {"blobs": 0} == {
        "blobs": 0,
        "bytes": 1000,
        "max_bytes": cap,
        "reserved_bytes": 0,
        "evictions": 0,
        "forgotten": 0,
        "process_slot": 1,
    }
    assert list((tmp_path / "tmp" / "slot-0").iterdir()) == []


# -- real processes ---------------------------------------------------------------------------

CHURN_SCRIPT = r"""
import json, os, random, sys, time
import trio
from reexec.cas.digest import digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.fs_shared import ProcessShare

root, slot, role, cap, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])

def content(i):
    return (b"%08d" % i) * (250 + (i * 37) % 2000)   # 2 KiB .. 18 KiB, shared by all processes

async def main():
    store = FilesystemStore(root, cap, shared=ProcessShare(slot, "churn"))
    await store.start()
    rnd = random.Random(slot)
    out = {"writes": 0, "reads": 0, "errors": [], "max_ledger": 0}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        i = rnd.randrange(400)
        data = content(i)
        d = digest_of(data)
        # Blobs leave only by eviction, so a blob found missing with no eviction anywhere since
        # it was written was lost (or never made visible).
        evictions = store.stats()["evictions"]
        if role == "writer":
            if i % 4:
                await store.put_bytes(d, data)
            else:
                w = await store.open_write(d)
                for k in range(0, len(data), 4096):
                    await w.write(data[k:k + 4096])
                await w.commit()
            out["writes"] += 1
            # Written (or found already there): present right after.
            if await store.find_missing([d]) and store.stats()["evictions"] == evictions:
                out["errors"].append(f"missing right after writing {i}, no eviction since")
        else:
            await store.put_bytes(d, data)
            try:
                async with store.open_read(d) as r:
                    got = await r.read(1000)
                    await trio.sleep(0.002)   # hold it mid-read while writers evict
                    if not os.path.exists(store.blob_path(d)):
                        out["errors"].append(f"blob {i} evicted mid-read")
                    while part := await r.read(5000):
                        got += part
                if got != data:
                    out["errors"].append(f"short or wrong read of {i}: {len(got)} of {len(data)}")
                out["reads"] += 1
            except Exception as e:
                if store.stats()["evictions"] == evictions:
                    out["errors"].append(f"read of {i} right after writing it: {e!r}")
        # Between operations (the ledger's lock held, so no one is mid-install) the bytes
        # stored and reserved by all processes fit.
        async with store._exclusive():
            state = store._ledger.read()
        out["max_ledger"] = max(out["max_ledger"], state.stored + state.reserved_total)
    await store.aclose()
    print(json.dumps(out))

trio.run(main)
"""


def test_three_processes_churn(tmp_path: Path) -> None:
    """Two writers and a reader-writer in one directory with room for ~15 of 400 blobs."""
    cap = 150_000
    root = tmp_path / "cas"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHURN_SCRIPT, str(root), str(slot), role, str(cap), "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for slot, role in enumerate(["writer", "writer", "reader"])
    ]
    results, logs = [], ""
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out))
        logs += err
    for r in results:
        assert r["errors"] == [], r["errors"][:5]
        assert r["max_ledger"] <= cap, logs
    assert results[0]["writes"] > 50 and results[2]["reads"] > 50
    on_disk = bytes_on_disk(root)
    assert on_disk <= cap
    # Nothing was killed: the shared count is exact.
    store = FilesystemStore(root, cap, shared=ProcessShare(0, "churn"))

    async def check() -> None:
        await store.start()
        assert store.stats()["bytes"] == on_disk
        assert store.stats()["reserved_bytes"] == 0

    trio.run(check)
    assert [p.name for p in (root / "tmp").rglob("*") if p.is_file()] == []
