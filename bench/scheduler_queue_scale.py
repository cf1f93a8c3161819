"""Scheduler core with a deep queue nobody can serve: does it slow down the actions that can run?

In process, no gRPC: reexec.sched.scheduler.Scheduler with a MemoryActionCache, driven directly
(submit -> check_cache -> dispatch_ready -> finished), workers registered with memory-channel
outboxes that the benchmark drains itself.

  backlog:  100,000 actions whose platform (os=windows) no worker offers, queued first;
  measured: 1,000 actions matching the workers (os=linux): submit+check_cache (enqueue rate), then
            dispatch_ready + drain outboxes + finished until all 1,000 complete (dispatch rate);
  baseline: the same 1,000 on a scheduler with an empty queue, in the same run (interleaved reps).
Memory: tracemalloc, everything the scheduler retains per queued action (100,000 queued).

Targets: dispatch rate with the backlog within 20% of the empty-queue rate; < 2 KiB per
queued action.

Usage: .venv/bin/python bench/scheduler_queue_scale.py [--backlog 100000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import linecache
import math
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from _sched_common import banner, median, table, verdict

from reexec.cas.action_cache import MemoryActionCache
from reexec.cas.digest import Digest, DigestFunction
from reexec.sched.config import SchedulerConfig
from reexec.sched.scheduler import ActionSpec, Scheduler
from reexec.sched.state import Outcome

RULES = {"os": "exact"}
MATCHING = (("os", "linux"),)
UNMATCHED = (("os", "windows"),)
WORKERS, SLOTS = 4, 8
RESULT = Outcome(result=b"\x18\x00")  # a tiny serialized ActionResult
REPS = 7
MEMORY_TARGET = 2048
RATIO_TARGET = 0.8

_counter = 0


def spec(key: tuple[tuple[str, str], ...]) -> ActionSpec:
    global _counter
    _counter += 1
    h = hashlib.sha256(_counter.to_bytes(8, "little")).hexdigest()
    return ActionSpec(
        instance="",
        digest=Digest(h, 140 + _counter % 50, DigestFunction.SHA256),
        priority=0,
        queue_key=key,
        do_not_cache=False,
        skip_cache_lookup=False,
        timeout_s=600.0,
    )


def new_scheduler() -> tuple[Scheduler, list]:
    s = Scheduler(
        SchedulerConfig(
            supported_platform_properties=RULES, worker_timeout_s=1e9, client_action_timeout_s=0
        ),
        MemoryActionCache(1 << 30),
    )
    workers = []
    for i in range(WORKERS):
        send, receive = trio.open_memory_channel(math.inf)
        w = s.register_worker(f"w{i}", [("os", "linux")], SLOTS, send)
        workers.append((w, receive))
    return s, workers


async def enqueue(s: Scheduler, specs: list[ActionSpec]) -> None:
    for sp in specs:
        op, merged = s.submit(sp)
        assert not merged
        await s.check_cache(op)


def drive_dispatch(s: Scheduler, workers: list, n: int) -> int:
    """dispatch_ready / drain outboxes / finished until `n` operations completed."""
    done = rounds = 0
    while done < n:
        s.dispatch_ready()
        rounds += 1
        for w, receive in workers:
            while True:
                try:
                    kind, name, attempt = receive.receive_nowait()
                except trio.WouldBlock:
                    break
                assert kind == "start"
                s.finished(w, name, attempt, RESULT, False)
                done += 1
    return rounds


async def measure_batch(s: Scheduler, workers: list, batch: int) -> tuple[float, float]:
    """(enqueue/s, dispatch+complete/s) for `batch` fresh matching actions."""
    specs = [spec(MATCHING) for _ in range(batch)]
    t0 = time.perf_counter()
    await enqueue(s, specs)
    t1 = time.perf_counter()
    drive_dispatch(s, workers, batch)
    t2 = time.perf_counter()
    assert all(not w.running for w, _ in workers)
    return batch / (t1 - t0), batch / (t2 - t1)


async def memory_per_action(n: int) -> tuple[float, Scheduler, list, list[str]]:
    s, workers = new_scheduler()
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    b0, _ = tracemalloc.get_traced_memory()
    specs = [spec(UNMATCHED) for _ in range(n)]
    await enqueue(s, specs)
    del specs
    gc.collect()
    b1, _ = tracemalloc.get_traced_memory()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    top = []
    for stat in after.compare_to(before, "lineno")[:6]:
        frame = stat.traceback[0]
        line = linecache.getline(frame.filename, frame.lineno).strip()
        top.append(
            f"  {stat.size_diff / n:7.1f} B/action  {Path(frame.filename).name}:{frame.lineno}  {line[:70]}"
        )
    assert len(s.queues) == n
    return (b1 - b0) / n, s, workers, top


async def run(args: argparse.Namespace) -> None:
    banner("scheduler core: dispatch rate with a deep unmatched queue")
    print(f"{WORKERS} workers x {SLOTS} slots (os=linux); backlog os=windows; batch {args.batch}")

    t0 = time.perf_counter()
    per_action, deep, deep_workers, top = await memory_per_action(args.backlog)
    print(
        f"queued {args.backlog:,} unmatched actions in {time.perf_counter() - t0:.1f}s "
        f"(under tracemalloc): {per_action:,.0f} bytes per queued action; largest growth:"
    )
    print("\n".join(top))

    empty, empty_workers = new_scheduler()
    # Warm up both (first-call costs, allocator).
    await measure_batch(empty, empty_workers, args.batch)
    await measure_batch(deep, deep_workers, args.batch)
    e_enq, e_disp, d_enq, d_disp = [], [], [], []
    for _ in range(REPS):
        a, b = await measure_batch(empty, empty_workers, args.batch)
        e_enq.append(a)
        e_disp.append(b)
        a, b = await measure_batch(deep, deep_workers, args.batch)
        d_enq.append(a)
        d_disp.append(b)
    assert len(deep.queues) == args.backlog and len(empty.queues) == 0

    # One dispatch_ready call that finds nothing to do (all slots busy / nothing matching).
    t = time.perf_counter()
    for _ in range(10_000):
        deep.dispatch_ready()
    idle_us = (time.perf_counter() - t) / 10_000 * 1e6

    disp_ratio = median(d_disp) / median(e_disp)
    enq_ratio = median(d_enq) / median(e_enq)
    print(f"\nmedian of {REPS} interleaved batches of {args.batch}:")
    print(
        table(
            ["phase", f"with {args.backlog:,} unmatched queued /s", "empty queue /s", "ratio"],
            [
                ["submit + cache check", median(d_enq), median(e_enq), enq_ratio],
                ["dispatch + finished", median(d_disp), median(e_disp), disp_ratio],
            ],
        )
    )
    print(f"dispatch_ready() with only unmatched work queued: {idle_us:.1f} us per call")
    print(
        table(
            ["benchmark", "figure", "baseline", "ratio", "target", "met?"],
            [
                [
                    "dispatch rate, 100k unmatched queued",
                    f"{median(d_disp):,.0f}/s",
                    f"{median(e_disp):,.0f}/s (empty queue)",
                    f"{disp_ratio:.2f}",
                    f">= {RATIO_TARGET}",
                    verdict(disp_ratio >= RATIO_TARGET),
                ],
                [
                    "scheduler memory per queued action",
                    f"{per_action:,.0f} B",
                    "-",
                    "-",
                    f"< {MEMORY_TARGET} B",
                    verdict(per_action < MEMORY_TARGET),
                ],
            ],
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backlog", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1_000)
    trio.run(run, p.parse_args())


if __name__ == "__main__":
    main()
