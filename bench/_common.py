"""Shared helpers for the benchmarks: a `reexecd serve` subprocess, CPU accounting, tables.

Every benchmark runs the server as a separate process (so on a 2-core machine client and server
each get a core) in a throw-away data directory, and reads the server's CPU time from
/proc/PID/stat (utime + stime of all its threads) before and after each measured phase.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Where the servers' throw-away data directories go (default: the system temp dir). On this
# project's VMs, creating a file on the ext4 disk costs 0.3-1 ms of kernel CPU, varying from run
# to run (tmpfs: ~0.01 ms); `fs_create_cost` measures it so results can be read against it.
# BENCH_TMPDIR=/dev/shm takes the disk out of the measurement.
BENCH_TMPDIR = os.environ.get("BENCH_TMPDIR") or None


# -- processes and CPU ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


# other_pct of every CpuMeter block in this run (see `quiet_note`).
OTHER_LOAD: list[float] = []


def quiet_note() -> str:
    """One line on how busy the rest of the machine was during the measured phases."""
    if not OTHER_LOAD:
        return ""
    worst = max(OTHER_LOAD)
    verdict = "quiet" if worst < 10 else "NOT QUIET: figures are depressed by other load"
    return (
        f"other processes during measured phases: mean {statistics.mean(OTHER_LOAD):.0f}%, "
        f"max {worst:.0f}% of a core ({verdict})"
    )


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used (all cores), from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def user_process_cpu(exclude: Sequence[int]) -> float:
    """CPU seconds (with reaped children) of every user-space process not in `exclude`.

    Kernel threads (no command line: writeback, softirq, ...) are left out: they mostly work on
    behalf of the benchmark itself (flushing the blobs it writes, loopback networking).
    """
    total = 0
    skip = {str(p) for p in exclude}
    for entry in os.scandir("/proc"):
        name = entry.name
        if not name.isdigit() or name in skip:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if not f.read(1):
                    continue
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout}s")


@dataclass
class ServerProcess:
    """A running server subprocess with its port and CPU meter."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path
    marks: list[float] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""


