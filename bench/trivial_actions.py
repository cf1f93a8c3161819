"""Trivial actions end to end: `/bin/true` with 10 small inputs through `reexecd serve`.

  server:   `reexecd serve` (scheduler + local worker in one process) as a subprocess, default
            stores, `[worker] max_inflight_tasks = 2`.
  client:   grpclib on asyncio in this process (fastpb messages), 2 channels, 8 concurrent
            tasks; per action, as Bazel does: FindMissingBlobs (10 inputs, the input root's
            Directory, Command, Action) -> BatchUpdateBlobs of the missing ones -> Execute
            (skip_cache_lookup, like --noremote_accept_cached; results go to the action cache)
            until the Operation is done; exit code checked.
  phases:   shared:   200 actions with the same 10 input files, distinct SALT env (the target);
            distinct: 200 actions whose 10 input files are all distinct (new blobs every time:
                      upload, first fetch into the worker cache, new input tree to plan).
  baseline: the same command run locally with subprocess.run, sequentially and 2 at a time
            (threads), in the same run.

Target: >= 150 actions/s (shared inputs).

Usage: .venv/bin/python bench/trivial_actions.py [--actions 200] [--concurrency 8]
           [--confinement host|input_root|off] [--without link,phases,blobs,tamper]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sched_common import CpuMeter, banner, fs_create_cost, percentile, reexecd, table, verdict
from grpclib.client import Channel, UnaryStreamMethod, UnaryUnaryMethod

from reexec import fastpb
from reexec.rpc import StatusDetailsCodec

TARGET = 150.0
SCRIPT = str(Path(__file__).resolve())
ARGV = ["/bin/true"]
CONFIG = """
[worker]
max_inflight_tasks = 2
[worker.sandbox]
confinement = "{confinement}"
"""
RE = "/build.bazel.remote.execution.v2"


def sha(data: bytes) -> fastpb.Message:
    return fastpb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class Client:
    def __init__(self, port: int) -> None:
        self.channel = Channel("127.0.0.1", port, status_details_codec=StatusDetailsCodec())
        ch = self.channel
        self.find_missing = UnaryUnaryMethod(
            ch,
            f"{RE}.ContentAddressableStorage/FindMissingBlobs",
            fastpb.FindMissingBlobsRequest,
            fastpb.FindMissingBlobsResponse,
        )
        self.batch_update = UnaryUnaryMethod(
            ch,
            f"{RE}.ContentAddressableStorage/BatchUpdateBlobs",
            fastpb.BatchUpdateBlobsRequest,
            fastpb.BatchUpdateBlobsResponse,
        )
        self.execute = UnaryStreamMethod(
            ch, f"{RE}.Execution/Execute", fastpb.ExecuteRequest, fastpb.Operation
        )


class ActionBlobs:
    """An action's blobs: 10 input files in the root Directory, the Command and the Action."""

    def __init__(self, files: list[bytes], salt: str) -> None:
        root = fastpb.Directory()
        self.blobs: dict[str, tuple[fastpb.Message, bytes]] = {}
        for i, data in enumerate(files):
            d = sha(data)
            self.blobs[d.hash] = (d, data)
            node = root.files.add(name=f"in{i:02d}.txt")
            node.digest.CopyFrom(d)
        rb = root.SerializeToString(deterministic=True)
        cmd = fastpb.Command(arguments=ARGV)
        cmd.environment_variables.add(name="SALT", value=salt)
        cb = cmd.SerializeToString()
        action = fastpb.Action()
        action.command_digest.CopyFrom(sha(cb))
        action.input_root_digest.CopyFrom(sha(rb))
        ab = action.SerializeToString()
        for data in (rb, cb, ab):
            d = sha(data)
            self.blobs[d.hash] = (d, data)
        self.action_digest = sha(ab)


