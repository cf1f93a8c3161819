"""Scheduler state store: Execute -> COMPLETED with instant fake workers, memory vs Redis state.

Three configurations, one after the other in the same run, each with fresh scheduler processes:
  memory   `[scheduler.state] type = "memory"`, one `reexecd scheduler`;
  redis x1 `type = "redis"` (a throw-away redis-server on a unix socket), one scheduler;
  redis x2 the same Redis and key_prefix, two scheduler processes: client channels and fake
           workers alternate between them, so an Execute taken by one is often dispatched and
           completed by the other (its Execute stream learns of it by pub/sub).
Every scheduler uses the same CAS and action cache: `type = "grpc"` on one `reexecd storage`
node (default stores), so both schedulers of the x2 case read the same Action and Command blobs.
The blobs are uploaded straight to the storage node before measuring. The schedulers are
launched through this script (`--serve-instrumented`), which wraps Scheduler.apply to record
dispatched_at - queued_at of each Dispatched transition and counts apply calls per event type,
compare-and-set conflicts and RedisStateStore round trips (each `_call`), then runs
reexec.daemon.cli.main unchanged.

  workers: 4 fake workers in this process (grpcio.aio WorkerApi.Connect), 32 slots each; every
           StartExecute is answered at once with Finished (exit code 0).
  clients: 64 concurrent Execute callers over 8 channels, distinct do_not_cache actions (no cache
           lookup, no merging, no action cache write), until all are done; then a light phase
           (1 caller) for latencies when nothing is saturated.
  floors (same run): GetCapabilities calls/s against the (first) scheduler of each
           configuration, same callers and channels; raw Redis round trips from a Trio process
           with the client reexec uses (reexec.redis_client.connect, coredis): GET of one key
           and EVALSHA of `return 1`, 1 task (sequential latency) and 16 concurrent tasks.

Latencies: queue -> dispatch (scheduler records), queue -> worker received
(StartExecute.queued_timestamp to the fake worker's receive; wall clocks, includes this client
process's loop lag) and Execute end to end (client).

A fourth configuration, memory-fs, is the reference of scheduler_throughput.py: memory state and
the scheduler's own filesystem CAS (blobs uploaded to it), no storage node in the path.

Usage: .venv/bin/python bench/scheduler_state.py [--actions 2000] [--configs memory-fs,memory,redis1,redis2]
       [--py-spy redis1]   # also record the (first) scheduler of that config with py-spy
       [--patches guess,sender,finished]   # prototype changes in the schedulers (see
                                           # apply_prototypes); results say which were on
       .venv/bin/python bench/scheduler_state.py --py-spy-summary FILE   # summarise a recording
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sched_common import (
    REPO,
    AioClient,
    ServerProcess,
    banner,
    machine_busy_seconds,
    percentile,
    proc_cpu_seconds,
    reexecd,
    self_cpu_seconds,
    table,
)
from scheduler_throughput import FakeWorker, run_capabilities, run_executes, upload_actions

SCRIPT = str(Path(__file__).resolve())
SCHED_CONFIG = """
[scheduler]
worker_timeout_s = 3600
client_action_timeout_s = 0
[scheduler.state]
type = "{state}"
{state_extra}
[cas]
type = "grpc"
url = "grpc://{storage}"
[action_cache]
type = "grpc"
url = "grpc://{storage}"
"""
CONFIGS = {
    "memory-fs": ("memory", 1),  # reference: the scheduler's own filesystem CAS, as in
    # scheduler_throughput.py (blobs uploaded to the scheduler; no storage node in the path)
    "memory": ("memory", 1),
    "redis1": ("redis", 1),
    "redis2": ("redis", 2),
}


# -- the instrumented scheduler (runs in the subprocess) --------------------------------------


def serve_instrumented(out_path: str, argv: list[str]) -> int:
    import trio_asyncio  # noqa: F401  (before grpclib, as reexec.daemon.cli does)

    from reexec.daemon.cli import main
    from reexec.sched import scheduler as sched_mod
    from reexec.sched.state import Dispatched

    apply_prototypes(os.environ.get("BENCH_STATE_PATCHES", ""))  # before the wrappers below
    dispatch: list[float] = []
    applies: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    schedulers: list[object] = []
    orig_apply = sched_mod.Scheduler.apply
    orig_init = sched_mod.Scheduler.__init__

    def init(self, *a, **kw):  # type: ignore[no-untyped-def]
        orig_init(self, *a, **kw)
        schedulers.append(self)

    async def apply(self, name, event):  # type: ignore[no-untyped-def]
        new = await orig_apply(self, name, event)
        applies[type(event).__name__] += 1
        if new is not None and type(event) is Dispatched:
            dispatch.append(new.dispatched_at - new.queued_at)
        return new

    sched_mod.Scheduler.__init__ = init  # type: ignore[method-assign]
    sched_mod.Scheduler.apply = apply  # type: ignore[method-assign]
    try:
        from reexec.sched import redis_state

        orig_call = redis_state.RedisStateStore._call

        def call(self, what):  # type: ignore[no-untyped-def]
            calls[what] += 1
            return orig_call(self, what)

        redis_state.RedisStateStore._call = call  # type: ignore[method-assign]
    except ImportError:
        pass

    def dump(*_: object) -> None:
        conflicts = sum(s.stats.conflicts for s in schedulers)
        with open(out_path, "w") as f:
            json.dump(
                {
                    "dispatch": dispatch,
                    "applies": applies,
                    "calls": calls,
                    "conflicts": conflicts,
                },
                f,
            )

    # SIGUSR1: write the counters so far (the parent reads them between phases).
    signal.signal(signal.SIGUSR1, lambda *_: dump())
    try:
        return main(argv)
    finally:
        dump()


def _patch_source(cls: type, method: str, old: str, new: str) -> None:
    """Replace `method` of `cls` by its own source with `old` replaced by `new` (prototype)."""
    import inspect
    import sys as _sys
    import textwrap

    src = inspect.getsource(getattr(cls, method))
    if old not in src:
        raise RuntimeError(f"prototype patch of {cls.__name__}.{method} no longer applies")
    src = textwrap.dedent(src.replace(old, new))
    namespace = dict(vars(_sys.modules[cls.__module__]))
    exec(compile(src, f"<prototype {method}>", "exec"), namespace)
    setattr(cls, method, namespace[method])


def apply_prototypes(names: str) -> None:
    """Prototype changes to reexec, for measuring proposals; not production code.

    guess:    Scheduler.apply first tries the compare-and-set against the record this process
              last wrote or read (`_recent`), reading the store only when that fails;
    sender:   WorkerService._sender takes the dispatched record from `_recent` (no re-read);
    finished: WorkerService._finished takes the record from `_recent` (no extra read)."""
    from reexec.sched import scheduler as sched_mod
    from reexec.sched import worker_service as ws

    for name in filter(None, names.split(",")):
        if name == "guess":
            _patch_source(
                sched_mod.Scheduler,
                "apply",
                "        for _ in range(MAX_CAS_ATTEMPTS):\n"
                "            old = await self.store.get(name)\n",
                "        guess = self._recent.get(name)\n"
                "        for _ in range(MAX_CAS_ATTEMPTS):\n"
                "            if guess is not None:\n"
                "                old, guess = guess, None\n"
                "                try:\n"
                "                    new = transition(old, event)\n"
                "                except StaleEvent:\n"
                "                    continue\n"
                "                if await self.store.compare_and_set(old, new):\n"
                "                    break\n"
                "                continue\n"
                "            old = await self.store.get(name)\n",
            )
        elif name == "sender":
            _patch_source(
                ws.WorkerService,
                "_sender",
                "op = await self.scheduler.store.get(name)",
                "op = self.scheduler._recent.get(name) or await self.scheduler.store.get(name)",
            )
        elif name == "finished":
            _patch_source(
                ws.WorkerService,
                "_finished",
                "op = await self.scheduler.store.get(name)",
                "op = self.scheduler._recent.get(name) or await self.scheduler.store.get(name)",
            )
        else:
            raise ValueError(f"unknown prototype {name!r}")


def redis_floor(url: str, seconds: float) -> None:
    """Round trips/s of GET and EVALSHA (`return 1`) through coredis under Trio; JSON out."""
    import trio

    from reexec.redis_client import connect

    async def run() -> dict[str, float]:
        client = connect(url, timeout_s=5.0)
        out: dict[str, float] = {}
        async with client:
            await client.set("bench:floor", b"x" * 200)
            script = client.register_script("return 1")
            await script(keys=["bench:floor"], args=[])

            async def get() -> None:
                await client.get("bench:floor")

            async def evalsha() -> None:
                await script(keys=["bench:floor"], args=["a"])

            for name, fn in [("get", get), ("evalsha", evalsha)]:
                for tasks in (1, 16):
                    count = 0
                    stop = time.perf_counter() + seconds
                    c0 = time.process_time()

                    async def loop(fn=fn, stop=stop) -> None:  # type: ignore[no-untyped-def]
                        nonlocal count
                        while time.perf_counter() < stop:
                            await fn()
                            count += 1

                    t0 = time.perf_counter()
                    async with trio.open_nursery() as n:
                        for _ in range(tasks):
                            n.start_soon(loop)
                    wall = time.perf_counter() - t0
                    out[f"{name}/{tasks}"] = count / wall
                    out[f"{name}/{tasks}/cpu_us"] = 1e6 * (time.process_time() - c0) / count
        # The same GET without a client library: one trio socket, RESP by hand, sequential.
        if url.startswith("unix://"):
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.connect(url[len("unix://") :].split("?")[0])
            request = b"*2\r\n$3\r\nGET\r\n$11\r\nbench:floor\r\n"
            count = 0
            stop = time.perf_counter() + seconds
            c0 = time.process_time()
            t0 = time.perf_counter()
            while time.perf_counter() < stop:
                await sock.send(request)
                got = b""
                while not got.endswith(b"\r\n") or len(got) < 200:
                    got += await sock.recv(4096)
                count += 1
            out["raw/1"] = count / (time.perf_counter() - t0)
            out["raw/1/cpu_us"] = 1e6 * (time.process_time() - c0) / count
            sock.close()
        return out

    print(json.dumps(trio.run(run)))


# -- the benchmark -------------------------------------------------------------------------------


class Meter:
    """Wall, CPU of the given pids, this process, and everything else, over a block."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.cpu: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        out = {k: proc_cpu_seconds(p) for k, p in self.pids.items()}
        out["client"] = self_cpu_seconds()
        out["machine"] = machine_busy_seconds()
        return out

    def __enter__(self) -> Meter:
        self._c0 = self._read()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        c1 = self._read()
        self.cpu = {k: c1[k] - self._c0[k] for k in c1}
        ours = sum(v for k, v in self.cpu.items() if k != "machine")
        self.cpu["other"] = max(0.0, self.cpu.pop("machine") - ours)

    def pct(self, key: str) -> float:
        return 100.0 * self.cpu.get(key, 0.0) / self.wall

    def sched_cpu(self) -> float:
        return sum(v for k, v in self.cpu.items() if k.startswith("sched"))

    def summary(self) -> str:
        return ", ".join(f"{k} {self.pct(k):.0f}%" for k in self.cpu) + " of a core"


