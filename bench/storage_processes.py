"""`reexecd storage` with `[server] processes = 1` vs `2`: small-blob RPCs, FindMissingBlobs and
GetActionResult hits per second, each next to a floor measured on the same server in the run.

For each process count a `reexecd storage` subprocess is started (verifying filesystem CAS, the
action cache in a throw-away redis-server behind the completeness check: with processes > 1 the
action cache must be shared), then for `--seconds` each:
  small blobs      FindMissingBlobs + ByteStream Write + Read of distinct 4 KiB blobs (the
                   round trip of bench/small_blobs.py), RPC/s = 3 per round trip;
  FindMissingBlobs calls/s, each with `--digests` digests, half present (bench/find_missing.py's
                   request builder);
  GetActionResult  hits/s on 200 entries with 3 outputs each (bench/get_action_result.py's setup);
  floor            GetCapabilities calls/s, the cheapest RPC through the same server.
Load: `--concurrency` tasks per client process over `--channels` connections each (many
connections, so SO_REUSEPORT can spread them), `--clients` client processes (grpcio.aio). Server
CPU is the supervisor plus its children; each child's share is printed, to show both served.
On a 2-core machine the client processes compete with the servers for the same two cores.

Usage: .venv/bin/python bench/storage_processes.py [--seconds 6] [--clients 1] [--processes 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    AioClient,
    banner,
    percentile,
    proc_cpu_seconds,
    server_process,
    table,
    user_process_cpu,
)
from find_missing import make_request, make_sets
from get_action_result import CapsRequest, ac_config, populate, redis_server
from small_blobs import BLOB, round_trip

from reexec import fastpb

KINDS = ("small blobs", "FindMissingBlobs", "GetActionResult", "floor: GetCapabilities")


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def cpu_of(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = proc_cpu_seconds(pid)
    return out


# -- one client process -------------------------------------------------------------------------


async def _load(
    target: str, kind: str, seconds: float, conc: int, nch: int, payload: object
) -> dict[str, object]:
    clients = [AioClient(target) for _ in range(nch)]
    for c in clients:  # connect every channel before the clock starts
        await c.get_capabilities(CapsRequest())
    latencies: list[float] = []
    rng = random.Random(os.getpid())
    stop_at = time.perf_counter() + seconds

    async def one(client: AioClient) -> None:
        if kind == "small blobs":
            data = os.urandom(BLOB)
            await round_trip(client, data, hashlib.sha256(data).hexdigest())
        elif kind == "FindMissingBlobs":
            resp = await client.find_missing_blobs(payload)
            assert resp.missing_blob_digests
        elif kind == "GetActionResult":
            res = await client.get_action_result(rng.choice(payload))  # type: ignore[arg-type]
            assert len(res.output_files) == 3
        else:
            await client.get_capabilities(CapsRequest())

    async def worker(i: int) -> None:
        client = clients[i % nch]
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await one(client)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    c0 = os.times()
    await asyncio.gather(*(worker(i) for i in range(conc)))
    c1 = os.times()
    wall = time.perf_counter() - t0
    for c in clients:
        await c.close()
    return {
        "n": len(latencies),
        "wall": wall,
        "cpu": (c1.user + c1.system) - (c0.user + c0.system),
        "latencies": latencies,
    }


def client_main(
    target: str, kind: str, seconds: float, conc: int, nch: int, payload: object
) -> dict[str, object]:
    if kind == "FindMissingBlobs":
        payload = fastpb.FindMissingBlobsRequest.FromString(payload)  # type: ignore[arg-type]
    elif kind == "GetActionResult":
        reqs = []
        for raw in payload:  # type: ignore[attr-defined]
            r = fastpb.GetActionResultRequest()
            r.action_digest.CopyFrom(fastpb.Digest.FromString(raw))
            reqs.append(r)
        payload = reqs
    return asyncio.run(_load(target, kind, seconds, conc, nch, payload))


# -- one server -------------------------------------------------------------------------------


async def _setup(target: str, present: list[tuple[bytes, str]], entries: int) -> list[bytes]:
    client = AioClient(target)
    for i in range(0, len(present), 500):
        req = fastpb.BatchUpdateBlobsRequest()
        for data, h in present[i : i + 500]:
            r = req.requests.add(data=data)
            r.digest.hash, r.digest.size_bytes = h, len(data)
        resp = await client.batch_update_blobs(req)
        assert all(r.status.code == 0 for r in resp.responses)
    actions = await populate(client, entries)
    await client.close()
    return [a.SerializeToString() for a in actions]


def measure(
    processes: int, args: argparse.Namespace, ac: str, pool: concurrent.futures.Executor
) -> dict[str, dict[str, float]]:
    cfg = Path(tempfile.mkdtemp(prefix="reexec-bench-procs-")) / "storage.toml"
    cfg.write_text(f"[server]\nprocesses = {processes}\n{ac}")
    present, absent = make_sets(args.digests)
    fmb_raw = make_request(present, absent)
    argv = ["-m", "reexec.daemon", "storage", "--config", str(cfg), "--data-dir", "{data_dir}"]
    argv += ["--listen", "127.0.0.1:{port}", "--log-level", "warning"]
    out: dict[str, dict[str, float]] = {}
    with server_process(argv, name=f"storage-{processes}") as server:
        # The port answers once one child listens; wait for all of them.
        deadline = time.monotonic() + 30
        while processes > 1 and len(children_of(server.pid)) < processes:
            if time.monotonic() > deadline:
                raise RuntimeError("children did not start")
            time.sleep(0.1)
        time.sleep(1.0 if processes > 1 else 0.2)
        actions = asyncio.run(_setup(server.target, present, args.entries))
        pids = [server.pid, *children_of(server.pid)]
        for kind in KINDS:
            payload: object = {"FindMissingBlobs": fmb_raw, "GetActionResult": actions}.get(kind)
            cpu0, t0 = cpu_of(pids), time.perf_counter()
            other0 = user_process_cpu([os.getpid(), *pids])
            futures = [
                pool.submit(
                    client_main,
                    server.target,
                    kind,
                    args.seconds,
                    args.concurrency,
                    args.channels,
                    payload,
                )
                for _ in range(args.clients)
            ]
            results = [f.result() for f in futures]
            wall = time.perf_counter() - t0
            cpu1 = cpu_of(pids)
            client_pids = set(pool._processes)  # type: ignore[attr-defined]
            other = user_process_cpu([os.getpid(), *pids, *client_pids]) - other0
            n = sum(int(r["n"]) for r in results)
            run_wall = max(float(r["wall"]) for r in results)
            lat = [x for r in results for x in r["latencies"]]  # type: ignore[attr-defined]
            server_cpu = sum(cpu1.get(p, 0) - cpu0.get(p, 0) for p in pids)
            per_child = [cpu1.get(p, 0) - cpu0.get(p, 0) for p in pids[1:]] or [server_cpu]
            rpcs = 3 * n if kind == "small blobs" else n
            row = {
                "rate": rpcs / run_wall,
                "p50_ms": 1000 * percentile(lat, 50),
                "server_pct": 100 * server_cpu / wall,
                "server_us": 1e6 * server_cpu / rpcs,
                "client_pct": 100 * sum(float(r["cpu"]) for r in results) / wall,
                "children_pct": [100 * c / wall for c in per_child],  # type: ignore[dict-item]
                "other_pct": 100 * max(0.0, other) / wall,
            }
            out[kind] = row
            unit = "RPC/s" if kind == "small blobs" else "calls/s"
            kids = "/".join(f"{c:.0f}" for c in row["children_pct"])  # type: ignore[attr-defined]
            print(
                f"  processes={processes} {kind:<24} {row['rate']:7.0f} {unit:<7} "
                f"p50 {row['p50_ms']:.1f} ms  server CPU {row['server_pct']:.0f}% "
                f"(per process {kids}%, {row['server_us']:.0f} us/RPC)  "
                f"clients {row['client_pct']:.0f}%  other {row['other_pct']:.0f}%",
                flush=True,
            )
        # A child that died and was restarted would make the per-process figures wrong.
        problems = [
            line
            for line in server.log_path.read_text(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line
        ]
        for line in problems[:10]:
            print(f"  server log: {line}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--digests", type=int, default=100)
    ap.add_argument("--entries", type=int, default=200)
    args = ap.parse_args()
    counts = [int(p) for p in args.processes.split(",")]
    banner(
        f"reexecd storage, processes {args.processes}: {args.clients} client process(es) x "
        f"{args.concurrency} tasks over {args.channels} connections, {args.seconds:.0f}s per "
        f"figure; FindMissingBlobs of {args.digests} digests",
        fs=True,
    )
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
    results = {}
    ctx = multiprocessing.get_context("spawn")  # grpcio must not be forked
    with (
        redis_server() as (url, _redis),
        concurrent.futures.ProcessPoolExecutor(args.clients, mp_context=ctx) as pool,
    ):
        pool.submit(int, 0).result()  # start the client processes before measuring
        ac = ac_config("redis", url)
        for n in counts:
            results[n] = measure(n, args, ac, pool)
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")
    print()
    rows = []
    for kind in KINDS:
        for n in counts:
            r, floor = results[n][kind], results[n]["floor: GetCapabilities"]
            base = results[counts[0]][kind]
            rows.append(
                [
                    kind,
                    n,
                    r["rate"],
                    floor["rate"],
                    f"{r['rate'] / floor['rate']:.2f}",
                    f"{r['rate'] / base['rate']:.2f}x",
                    r["server_us"],
                    r["server_pct"],
                    r["client_pct"],
                ]
            )
    print(
        table(
            [
                "workload",
                "processes",
                "rate/s",
                "floor/s (GetCapabilities)",
                "rate/floor",
                f"vs processes={counts[0]}",
                "server us/RPC",
                "server CPU %",
                "client CPU %",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
