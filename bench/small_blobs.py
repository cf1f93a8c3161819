"""Small-blob round trips: FindMissingBlobs + ByteStream Write + ByteStream Read of distinct 4 KiB blobs.

32 concurrent tasks over 4 channels (4 TCP connections), each doing round trips on its own
distinct blobs for a fixed time, against
  1. `reexecd serve` (subprocess, default config: verifying filesystem CAS), and
  2. the baseline: bench/_echo_server.py, plain grpclib on plain asyncio with trivial handlers
     serving the same three RPC shapes (the framework floor).
  3. the same echo handlers hosted as reexecd hosts grpclib (trio-asyncio loop inside trio.run)
     with one Trio crossing per RPC: the floor of reexecd's architecture.
Reports RPC/s (3 RPCs per round trip), round-trip latency and server CPU%.
Client: grpcio.aio with reexec.fastpb messages (the cheapest client available, see _common.py).

Usage: .venv/bin/python bench/small_blobs.py [--seconds 8] [--concurrency 32] [--channels 4]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    AioClient,
    CpuMeter,
    ServerProcess,
    banner,
    percentile,
    quiet_note,
    reexecd,
    server_process,
    table,
)

from reexec import fastpb

BLOB = 4096
TARGET = 1800.0


def make_blobs(n: int) -> list[tuple[bytes, str]]:
    out = []
    for _ in range(n):
        data = os.urandom(BLOB)
        out.append((data, hashlib.sha256(data).hexdigest()))
    return out


async def round_trip(client: AioClient, data: bytes, h: str) -> None:
    d = fastpb.Digest(hash=h, size_bytes=len(data))
    fm = await client.find_missing_blobs(fastpb.FindMissingBlobsRequest(blob_digests=[d]))
    del fm
    w = await client.write(
        iter(
            [
                fastpb.WriteRequest(
                    resource_name=f"uploads/{uuid.uuid4()}/blobs/{h}/{len(data)}",
                    write_offset=0,
                    data=data,
                    finish_write=True,
                )
            ]
        )
    )
    assert w.committed_size == len(data), w
    got = b""
    async for r in client.read(fastpb.ReadRequest(resource_name=f"blobs/{h}/{len(data)}")):
        got += r.data
    assert len(got) == len(data)


async def drive(
    server: ServerProcess, blobs: list[tuple[bytes, str]], seconds: float, conc: int, nch: int
) -> dict[str, float]:
    clients = [AioClient(server.target) for _ in range(nch)]
    # Connect and warm up (one round trip per client, blobs from the end of the list).
    for i, c in enumerate(clients):
        await round_trip(c, *blobs[-1 - i])
    next_blob = 0
    latencies: list[float] = []
    stop_at = 0.0

    async def worker(i: int) -> None:
        nonlocal next_blob
        client = clients[i % nch]
        while time.perf_counter() < stop_at:
            if next_blob >= len(blobs) - nch:
                raise RuntimeError("ran out of distinct blobs; raise the pool size")
            data, h = blobs[next_blob]
            next_blob += 1
            t0 = time.perf_counter()
            await round_trip(client, data, h)
            latencies.append(time.perf_counter() - t0)

    with CpuMeter(server) as m:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(worker(i) for i in range(conc)))
    for c in clients:
        await c.close()
    n = len(latencies)
    return {
        "round_trips": n,
        "rpc_s": 3 * n / m.wall,
        "rt_s": n / m.wall,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "server_pct": m.server_pct,
        "client_pct": m.client_pct,
        "server_us_per_rpc": 1e6 * m.server_cpu / (3 * n),
        "other_pct": m.other_pct,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--channels", type=int, default=4)
    args = ap.parse_args()

    banner(
        f"small blobs: FindMissingBlobs+Write+Read of 4 KiB blobs, "
        f"{args.concurrency} tasks over {args.channels} channels, {args.seconds:.0f}s each",
        fs=True,
    )
    blobs = make_blobs(int(args.seconds * 2500) + 1000)
    results = {}
    echo = str(Path(__file__).resolve().parent / "_echo_server.py")
    runs = [
        ("reexecd", lambda: reexecd()),
        (
            "baseline: grpclib+asyncio echo",
            lambda: server_process([echo, "{port}", "asyncio"], name="echo"),
        ),
        (
            "echo on trio-asyncio, 1 crossing",
            lambda: server_process([echo, "{port}", "trio-asyncio-cross"], name="echo-trio"),
        ),
    ]
    for label, start in runs:
        with start() as server:
            r = asyncio.run(drive(server, blobs, args.seconds, args.concurrency, args.channels))
        results[label] = r
        print(
            f"  {label:<32} {r['rpc_s']:7.0f} RPC/s  ({r['rt_s']:.0f} round trips/s, "
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms)  server CPU {r['server_pct']:.0f}% "
            f"({r['server_us_per_rpc']:.0f} us/RPC)  client CPU {r['client_pct']:.0f}%  "
            f"other {r['other_pct']:.0f}%",
            flush=True,
        )

    ours, base = results["reexecd"], results["baseline: grpclib+asyncio echo"]
    trio_floor = results["echo on trio-asyncio, 1 crossing"]
    print(quiet_note())
    print()
    print(
        table(
            [
                "small blobs",
                "RPC/s",
                "server CPU %",
                "server us/RPC",
                "p50 round trip ms",
                "baseline RPC/s",
                "ratio",
                "target RPC/s",
                "met?",
            ],
            [
                [
                    "reexecd, 4 KiB FMB+Write+Read",
                    ours["rpc_s"],
                    ours["server_pct"],
                    ours["server_us_per_rpc"],
                    ours["p50_ms"],
                    base["rpc_s"],
                    f"{ours['rpc_s'] / base['rpc_s']:.2f}",
                    f">= {TARGET:,.0f}",
                    "yes" if ours["rpc_s"] >= TARGET else "no",
                ],
                [
                    "baseline echo (trivial handlers)",
                    base["rpc_s"],
                    base["server_pct"],
                    base["server_us_per_rpc"],
                    base["p50_ms"],
                    base["rpc_s"],
                    "1.00",
                    "-",
                    "-",
                ],
                [
                    "echo on trio-asyncio + 1 crossing/RPC",
                    trio_floor["rpc_s"],
                    trio_floor["server_pct"],
                    trio_floor["server_us_per_rpc"],
                    trio_floor["p50_ms"],
                    base["rpc_s"],
                    f"{trio_floor['rpc_s'] / base['rpc_s']:.2f}",
                    "-",
                    "-",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
