"""GetActionResult hits per second at concurrency 32 against a `reexecd serve` subprocess.

Setup: 200 action cache entries, each an ActionResult with 3 output files and stdout whose blobs
were uploaded first (BatchUpdateBlobs), stored with UpdateActionResult. The default config checks
completeness on every hit (the referenced blobs must still be in the CAS).
Then 32 concurrent tasks over 4 channels call GetActionResult on random entries for a fixed time.
Baseline in the same run: GetCapabilities calls/s (the cheapest RPC) with the same load shape.
Client: grpcio.aio with reexec.fastpb messages.

Usage: .venv/bin/python bench/get_action_result.py [--seconds 8] [--entries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REAPI,
    AioClient,
    CpuMeter,
    ServerProcess,
    banner,
    percentile,
    quiet_note,
    reexecd,
    table,
)

from reexec import fastpb

TARGET = 2000.0
CapsRequest = fastpb.message_class(f"{REAPI}.GetCapabilitiesRequest")


def blob(text: str) -> tuple[bytes, fastpb.Message]:
    data = text.encode() + os.urandom(32)
    return data, fastpb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


async def populate(client: AioClient, entries: int) -> list[fastpb.Message]:
    actions = []
    for i in range(entries):
        upload = fastpb.BatchUpdateBlobsRequest()
        result = fastpb.ActionResult(exit_code=0)
        for j in range(3):
            data, d = blob(f"action {i} output {j}\n" * 20)
            upload.requests.add(data=data).digest.CopyFrom(d)
            result.output_files.add(
                path=f"bazel-out/k8-fastbuild/bin/pkg/out{j}.o"
            ).digest.CopyFrom(d)
        data, d = blob(f"action {i} stdout\n")
        upload.requests.add(data=data).digest.CopyFrom(d)
        result.stdout_digest.CopyFrom(d)
        resp = await client.batch_update_blobs(upload)
        assert all(r.status.code == 0 for r in resp.responses)
        _, action = blob(f"action {i}")
        req = fastpb.UpdateActionResultRequest()
        req.action_digest.CopyFrom(action)
        req.action_result.CopyFrom(result)
        await client.update_action_result(req)
        actions.append(action)
    return actions


async def hammer(
    server: ServerProcess, kind: str, actions: list[fastpb.Message], seconds: float, conc: int
) -> dict[str, float]:
    nch = 4
    clients = [AioClient(server.target) for _ in range(nch)]
    for c in clients:  # connect
        await c.get_capabilities(CapsRequest())
    requests = []
    for a in actions:
        r = fastpb.GetActionResultRequest()
        r.action_digest.CopyFrom(a)
        requests.append(r)
    latencies: list[float] = []
    stop_at = 0.0

    async def worker(i: int) -> None:
        client = clients[i % nch]
        rng = random.Random(i)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            if kind == "get_action_result":
                res = await client.get_action_result(rng.choice(requests))
                assert len(res.output_files) == 3
            else:
                await client.get_capabilities(CapsRequest())
            latencies.append(time.perf_counter() - t0)

    with CpuMeter(server) as m:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(worker(i) for i in range(conc)))
    for c in clients:
        await c.close()
    n = len(latencies)
    return {
        "rate": n / m.wall,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "server_pct": m.server_pct,
        "client_pct": m.client_pct,
        "server_us": 1e6 * m.server_cpu / n,
        "other_pct": m.other_pct,
    }


async def run(server: ServerProcess, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    setup = AioClient(server.target)
    actions = await populate(setup, args.entries)
    await setup.close()
    out = {}
    for kind in ("get_action_result", "get_capabilities"):
        r = await hammer(server, kind, actions, args.seconds, args.concurrency)
        out[kind] = r
        print(
            f"  {kind:<18} {r['rate']:7.0f}/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
            f"server CPU {r['server_pct']:.0f}% ({r['server_us']:.0f} us/call)  "
            f"client CPU {r['client_pct']:.0f}%  other {r['other_pct']:.0f}%",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--entries", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    banner(
        f"GetActionResult hits, {args.entries} entries, concurrency {args.concurrency} "
        f"over 4 channels, {args.seconds:.0f}s",
        fs=True,
    )
    with reexecd() as server:
        res = asyncio.run(run(server, args))
    gar, caps = res["get_action_result"], res["get_capabilities"]
    print(quiet_note())
    print()
    print(
        table(
            [
                "RPC",
                "calls/s",
                "server CPU %",
                "server us/call",
                "p50 ms",
                "baseline (GetCapabilities/s)",
                "ratio",
                "target",
                "met?",
            ],
            [
                [
                    "GetActionResult (hit)",
                    gar["rate"],
                    gar["server_pct"],
                    gar["server_us"],
                    gar["p50_ms"],
                    caps["rate"],
                    f"{gar['rate'] / caps['rate']:.2f}",
                    f">= {TARGET:,.0f}/s",
                    "yes" if gar["rate"] >= TARGET else "no",
                ],
                [
                    "GetCapabilities",
                    caps["rate"],
                    caps["server_pct"],
                    caps["server_us"],
                    caps["p50_ms"],
                    caps["rate"],
                    "1.00",
                    "-",
                    "-",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