def start_redis(directory: Path) -> subprocess.Popen[bytes]:
    sock = directory / "redis.sock"
    argv = ["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
    argv += ["--dir", str(directory), "--save", "", "--appendonly", "no"]
    argv += ["--logfile", str(directory / "redis.log")]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.02)
    return proc


def start_py_spy(pid: int, out: str) -> subprocess.Popen[bytes]:
    argv = [str(REPO / ".venv/bin/py-spy"), "record", "--pid", str(pid), "--format", "raw"]
    argv += ["--rate", "200", "--nonblocking", "-o", out]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_stats(paths: list[str]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def measure_redis_floor(url: str, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, SCRIPT, "--redis-floor", url, str(seconds)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _frame_key(frame: str) -> tuple[str, str]:
    """'func (path/file.py:123)' -> ('func', 'path/file.py')."""
    func, _, where = frame.rpartition(" (")
    return func, where.rsplit(":", 1)[0]


def _package(path: str) -> str:
    for pkg in ("coredis", "grpclib", "h2", "hpack", "trio_asyncio", "trio", "anyio", "asyncio"):
        if path.startswith(pkg + "/") or f"/{pkg}/" in path:
            return pkg
    if path.startswith("reexec/"):
        return "/".join(path.split("/")[:2])
    return "other"


def py_spy_summary(path: str, top: int = 15) -> str:
    """Top functions by own samples and by inclusive samples, own samples by package, and the
    inclusive share of interesting subtrees, from a `py-spy record --format raw` file."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkgs: Counter[str] = Counter()
    subtrees: Counter[str] = Counter()
    marks = {
        "RedisStateStore (reexec/sched/redis_state.py), all calls": "reexec/sched/redis_state.py",
        "coredis": "coredis/",
        "grpc CAS client (reexec/cas/grpc_store.py)": "reexec/cas/grpc_store.py",
        "Scheduler.apply": "Scheduler.apply",
        "worker stream (reexec/sched/worker_service.py)": "reexec/sched/worker_service.py",
        "Execution service (reexec/sched/service.py)": "reexec/sched/service.py",
    }
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        func, where = _frame_key(frames[-1])
        own[f"{func} ({where})"] += count
        pkgs[_package(where)] += count
        for key in {"{} ({})".format(*_frame_key(f)) for f in frames}:
            incl[key] += count
        for label, needle in marks.items():
            if any(needle in f for f in frames):
                subtrees[label] += count

    def pct(c: int) -> str:
        return f"{100 * c / total:.1f}%"

    out = [f"py-spy: {total:,} samples (idle excluded)"]
    out.append(table(["own samples", "function"], [[pct(c), k] for k, c in own.most_common(top)]))
    out.append(table(["own samples", "package"], [[pct(c), k] for k, c in pkgs.most_common()]))
    skip = ("<module>", "main (", "run (", "unrolled_run", "serve_instrumented")
    inclusive = [(k, c) for k, c in incl.most_common() if not k.startswith(skip)][:top]
    out.append(table(["inclusive", "function"], [[pct(c), k] for k, c in inclusive]))
    out.append(table(["inclusive", "subtree"], [[pct(c), k] for k, c in subtrees.most_common()]))
    return "\n\n".join(out)


def ms(values: list[float], p: float) -> float:
    return 1000 * percentile(values, p)


async def run_config(
    args: argparse.Namespace,
    label: str,
    state: str,
    n_sched: int,
    storage: ServerProcess,
    redis_url: str,
    redis_pid: int | None,
) -> dict[str, object]:
    prefix = f"bench{os.getpid()}-{label}:"
    extra = f'url = "{redis_url}"\nkey_prefix = "{prefix}"' if state == "redis" else ""
    config = SCHED_CONFIG.format(state=state, state_extra=extra, storage=storage.target)
    local_cas = label.endswith("-fs")
    if local_cas:
        config = config.split("[cas]")[0]
    stats_paths = []
    with ExitStack() as stack:
        scheds = []
        for i in range(n_sched):
            fd, path = tempfile.mkstemp(prefix="reexec-bench-state-", suffix=".json")
            os.close(fd)
            stats_paths.append(path)
            stack.callback(os.unlink, path)
            scheds.append(
                stack.enter_context(
                    reexecd(
                        "scheduler",
                        config,
                        name=f"sched-{label}-{i}",
                        launcher=[SCRIPT, "--serve-instrumented", path],
                    )
                )
            )
        pids = {f"sched{i}": s.pid for i, s in enumerate(scheds)}
        pids["storage"] = storage.pid
        if redis_pid is not None:
            pids["redis"] = redis_pid
        up = AioClient(scheds[0].target if local_cas else storage.target)
        run_id = os.urandom(4).hex()
        digests = await upload_actions(up, args.actions + args.light_actions + 200, run_id)
        warm, digests = digests[:200], digests[200:]
        digests, light = digests[: args.actions], digests[args.actions :]
        await up.close()
        clients = [AioClient(scheds[i % n_sched].target) for i in range(args.channels)]
        workers = [
            FakeWorker(AioClient(scheds[i % n_sched].target), f"fake-{label}-{i}", args.slots)
            for i in range(args.workers)
        ]
        tasks = [asyncio.ensure_future(w.run()) for w in workers]
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in workers)), 10)

        await run_capabilities(clients, args.concurrency, 0.5)
        await run_executes(clients, warm, args.concurrency)
        for w in workers:
            w.received.clear()

        # Floor: GetCapabilities on the first scheduler (all channels to it).
        caps_clients = [AioClient(scheds[0].target) for _ in range(args.channels)]
        with Meter(pids) as cm:
            caps = await run_capabilities(caps_clients, args.concurrency, args.caps_seconds)
        for c in caps_clients:
            await c.close()
        caps_rate = caps / cm.wall
        print(f"  [{label}] GetCapabilities: {caps_rate:,.0f}/s ({cm.summary()})", flush=True)

        profiler = None
        if args.py_spy == label:
            profiler = start_py_spy(scheds[0].pid, args.py_spy_out)
            await asyncio.sleep(1.0)
        for s in scheds:
            s.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.3)
        before = read_stats(stats_paths)
        with Meter(pids) as m:
            latencies = await run_executes(clients, digests, args.concurrency)
        for s in scheds:
            s.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.3)
        after = read_stats(stats_paths)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=30)
        rate = len(latencies) / m.wall
        received = [x for w in workers for x in w.received]
        print(
            f"  [{label}] Execute: {len(latencies):,} in {m.wall:.1f}s = {rate:,.0f}/s "
            f"({m.summary()})",
            flush=True,
        )
        dispatch = [
            x
            for b, a in zip(before, after, strict=True)
            for x in a["dispatch"][len(b["dispatch"]) :]
        ]
        calls: Counter[str] = Counter()
        applies: Counter[str] = Counter()
        conflicts = 0
        for b, a in zip(before, after, strict=True):
            calls.update(Counter(a["calls"]) - Counter(b["calls"]))
            applies.update(Counter(a["applies"]) - Counter(b["applies"]))
            conflicts += a["conflicts"] - b["conflicts"]

        for w in workers:
            w.received.clear()
        with Meter(pids) as lm:
            light_lat = await run_executes(clients, light, 1)
        light_received = [x for w in workers for x in w.received]
        for sp in scheds:
            sp.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.3)
        final = read_stats(stats_paths)
        light_dispatch = [
            x
            for a, f in zip(after, final, strict=True)
            for x in f["dispatch"][len(a["dispatch"]) :]
        ]
        print(
            f"  [{label}] light: {len(light_lat)} Executes, 1 caller: "
            f"{len(light_lat) / lm.wall:,.0f}/s ({lm.summary()})",
            flush=True,
        )
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients + [w.client for w in workers]:
            await c.close()
        for i, sp in enumerate(scheds):  # logged at level warning: anything here is news
            lines = sp.log_tail(20).splitlines()
            tail = "\n".join([x for x in lines if "any client can register" not in x][-5:])
            if tail:
                print(f"  [{label}] scheduler {i} log (warnings) ends with:\n{tail}", flush=True)
    n = len(latencies)
    return {
        "label": label,
        "rate": rate,
        "caps_rate": caps_rate,
        "sched_us": 1e6 * m.sched_cpu() / n,
        "storage_us": 1e6 * m.cpu.get("storage", 0.0) / n,
        "redis_us": 1e6 * m.cpu.get("redis", 0.0) / n,
        "client_us": 1e6 * m.cpu.get("client", 0.0) / n,
        "other_pct": m.pct("other"),
        "caps_sched_us": 1e6 * cm.cpu.get("sched0", 0.0) / caps,
        "dispatch": dispatch,
        "received": received,
        "e2e": latencies,
        "light_received": light_received,
        "light_dispatch": light_dispatch,
        "light_e2e": light_lat,
        "calls": dict(calls),
        "applies": dict(applies),
        "conflicts": conflicts,
        "n": n,
    }


async def bench(args: argparse.Namespace) -> None:
    banner("scheduler state store: Execute -> COMPLETED, memory vs Redis, 1 and 2 schedulers")
    if args.patches:
        os.environ["BENCH_STATE_PATCHES"] = args.patches
        print(f"PROTOTYPE PATCHES in the schedulers: {args.patches} (not the committed code)")
    print(
        f"{args.actions:,} distinct do_not_cache actions per configuration, {args.concurrency} "
        f"callers over {args.channels} channels, {args.workers} fake workers x {args.slots} "
        f"slots; CAS and action cache: grpc to one `reexecd storage`",
        flush=True,
    )
    rdir = Path(tempfile.mkdtemp(prefix="rbs-", dir="/tmp"))
    redis = start_redis(rdir)
    redis_url = f"unix://{rdir / 'redis.sock'}"
    results = []
    try:
        floor = measure_redis_floor(redis_url, args.floor_seconds)
        print(
            "  redis floor (coredis under Trio): "
            + ", ".join(
                f"{k} {v:,.0f}/s" if "cpu" not in k else f"{k} {v:.0f}" for k, v in floor.items()
            ),
            flush=True,
        )
        with reexecd("storage", "", name="storage") as storage:
            for label in args.configs.split(","):
                state, n_sched = CONFIGS[label]
                results.append(
                    await run_config(
                        args,
                        label,
                        state,
                        n_sched,
                        storage,
                        redis_url,
                        redis.pid if state == "redis" else None,
                    )
                )
    finally:
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(rdir, ignore_errors=True)

    names = {
        "memory-fs": "memory state, 1 scheduler, its own filesystem CAS (reference)",
        "memory": "memory state, 1 scheduler",
        "redis1": "redis state, 1 scheduler",
        "redis2": "redis state, 2 schedulers",
    }
    print()
    print(
        table(
            [
                "configuration",
                "Execute/s",
                "GetCapabilities/s (sched 0)",
                "sched CPU us/action",
                "storage us",
                "redis us",
                "queue->dispatch p50/p99 ms",
                "queue->worker recv p50/p99 ms",
                "e2e p50/p99 ms",
                "light (1 caller): dispatch, recv, e2e p50/p99 ms",
                "other load",
            ],
            [
                [
                    names[r["label"]],
                    f"{r['rate']:,.0f}",
                    f"{r['caps_rate']:,.0f}",
                    f"{r['sched_us']:,.0f}",
                    f"{r['storage_us']:,.0f}",
                    f"{r['redis_us']:,.0f}",
                    f"{ms(r['dispatch'], 50):.2f} / {ms(r['dispatch'], 99):.2f}",
                    f"{ms(r['received'], 50):.0f} / {ms(r['received'], 99):.0f}",
                    f"{ms(r['e2e'], 50):.0f} / {ms(r['e2e'], 99):.0f}",
                    f"{ms(r['light_dispatch'], 50):.2f} / {ms(r['light_dispatch'], 99):.2f}, "
                    f"{ms(r['light_received'], 50):.2f} / {ms(r['light_received'], 99):.2f}, "
                    f"{ms(r['light_e2e'], 50):.2f} / {ms(r['light_e2e'], 99):.2f}",
                    f"{r['other_pct']:.0f}%",
                ]
                for r in results
            ],
        )
    )
    print()
    print(
        "floor: Redis round trips from one Trio process (coredis): "
        f"GET {floor['get/1']:,.0f}/s sequential ({1e6 / floor['get/1']:.0f} us each, "
        f"{floor['get/1/cpu_us']:.0f} us client CPU), {floor['get/16']:,.0f}/s with 16 tasks; "
        f"EVALSHA 'return 1' {floor['evalsha/1']:,.0f}/s sequential "
        f"({1e6 / floor['evalsha/1']:.0f} us, {floor['evalsha/1/cpu_us']:.0f} us CPU), "
        f"{floor['evalsha/16']:,.0f}/s with 16 tasks; the same GET over a bare trio socket "
        f"(RESP by hand) {floor.get('raw/1', 0):,.0f}/s sequential "
        f"({floor.get('raw/1/cpu_us', 0):.0f} us CPU)"
    )
    for r in results:
        if not r["calls"]:
            continue
        n = r["n"]
        per = ", ".join(
            f"{k} {v / n:.2f}" for k, v in sorted(r["calls"].items(), key=lambda kv: -kv[1])
        )
        total = sum(r["calls"].values()) / n
        aps = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(r["applies"].items()))
        print(
            f"{names[r['label']]}: {total:.1f} Redis round trips per action ({per}); "
            f"applies per action: {aps}; CAS conflicts {r['conflicts']} "
            f"({r['conflicts'] / n:.3f} per action)"
        )
    if args.py_spy:
        print()
        print(f"py-spy of scheduler 0 of {names[args.py_spy]}, Execute phase ({args.py_spy_out}):")
        print(py_spy_summary(args.py_spy_out))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-instrumented":
        sys.exit(serve_instrumented(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) > 2 and sys.argv[1] == "--py-spy-summary":
        print(py_spy_summary(sys.argv[2]))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--redis-floor":
        redis_floor(sys.argv[2], float(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--actions", type=int, default=2_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--caps-seconds", type=float, default=4.0)
    p.add_argument("--floor-seconds", type=float, default=2.0)
    p.add_argument("--light-actions", type=int, default=200)
    p.add_argument("--configs", default="memory-fs,memory,redis1,redis2")
    p.add_argument(
        "--patches",
        default="",
        help="prototype changes in the schedulers: guess,sender,finished (see apply_prototypes)",
    )
    p.add_argument("--py-spy", default="", help="config label whose scheduler 0 py-spy records")
    p.add_argument("--py-spy-out", default="/tmp/reexec-bench-state.pyspy.txt")
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