@contextlib.contextmanager
def server_process(
    args: Sequence[str], *, name: str = "server", env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Start `python ARGS...` with `{port}` and `{data_dir}` substituted; kill it and clean up."""
    tmp = Path(tempfile.mkdtemp(prefix=f"reexec-bench-{name}-", dir=BENCH_TMPDIR))
    data_dir = tmp / "data"
    log_path = tmp / "server.log"
    port = free_port()
    argv = [PYTHON, *(a.format(port=port, data_dir=data_dir) for a in args)]
    profile = os.environ.get("BENCH_SERVER_PROFILE")
    if profile:
        # cProfile the server; it writes the file when the server exits on SIGTERM.
        argv[1:1] = ["-m", "cProfile", "-o", f"{profile}.{name}.prof"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    server = ServerProcess(proc, port, data_dir, log_path)
    try:
        wait_for_port(port, proc)
        yield server
    except BaseException:
        tail = server.log_tail()
        if tail:
            print(f"--- {name} log tail ---\n{tail}", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def reexecd(
    extra: Sequence[str] = (), *, env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[ServerProcess]:
    """`reexecd serve` with the default config (verifying filesystem CAS, filesystem AC).

    With BENCH_PATCHES=a,b,... in the environment the server runs through bench/_experiments.py,
    which applies those experimental monkeypatches first (see that file); results are then
    labelled with the patch list.
    """
    patches = os.environ.get("BENCH_PATCHES", "")
    launcher = [str(REPO / "bench" / "_experiments.py")] if patches else ["-m", "reexec.daemon"]
    return server_process(
        [
            *launcher,
            "serve",
            "--listen",
            "127.0.0.1:{port}",
            "--data-dir",
            "{data_dir}",
            "--log-level",
            "warning",
            *extra,
        ],
        name="reexecd",
        env=env,
    )


class CpuMeter:
    """Wall time, server CPU, client (this process) CPU and other processes' CPU over a block.

    `other_pct` is CPU used meanwhile by user-space processes other than this one and the server
    (in % of one core): anything above ~10% means the machine was not quiet and the figures are
    low. (Processes that start and end within the block are counted when their parent is.)
    """

    def __init__(self, server: ServerProcess | None) -> None:
        self.server = server
        self.wall = self.server_cpu = self.client_cpu = self.other_cpu = 0.0

    def __enter__(self) -> CpuMeter:
        self._s0 = self.server.cpu() if self.server else 0.0
        self._c0 = self_cpu_seconds()
        self._exclude = [os.getpid()] + ([self.server.pid] if self.server else [])
        self._m0 = user_process_cpu(self._exclude)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.client_cpu = self_cpu_seconds() - self._c0
        self.server_cpu = (self.server.cpu() if self.server else 0.0) - self._s0
        self.other_cpu = max(0.0, user_process_cpu(self._exclude) - self._m0)
        OTHER_LOAD.append(self.other_pct)

    @property
    def other_pct(self) -> float:
        return 100.0 * self.other_cpu / self.wall if self.wall else 0.0

    @property
    def server_pct(self) -> float:
        return 100.0 * self.server_cpu / self.wall if self.wall else 0.0

    @property
    def client_pct(self) -> float:
        return 100.0 * self.client_cpu / self.wall if self.wall else 0.0


# -- numbers --------------------------------------------------------------------------------


def fs_create_cost(n: int = 300) -> float:
    """Microseconds of CPU to create, write (4 KiB), chmod and rename one file where the
    benchmark servers keep their data (the per-blob filesystem cost of a CAS upload)."""
    d = Path(tempfile.mkdtemp(prefix="reexec-bench-fs-", dir=BENCH_TMPDIR))
    try:
        (d / "tmp").mkdir()
        (d / "blobs").mkdir()
        data = os.urandom(4096)
        c0 = time.process_time()
        for i in range(n):
            tmp = d / "tmp" / f"t{i}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.fchmod(fd, 0o444)
            os.close(fd)
            os.rename(tmp, d / "blobs" / f"b{i}")
        return 1e6 * (time.process_time() - c0) / n
    finally:
        shutil.rmtree(d, ignore_errors=True)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile, p in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def sha256_speed(data: bytes, chunk: int = 1 << 20) -> float:
    """Single-core hashlib SHA-256 speed over `data` fed in `chunk`-byte pieces, MiB/s."""
    view = memoryview(data)
    best = 0.0
    for _ in range(2):
        h = hashlib.sha256()
        t0 = time.perf_counter()
        for i in range(0, len(view), chunk):
            h.update(view[i : i + chunk])
        h.hexdigest()
        best = max(best, len(data) / (1 << 20) / (time.perf_counter() - t0))
    return best


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


def machine_facts() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"nproc={os.cpu_count()} cpu={model!r} python={platform.python_version()} "
        f"date={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
    )


def banner(title: str, *, fs: bool = False) -> None:
    print(f"== {title} ==")
    print(machine_facts())
    if os.environ.get("BENCH_PATCHES"):
        print(f"EXPERIMENT: reexecd runs with BENCH_PATCHES={os.environ['BENCH_PATCHES']}")
    if fs:
        where = BENCH_TMPDIR or tempfile.gettempdir()
        print(
            f"data dirs under {where}: 4 KiB file create+write+rename {fs_create_cost():.0f} us CPU"
        )


# -- grpcio.aio client (C-core HTTP/2, upb messages) ----------------------------------------

REAPI = "build.bazel.remote.execution.v2"
GRPC_OPTIONS = [
    # One TCP connection per channel object, so N channels really are N connections.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class AioClient:
    """Typed method handles on one grpcio.aio channel; every message is a reexec.fastpb class.

    grpcio's C core is the cheapest client available here per RPC (about a third of grpclib's
    CPU), which matters on a 2-core machine where client and server share the CPU.
    """

    def __init__(self, target: str) -> None:
        import grpc.aio

        from reexec import fastpb

        self.channel = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
        ch = self.channel

        def uu(path: str, req: type, resp: type):  # type: ignore[no-untyped-def]
            return ch.unary_unary(
                path,
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )

        caps_req = fastpb.message_class(f"{REAPI}.GetCapabilitiesRequest")
        caps = fastpb.message_class(f"{REAPI}.ServerCapabilities")
        self.get_capabilities = uu(f"/{REAPI}.Capabilities/GetCapabilities", caps_req, caps)
        self.find_missing_blobs = uu(
            f"/{REAPI}.ContentAddressableStorage/FindMissingBlobs",
            fastpb.FindMissingBlobsRequest,
            fastpb.FindMissingBlobsResponse,
        )
        self.batch_update_blobs = uu(
            f"/{REAPI}.ContentAddressableStorage/BatchUpdateBlobs",
            fastpb.BatchUpdateBlobsRequest,
            fastpb.BatchUpdateBlobsResponse,
        )
        self.get_action_result = uu(
            f"/{REAPI}.ActionCache/GetActionResult",
            fastpb.GetActionResultRequest,
            fastpb.ActionResult,
        )
        self.update_action_result = uu(
            f"/{REAPI}.ActionCache/UpdateActionResult",
            fastpb.UpdateActionResultRequest,
            fastpb.ActionResult,
        )
        self.write = ch.stream_unary(
            "/google.bytestream.ByteStream/Write",
            request_serializer=fastpb.WriteRequest.SerializeToString,
            response_deserializer=fastpb.WriteResponse.FromString,
        )
        self.read = ch.unary_stream(
            "/google.bytestream.ByteStream/Read",
            request_serializer=fastpb.ReadRequest.SerializeToString,
            response_deserializer=fastpb.ReadResponse.FromString,
        )

    async def close(self) -> None:
        await self.channel.close()