async def run_action(client: Client, a: ActionBlobs) -> None:
    fm = fastpb.FindMissingBlobsRequest()
    for d, _ in a.blobs.values():
        fm.blob_digests.append(d)
    missing = (await client.find_missing(fm)).missing_blob_digests
    if missing:
        up = fastpb.BatchUpdateBlobsRequest()
        for d in missing:
            r = up.requests.add(data=a.blobs[d.hash][1])
            r.digest.CopyFrom(d)
        resp = await client.batch_update(up)
        assert all(r.status.code == 0 for r in resp.responses), resp
    req = fastpb.ExecuteRequest(skip_cache_lookup=True)
    req.action_digest.CopyFrom(a.action_digest)
    ops = await client.execute(req)
    last = ops[-1]
    assert last.done, last
    resp = fastpb.ExecuteResponse()
    last.response.Unpack(resp)
    assert resp.status.code == 0 and resp.result.exit_code == 0, resp
    PHASES.append(_phases(resp.result.execution_metadata))


# Per action, from ExecutedActionMetadata (server clock): where the wall time of an action goes.
PHASE_NAMES = ("queued", "inputs", "run", "outputs", "worker total")
PHASES: list[tuple[float, ...]] = []


def _phases(m: fastpb.Message) -> tuple[float, ...]:
    def t(ts: fastpb.Message) -> float:
        return ts.seconds + ts.nanos / 1e9

    return (
        t(m.worker_start_timestamp) - t(m.queued_timestamp),
        t(m.input_fetch_completed_timestamp) - t(m.worker_start_timestamp),
        t(m.execution_completed_timestamp) - t(m.execution_start_timestamp),
        t(m.output_upload_completed_timestamp) - t(m.execution_completed_timestamp),
        t(m.worker_completed_timestamp) - t(m.worker_start_timestamp),
    )


def phase_summary(rows: list[tuple[float, ...]]) -> str:
    cols = list(zip(*rows, strict=True))
    return ", ".join(
        f"{name} p50 {1000 * percentile(list(c), 50):.2f} ms"
        for name, c in zip(PHASE_NAMES, cols, strict=True)
    )


async def drive(clients: list[Client], actions: list[ActionBlobs], concurrency: int) -> list[float]:
    latencies: list[float] = []
    it = iter(actions)

    async def task(i: int) -> None:
        client = clients[i % len(clients)]
        for a in it:
            t0 = time.perf_counter()
            await run_action(client, a)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(task(i) for i in range(concurrency)))
    return latencies


def local_baseline(n: int, parallel: int) -> float:
    """Actions/s running ARGV with subprocess.run, `parallel` at a time."""

    def one(i: int) -> None:
        subprocess.run(ARGV, env={"SALT": f"local-{i}"}, check=True)

    t0 = time.perf_counter()
    if parallel == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t0)


# --without (diagnostic): the server's fast paths to turn off, to measure what each one saves.
WITHOUT = {
    "link": "serve's worker over gRPC on a unix socket instead of the in-process LocalLink",
    "phases": "a Progress message (and record write) for every phase of every action",
    "blobs": "StartExecute re-reads the Action and Command from the CAS",
    "tamper": "input tamper checks always in a worker thread",
}


def serve_patched(argv: list[str]) -> int:
    """The server side of --without: patch, then run reexecd unchanged."""
    import trio_asyncio  # noqa: F401  (before grpclib, as reexec.daemon.cli does)

    from reexec.daemon.cli import main

    without = set(filter(None, os.environ.get("BENCH_WITHOUT", "").split(",")))
    if "link" in without:
        from reexec.daemon.app import Daemon

        Daemon.worker_link = "unix"
    if "phases" in without:
        from reexec.sandbox import agent

        agent.PHASE_REPORT_MIN_INTERVAL_S = 0.0
    if "blobs" in without:
        from reexec.sched.action_blobs import ActionBlobs

        ActionBlobs.put = lambda self, digest, action, command: None  # type: ignore[method-assign]
    if "tamper" in without:
        from reexec.sandbox import tamper_checker

        tamper_checker.INLINE_MAX_FILES = 0
    return main(argv)


def small_files(tag: str) -> list[bytes]:
    return [f"input {tag} {i}\n".encode() + os.urandom(40) for i in range(10)]


