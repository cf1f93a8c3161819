"""Scheduler throughput: Execute calls/s through `reexecd scheduler` with instantly-finishing workers.

  server:  `reexecd scheduler` (CAS, action cache, scheduler; no worker) as a subprocess, default
           stores (verifying filesystem CAS), worker_timeout_s = 3600 (no keepalives needed),
           launched through this script so the scheduler records its own queue->dispatch times
           (`--serve-instrumented`: wraps Scheduler.apply and WorkerService._start_message, then
           runs reexec.daemon.cli.main unchanged; the lists are written out at exit).
  workers: N fake workers in this process, grpcio.aio WorkerApi.Connect streams, several slots
           each; every StartExecute is answered at once with Finished (exit code 0).
  clients: 64 concurrent Execute callers (grpcio.aio, fastpb messages) over 8 channels, each
           running distinct pre-uploaded actions (do_not_cache: no cache lookup, no merging, no
           action cache write) until all are done.
  baseline (same run): GetCapabilities calls/s, same concurrency and channels: the floor of one
           RPC through grpclib + trio-asyncio in this server.

Latencies:
  queue->dispatch  (scheduler side) op.dispatched_at - op.queued_at, from the operation records;
  queue->StartExecute built (scheduler side) incl. the sender's two CAS reads (Action, Command);
  queue->worker received: StartExecute.queued_timestamp to the fake worker's receive (wall
                   clocks of the two processes; includes this busy client process's loop lag).
A second, light phase (1 caller, 500 more actions) gives the same latencies when the
scheduler is not saturated.
Targets: >= 1,000 actions/s; p99 queue->dispatch < 5 ms while workers are free (slots > callers).

Usage: .venv/bin/python bench/scheduler_throughput.py [--actions 10000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sched_common import (
    REAPI,
    AioClient,
    CpuMeter,
    banner,
    execute_response,
    percentile,
    reexecd,
    table,
    verdict,
)

TARGET_RATE = 1000.0
TARGET_P99_MS = 5.0

SCRIPT = str(Path(__file__).resolve())
CONFIG = """
[scheduler]
worker_timeout_s = 3600
client_action_timeout_s = 0
"""
# --cas memory (diagnostic): how much of the cost is the filesystem CAS.
MEMORY_STORES = """
[cas]
type = "memory"
[action_cache]
type = "memory"
"""


# -- the instrumented server (runs in the subprocess) ----------------------------------------


def serve_instrumented(out_path: str, argv: list[str]) -> int:
    import trio_asyncio  # noqa: F401  (before grpclib, as reexec.daemon.cli does)

    from reexec.daemon.cli import main
    from reexec.sched import scheduler as sched_mod
    from reexec.sched import worker_service as ws
    from reexec.sched.state import Dispatched

    dispatch: list[float] = []
    built: list[float] = []
    orig_apply = sched_mod.Scheduler.apply
    orig_start = ws.WorkerService._start_message

    async def apply(self, name, event):  # type: ignore[no-untyped-def]
        new = await orig_apply(self, name, event)  # async since the state store (issue 11)
        if new is not None and type(event) is Dispatched:
            dispatch.append(new.dispatched_at - new.queued_at)
        return new

    async def start_message(self, op):  # type: ignore[no-untyped-def]
        msg = await orig_start(self, op)
        built.append(self.scheduler.now() - op.queued_at)  # records carry wall-clock times
        return msg

    sched_mod.Scheduler.apply = apply  # type: ignore[method-assign]
    ws.WorkerService._start_message = start_message  # type: ignore[method-assign]
    # --without (diagnostic): turn fast paths off to measure what each one saves.
    without = set(filter(None, os.environ.get("BENCH_SCHED_WITHOUT", "").split(",")))
    if "batch" in without:  # the sender sends one message per crossing
        ws.SEND_BATCH = 1
    if "blobs" in without:  # StartExecute reads the Action and Command from the CAS again
        from reexec.sched.action_blobs import ActionBlobs

        ActionBlobs.put = lambda self, digest, action, command: None  # type: ignore[method-assign]
    try:
        return main(argv)
    finally:
        with open(out_path, "w") as f:
            json.dump({"dispatch": dispatch, "built": built}, f)


# -- the benchmark -----------------------------------------------------------------------------


def sha(data: bytes):  # type: ignore[no-untyped-def]
    from reexec import fastpb

    return fastpb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


async def upload_actions(client: AioClient, n: int, run_id: str) -> list:
    """n distinct do_not_cache Actions (+ Commands, + the empty input root); their digests."""
    from reexec import fastpb

    root = fastpb.Directory().SerializeToString()
    root_d = sha(root)
    digests = []
    blobs: list[tuple[object, bytes]] = []
    for i in range(n):
        cmd = fastpb.Command(arguments=["/bin/true"])
        cmd.environment_variables.add(name="SALT", value=f"{run_id}-{i}")
        cb = cmd.SerializeToString()
        action = fastpb.Action(do_not_cache=True)
        action.command_digest.CopyFrom(sha(cb))
        action.input_root_digest.CopyFrom(root_d)
        ab = action.SerializeToString()
        ad = sha(ab)
        digests.append(ad)
        blobs += [(sha(cb), cb), (ad, ab)]
    blobs.append((root_d, root))
    batches = [blobs[i : i + 500] for i in range(0, len(blobs), 500)]

    async def send(batch: list) -> None:
        req = fastpb.BatchUpdateBlobsRequest()
        for d, data in batch:
            r = req.requests.add(data=data)
            r.digest.CopyFrom(d)
        resp = await client.batch_update_blobs(req)
        bad = [r for r in resp.responses if r.status.code != 0]
        assert not bad, bad[:3]

    sem = asyncio.Semaphore(4)

    async def guarded(batch: list) -> None:
        async with sem:
            await send(batch)

    await asyncio.gather(*(guarded(b) for b in batches))
    return digests


class FakeWorker:
    """Registers with `slots` slots and finishes every StartExecute at once (exit code 0)."""

    def __init__(self, client: AioClient, worker_id: str, slots: int) -> None:
        self.client = client
        self.worker_id = worker_id
        self.slots = slots
        self.received: list[float] = []  # queued_timestamp -> receive, seconds
        self.ready = asyncio.Event()

    async def run(self) -> None:
        import grpc.aio

        from reexec import fastpb

        WorkerMessage = fastpb.message_class("reexec.worker.v1.WorkerMessage")
        call = self.client.connect()
        reg = WorkerMessage()
        reg.register.worker_id = self.worker_id
        reg.register.max_inflight_tasks = self.slots
        await call.write(reg)
        hello = await call.read()
        assert hello.WhichOneof("kind") == "registered", hello
        self.ready.set()
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                if msg.WhichOneof("kind") != "start_execute":
                    continue
                now = time.time()
                s = msg.start_execute
                q = s.queued_timestamp
                self.received.append(now - (q.seconds + q.nanos / 1e9))
                out = WorkerMessage()
                f = out.finished
                f.operation_name = s.operation_name
                f.attempt = s.attempt
                f.result.exit_code = 0
                await call.write(out)
        except asyncio.CancelledError:
            call.cancel()
            raise


# Operation messages received per stage (the Execute streams' share of the server's messages).
STAGES: Counter[str] = Counter()


def _stage(op) -> str:  # type: ignore[no-untyped-def]
    from reexec import fastpb

    meta = fastpb.message_class(f"{REAPI}.ExecuteOperationMetadata")()
    op.metadata.Unpack(meta)
    return {0: "UNKNOWN", 1: "CACHE_CHECK", 2: "QUEUED", 3: "EXECUTING", 4: "COMPLETED"}.get(
        meta.stage, str(meta.stage)
    )


async def run_executes(clients: list[AioClient], digests: list, concurrency: int) -> list[float]:
    from reexec import fastpb

    latencies: list[float] = []
    it = iter(digests)

    async def caller(i: int) -> None:
        client = clients[i % len(clients)]
        for d in it:
            req = fastpb.ExecuteRequest()
            req.action_digest.CopyFrom(d)
            t0 = time.perf_counter()
            last = None
            async for op in client.execute(req):
                last = op
                STAGES[_stage(op)] += 1
            latencies.append(time.perf_counter() - t0)
            assert last is not None and last.done, last
            resp = execute_response(last)
            assert resp.status.code == 0 and resp.result.exit_code == 0, resp

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return latencies


async def run_capabilities(clients: list[AioClient], concurrency: int, seconds: float) -> int:
    from reexec import fastpb

    req = fastpb.message_class(f"{REAPI}.GetCapabilitiesRequest")()
    stop = time.perf_counter() + seconds
    count = 0

    async def caller(i: int) -> None:
        nonlocal count
        client = clients[i % len(clients)]
        while time.perf_counter() < stop:
            await client.get_capabilities(req)
            count += 1

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return count


async def bench(args: argparse.Namespace) -> None:
    banner("scheduler throughput: Execute through `reexecd scheduler`, instant fake workers")
    print(
        f"{args.actions:,} distinct do_not_cache actions, {args.concurrency} concurrent callers "
        f"over {args.channels} channels, {args.workers} fake workers x {args.slots} slots",
        flush=True,
    )
    if args.without:
        os.environ["BENCH_SCHED_WITHOUT"] = args.without  # read by the server it starts
        print(f"server fast paths turned off: {args.without}", flush=True)
    fd, stats_path = tempfile.mkstemp(prefix="reexec-bench-sched-", suffix=".json")
    os.close(fd)
    launcher = [SCRIPT, "--serve-instrumented", stats_path]
    config = CONFIG + (MEMORY_STORES if args.cas == "memory" else "")
    try:
        with reexecd("scheduler", config, name="scheduler", launcher=launcher) as server:
            clients = [AioClient(server.target) for _ in range(args.channels)]
            t0 = time.perf_counter()
            run_id = os.urandom(4).hex()
            digests = await upload_actions(clients[0], args.actions + args.light_actions, run_id)
            digests, light = digests[: args.actions], digests[args.actions :]
            n_blobs = 2 * (args.actions + args.light_actions) + 1
            print(f"uploaded {n_blobs:,} blobs in {time.perf_counter() - t0:.1f}s", flush=True)
            workers = [
                FakeWorker(AioClient(server.target), f"fake-{i}", args.slots)
                for i in range(args.workers)
            ]
            tasks = [asyncio.ensure_future(w.run()) for w in workers]
            await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in workers)), 10)

            # Warm up both paths (connections, first-call costs), then measure.
            await run_capabilities(clients, args.concurrency, 0.5)
            warm = await upload_actions(clients[0], 200, os.urandom(4).hex())
            await run_executes(clients, warm, args.concurrency)
            for w in workers:
                w.received.clear()

            with CpuMeter(server) as caps_m:
                caps = await run_capabilities(clients, args.concurrency, args.caps_seconds)
            caps_rate = caps / caps_m.wall
            print(f"GetCapabilities: {caps_rate:,.0f}/s ({caps_m.summary()})", flush=True)

            STAGES.clear()
            with CpuMeter(server) as m:
                latencies = await run_executes(clients, digests, args.concurrency)
            rate = len(latencies) / m.wall
            per = ", ".join(f"{k} {v / len(latencies):.2f}" for k, v in sorted(STAGES.items()))
            print(
                f"Operation messages per Execute: {sum(STAGES.values()) / len(latencies):.2f} ({per})"
            )
            us = 1e6 * m.server_cpu / len(latencies)
            print(
                f"Execute: {len(latencies):,} in {m.wall:.1f}s = {rate:,.0f} actions/s "
                f"({m.summary()}; {us:.0f} us server CPU per action, so one core caps it at "
                f"{1e6 / us:,.0f}/s; GetCapabilities: "
                f"{1e6 * caps_m.server_cpu / caps:.0f} us per call)",
                flush=True,
            )
            received = [x for w in workers for x in w.received]

            # Light load: few callers, so the scheduler is not saturated and workers are free.
            for w in workers:
                w.received.clear()
            with CpuMeter(server) as lm:
                light_lat = await run_executes(clients, light, args.light_concurrency)
            light_received = [x for w in workers for x in w.received]
            print(
                f"light load: {len(light_lat):,} Executes, {args.light_concurrency} callers: "
                f"{len(light_lat) / lm.wall:,.0f} actions/s ({lm.summary()})",
                flush=True,
            )
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in clients + [w.client for w in workers]:
                await c.close()
            # Stop the server here so it writes its latency lists before the data dir goes.
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(timeout=30)
        sched = json.loads(Path(stats_path).read_bytes())  # noqa: ASYNC240 - tiny, once
    finally:
        os.unlink(stats_path)

    # The scheduler recorded the 200 warm-up actions first, then the two measured phases.
    n, k = len(digests), len(light)
    dispatch = sched["dispatch"][-(n + k) : -k]
    built = sched["built"][-(n + k) : -k]
    light_dispatch = sched["dispatch"][-k:]
    light_built = sched["built"][-k:]

    def ms(values: list[float], p: float) -> float:
        return 1000 * percentile(values, p)

    print()
    print(
        table(
            ["latency (ms)", "p50", "p90", "p99", "max"],
            [
                [name, ms(v, 50), ms(v, 90), ms(v, 99), ms(v, 100)]
                for name, v in [
                    ("queue -> dispatch (scheduler)", dispatch),
                    ("queue -> StartExecute built (scheduler)", built),
                    ("queue -> worker received", received),
                    ("Execute end to end (client)", latencies),
                    (
                        f"light ({args.light_concurrency} callers): queue -> dispatch",
                        light_dispatch,
                    ),
                    ("light: queue -> StartExecute built", light_built),
                    ("light: queue -> worker received", light_received),
                    ("light: Execute end to end", light_lat),
                ]
            ],
        )
    )
    p99 = ms(dispatch, 99)
    print()
    print(
        table(
            ["benchmark", "figure", "baseline", "ratio", "target", "met?"],
            [
                [
                    f"Execute throughput, {args.concurrency} callers, instant workers",
                    f"{rate:,.0f} actions/s",
                    f"{caps_rate:,.0f} GetCapabilities/s",
                    f"{rate / caps_rate:.2f}",
                    f">= {TARGET_RATE:,.0f}/s",
                    verdict(rate >= TARGET_RATE),
                ],
                [
                    f"p99 queue -> dispatch, workers free, {args.concurrency} callers",
                    f"{p99:.2f} ms (p50 {ms(dispatch, 50):.2f})",
                    "-",
                    "-",
                    f"< {TARGET_P99_MS:g} ms",
                    verdict(p99 < TARGET_P99_MS),
                ],
                [
                    f"p99 queue -> worker received, {args.concurrency} callers (saturated)",
                    f"{ms(received, 99):.1f} ms (p50 {ms(received, 50):.1f})",
                    "-",
                    "-",
                    f"< {TARGET_P99_MS:g} ms",
                    verdict(ms(received, 99) < TARGET_P99_MS),
                ],
                [
                    f"p99 queue -> worker received, {args.light_concurrency} callers",
                    f"{ms(light_received, 99):.2f} ms (p50 {ms(light_received, 50):.2f})",
                    f"queue -> dispatch p99 {ms(light_dispatch, 99):.2f} ms",
                    "-",
                    f"< {TARGET_P99_MS:g} ms",
                    verdict(ms(light_received, 99) < TARGET_P99_MS),
                ],
            ],
        )
    )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-instrumented":
        sys.exit(serve_instrumented(sys.argv[2], sys.argv[3:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--actions", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--caps-seconds", type=float, default=5.0)
    p.add_argument("--light-actions", type=int, default=500)
    p.add_argument("--light-concurrency", type=int, default=1)
    p.add_argument(
        "--without",
        default="",
        help="comma-separated fast paths to turn off in the server (diagnostic): batch "
        "(one StartExecute per crossing), blobs (StartExecute re-reads the Action and Command)",
    )
    p.add_argument(
        "--cas",
        choices=["filesystem", "memory"],
        default="filesystem",
        help="server stores: the default config (verifying filesystem CAS) or memory (diagnostic)",
    )
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
