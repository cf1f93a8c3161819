"""GetActionResult hits per second at concurrency 32 against a `reexecd serve` subprocess.

Setup: 200 action cache entries, each an ActionResult with 3 output files and stdout whose blobs
were uploaded first (BatchUpdateBlobs), stored with UpdateActionResult. The default config checks
completeness on every hit (the referenced blobs must still be in the CAS).
Then 32 concurrent tasks over 4 channels call GetActionResult on random entries for a fixed time.
Floors in the same run, same load shape: GetActionResult against bench/_echo_server.py (plain
grpclib on plain asyncio answering a fixed ActionResult: the framework's floor, issue 13's), and
GetCapabilities on reexecd (its cheapest RPC).
Client: grpcio.aio with reexec.fastpb messages.

`--action-cache memory|redis` replaces the filesystem action cache under the completeness check
(redis: a redis-server started for the run on a unix socket, no persistence; its CPU is shown).

Usage: .venv/bin/python bench/get_action_result.py [--seconds 8] [--entries 200]
       [--action-cache filesystem|memory|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REAPI,
    AioClient,
    CpuMeter,
    ServerProcess,
    banner,
    percentile,
    proc_cpu_seconds,
    quiet_note,
    reexecd,
    server_process,
    table,
)

from reexec import fastpb

TARGET = 2200.0
ECHO = str(Path(__file__).resolve().parent / "_echo_server.py")
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


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A throw-away redis-server on a unix socket: (url, process)."""
    tmp = Path(tempfile.mkdtemp(prefix="reexec-bench-redis-"))
    sock = tmp / "redis.sock"
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield f"unix://{sock}", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def ac_config(kind: str, url: str) -> str:
    inner = {"memory": 'type = "memory"', "redis": f'type = "redis"\nurl = "{url}"'}[kind]
    return f'[action_cache]\ntype = "completeness_checking"\n[action_cache.inner]\n{inner}\n'


async def hammer(
    server: ServerProcess,
    kind: str,
    actions: list[fastpb.Message],
    seconds: float,
    conc: int,
    redis_pid: int | None = None,
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
            elif kind == "echo_get_action_result":  # the echo's fixed answer
                await client.get_action_result(rng.choice(requests))
            else:
                await client.get_capabilities(CapsRequest())
            latencies.append(time.perf_counter() - t0)

    r0 = proc_cpu_seconds(redis_pid) if redis_pid else 0.0
    with CpuMeter(server) as m:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(worker(i) for i in range(conc)))
    redis_cpu = (proc_cpu_seconds(redis_pid) - r0) if redis_pid else 0.0
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
        # redis-server is one of the "other" processes; shown on its own too.
        "other_pct": m.other_pct,
        "redis_pct": 100.0 * redis_cpu / m.wall,
    }


async def run(
    server: ServerProcess, args: argparse.Namespace, redis_pid: int | None = None
) -> dict[str, dict[str, float]]:
    setup = AioClient(server.target)
    actions = await populate(setup, args.entries)
    await setup.close()
    out = {}
    for kind in ("get_action_result", "get_capabilities"):
        r = await hammer(server, kind, actions, args.seconds, args.concurrency, redis_pid)
        out[kind] = r
        print(
            f"  {kind:<18} {r['rate']:7.0f}/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
            f"server CPU {r['server_pct']:.0f}% ({r['server_us']:.0f} us/call)  "
            f"client CPU {r['client_pct']:.0f}%  other {r['other_pct']:.0f}%"
            + (f" (redis {r['redis_pct']:.0f}%)" if redis_pid else ""),
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--entries", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--action-cache", choices=["filesystem", "memory", "redis"], default="filesystem"
    )
    args = ap.parse_args()
    banner(
        f"GetActionResult hits, {args.entries} entries, concurrency {args.concurrency} "
        f"over 4 channels, {args.seconds:.0f}s, {args.action_cache} action cache",
        fs=True,
    )
    with contextlib.ExitStack() as stack:
        extra: list[str] = []
        redis_pid = None
        if args.action_cache != "filesystem":
            url = ""
            if args.action_cache == "redis":
                url, redis = stack.enter_context(redis_server())
                redis_pid = redis.pid
            cfg = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "ac.toml"
            cfg.write_text(ac_config(args.action_cache, url))
            extra = ["--config", str(cfg)]
        server = stack.enter_context(reexecd(extra))
        res = asyncio.run(run(server, args, redis_pid))
    with server_process([ECHO, "{port}", "asyncio"], name="echo") as echo:
        digests = [
            fastpb.Digest(hash=hashlib.sha256(b"%d" % i).hexdigest(), size_bytes=i)
            for i in range(args.entries)
        ]
        floor = asyncio.run(
            hammer(echo, "echo_get_action_result", digests, args.seconds, args.concurrency)
        )
    print(
        f"  floor: echo GetActionResult {floor['rate']:7.0f}/s  server CPU "
        f"{floor['server_pct']:.0f}% ({floor['server_us']:.0f} us/call)  other "
        f"{floor['other_pct']:.0f}%",
        flush=True,
    )
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
                "floor: echo GAR/s",
                "ratio",
                "GetCapabilities/s",
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
                    floor["rate"],
                    f"{gar['rate'] / floor['rate']:.2f}",
                    caps["rate"],
                    f">= {TARGET:,.0f}/s",
                    "yes" if gar["rate"] >= TARGET else "no",
                ],
                [
                    "GetCapabilities",
                    caps["rate"],
                    caps["server_pct"],
                    caps["server_us"],
                    caps["p50_ms"],
                    floor["rate"],
                    f"{caps['rate'] / floor['rate']:.2f}",
                    caps["rate"],
                    "-",
                    "-",
                ],
                [
                    "floor: echo GetActionResult",
                    floor["rate"],
                    floor["server_pct"],
                    floor["server_us"],
                    floor["p50_ms"],
                    floor["rate"],
                    "1.00",
                    "-",
                    "-",
                    "-",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