async def bench(args: argparse.Namespace) -> None:
    banner("trivial actions through `reexecd serve` (scheduler + local worker, 2 slots)")
    print(f"data dirs under the temp dir: 4 KiB file create {fs_create_cost():.0f} us CPU")
    run_id = os.urandom(4).hex()
    shared = small_files("shared")
    phases = {
        "shared": [ActionBlobs(shared, f"{run_id}-s{i}") for i in range(args.actions)],
        "distinct": [
            ActionBlobs(small_files(f"{run_id}-{i}"), f"{run_id}-d{i}") for i in range(args.actions)
        ],
    }
    warm = [ActionBlobs(shared, f"{run_id}-w{i}") for i in range(20)]
    results = {}
    print(f"worker.sandbox.confinement = {args.confinement!r}")
    config = CONFIG.replace("{confinement}", args.confinement)
    launcher: tuple[str, ...] = ("-m", "reexec.daemon")
    if args.without:
        unknown = set(args.without.split(",")) - set(WITHOUT)
        if unknown:
            raise SystemExit(f"--without: unknown {sorted(unknown)}; known: {sorted(WITHOUT)}")
        os.environ["BENCH_WITHOUT"] = args.without
        launcher = (SCRIPT, "--serve-patched")
        print(f"server fast paths turned off: {args.without}")
    with reexecd("serve", config, name="serve", launcher=launcher) as server:
        clients = [Client(server.port) for _ in range(args.channels)]
        try:
            await drive(clients, warm, args.concurrency)
            for name, actions in phases.items():
                PHASES.clear()
                with CpuMeter(server) as m:
                    lat = await drive(clients, actions, args.concurrency)
                rate = len(lat) / m.wall
                results[name] = (rate, m, lat)
                print(
                    f"{name:8s}: {len(lat)} actions in {m.wall:.2f}s = {rate:.0f} actions/s; "
                    f"latency p50 {1000 * percentile(lat, 50):.1f} ms p99 "
                    f"{1000 * percentile(lat, 99):.1f} ms; {m.summary()}; server CPU "
                    f"{1000 * m.server_cpu / len(lat):.2f} ms/action incl. the actions "
                    f"(main thread {1000 * m.server_main_cpu / len(lat):.2f} ms)",
                    flush=True,
                )
                print(f"{'':8s}  per action on the server: {phase_summary(PHASES)}", flush=True)
        finally:
            for c in clients:
                c.channel.close()

    seq = local_baseline(args.actions, 1)
    par = local_baseline(args.actions, 2)
    print(f"local subprocess.run: sequential {seq:.0f}/s, 2 at a time {par:.0f}/s")
    rate, m, lat = results["shared"]
    drate = results["distinct"][0]
    overhead = 1000 / rate - 1000 / par
    print()
    print(
        table(
            ["benchmark", "figure", "baseline", "ratio", "target", "met?"],
            [
                [
                    "trivial actions, shared inputs, concurrency 8, 2 slots",
                    f"{rate:.0f} actions/s",
                    f"{par:.0f}/s local 2 at a time ({seq:.0f}/s sequential)",
                    f"{rate / par:.2f}",
                    f">= {TARGET:.0f}/s",
                    verdict(rate >= TARGET),
                ],
                [
                    "per-action overhead vs local (2 at a time)",
                    f"{overhead:.2f} ms",
                    f"{1000 / par:.2f} ms local",
                    "-",
                    "-",
                    "-",
                ],
                [
                    "trivial actions, 10 distinct inputs each",
                    f"{drate:.0f} actions/s",
                    f"{rate:.0f}/s shared inputs",
                    f"{drate / rate:.2f}",
                    "-",
                    "-",
                ],
            ],
        )
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-patched":
        sys.exit(serve_patched(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--actions", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument(
        "--without",
        default="",
        help="comma-separated server fast paths to turn off (diagnostic): "
        + "; ".join(f"{k}: {v}" for k, v in WITHOUT.items()),
    )
    p.add_argument(
        "--confinement",
        choices=["host", "input_root", "off"],
        default="host",
        help="the local worker's confinement (default: host, the default config; bubblewrap "
        "alone costs 5-9 ms per action here, see bench/confine_overhead.py)",
    )
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
