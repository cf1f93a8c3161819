"""Storage across processes: blob throughput through a `grpc` store and a `shard` of two, next to
a local verifying filesystem store and the SHA-256 floor; and the share of blobs that move when a
shard joins (rendezvous hashing).

    .venv/bin/python bench/sharded_storage.py [--mib 128] [--blob-mib 4]

Two `reexecd storage` subprocesses serve the remote stores; this process is the client (like a
scheduler whose CAS is a `shard` of `grpc` stores). Every remote read is verified against its
digest on arrival, and every write is verified by the storage node, so each byte is hashed twice
on a round trip: the floor column is one SHA-256 pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import banner, server_process, sha256_speed, table
from reexec.cas.digest import digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.grpc_store import GrpcStore, channel_factory
from reexec.cas.rendezvous import Shard, pick
from reexec.cas.shard import ShardStore
from reexec.cas.store import Store
from reexec.cas.verify import VerifyingStore


def storage_node(name: str):  # type: ignore[no-untyped-def]
    return server_process(
        [
            "-m",
            "reexec.daemon",
            "storage",
            "--listen",
            "127.0.0.1:{port}",
            "--data-dir",
            "{data_dir}",
            "--log-level",
            "warning",
        ],
        name=name,
    )


async def measure(store: Store, blobs: list[bytes]) -> tuple[float, float]:
    """MiB/s writing every blob, then reading every blob back (through open_read)."""
    digests = [digest_of(b) for b in blobs]
    total = sum(map(len, blobs)) / (1 << 20)
    t0 = time.perf_counter()
    for d, b in zip(digests, blobs, strict=True):
        await store.put_bytes(d, b)
    t1 = time.perf_counter()
    for d in digests:
        async with store.open_read(d) as reader:
            while await reader.read(1 << 20):
                pass
    t2 = time.perf_counter()
    return total / (t1 - t0), total / (t2 - t1)


def moved_fraction(n_shards: int, keys: int = 50_000) -> tuple[float, int]:
    """Share of keys that change owner when a shard joins, and how many moved between the
    shards that were there before (rendezvous hashing: none)."""
    before = [Shard(f"s{i}") for i in range(n_shards)]
    new = Shard(f"s{n_shards}")
    after = [*before, new]
    moved = between_old = 0
    for i in range(keys):
        k = f"{i:064x}".encode()
        old_owner, new_owner = before[pick(before, k)].name, after[pick(after, k)].name
        if old_owner != new_owner:
            moved += 1
            between_old += new_owner != new.name
    return moved / keys, between_old


async def main(args: argparse.Namespace) -> None:
    banner("storage across processes: grpc and shard stores", fs=True)
    blob_bytes = args.blob_mib << 20
    count = max(1, args.mib // args.blob_mib)
    blobs = [os.urandom(blob_bytes) for _ in range(count)]
    floor = sha256_speed(blobs[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="reexec-bench-fs-") as tmp:
        fs = FilesystemStore(Path(tmp), 1 << 40)
        await fs.start()
        w, r = await measure(VerifyingStore(fs), blobs)
        rows.append(["local verify(filesystem)", f"{w:.0f}", f"{r:.0f}"])
    with storage_node("storage-a") as a, storage_node("storage-b") as b:
        async with trio_asyncio.open_loop():
            one = GrpcStore(channel_factory(f"grpc://{a.target}"))
            w, r = await measure(one, [bytes(reversed(x)) for x in blobs])
            rows.append(["grpc (one storage node)", f"{w:.0f}", f"{r:.0f}"])
            await one.aclose()
            shard = ShardStore(
                [
                    ("a", 1.0, GrpcStore(channel_factory(f"grpc://{a.target}"))),
                    ("b", 1.0, GrpcStore(channel_factory(f"grpc://{b.target}"))),
                ]
            )
            w, r = await measure(shard, [x[::-1][1:] + b"!" for x in blobs])
            rows.append(["shard of two grpc stores", f"{w:.0f}", f"{r:.0f}"])
            await shard.aclose()
    print(f"{count} blobs of {args.blob_mib} MiB; SHA-256 floor {floor:.0f} MiB/s (one core)")
    print(table(["store", "write MiB/s", "read MiB/s"], rows))
    for n in (2, 3, 4):
        frac, between_old = moved_fraction(n)
        print(
            f"adding a shard to {n}: {frac:.3f} of blobs move (ideal {1 / (n + 1):.3f}); "
            f"{between_old} moved between the shards already there"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="total MiB per store")
    parser.add_argument("--blob-mib", type=int, default=4, help="MiB per blob")
    trio.run(main, parser.parse_args())
