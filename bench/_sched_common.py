"""Helpers for the scheduler/worker benchmarks (copied from _common.py, plus REAPI execution bits).

A separate module so these benchmarks do not depend on _common.py changing under them:
a `reexecd` subprocess (serve or scheduler, optional TOML config), CPU accounting from
/proc/PID/stat, percentiles, Markdown tables, machine facts, and a grpcio.aio client with
the Execution and WorkerApi methods (fastpb messages throughout).
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_TMPDIR = os.environ.get("BENCH_TMPDIR") or None
REAPI = "build.bazel.remote.execution.v2"

# -- processes and CPU ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_tree_cpu_seconds(pid: int) -> float:
    """CPU of `pid` plus what its reaped children used (cutime + cstime): a server's actions."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def main_thread_cpu_seconds(pid: int) -> float:
    """utime + stime of the main thread of `pid` (the event loop of a Trio server)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


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
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu(self) -> float:
        """The server's CPU including its reaped children (the actions a local worker ran)."""
        return proc_tree_cpu_seconds(self.proc.pid)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""


@contextlib.contextmanager
def reexecd(
    role: str = "serve",
    config_toml: str = "",
    *,
    name: str = "reexecd",
    launcher: Sequence[str] = ("-m", "reexec.daemon"),
) -> Iterator[ServerProcess]:
    """`reexecd ROLE` on a free port in a throw-away data dir; `config_toml` is written to a file
    (`{data_dir}` in it is substituted). `launcher` replaces `-m reexec.daemon` (e.g. a script
    that instruments the daemon, then calls reexec.daemon.cli.main with the remaining args; it
    gets `{data_dir}` substituted too). Stopped with SIGTERM and cleaned up on exit."""
    tmp = Path(tempfile.mkdtemp(prefix=f"reexec-bench-{name}-", dir=BENCH_TMPDIR))
    data_dir = tmp / "data"
    data_dir.mkdir()
    log_path = tmp / "server.log"
    port = free_port()
    argv = [PYTHON]
    profile = os.environ.get("BENCH_SERVER_PROFILE")
    if profile:
        argv += ["-m", "cProfile", "-o", f"{profile}.{name}.prof"]
    argv += [a.replace("{data_dir}", str(data_dir)) for a in launcher]
    argv += [role, "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(data_dir), "--log-level", "warning"]
    if config_toml:
        cfg = tmp / "config.toml"
        cfg.write_text(config_toml.replace("{data_dir}", str(data_dir)))
        argv += ["--config", str(cfg)]
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
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
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


class CpuMeter:
    """Wall time, server CPU, this process's CPU and everything else's CPU over a block."""

    def __init__(self, server: ServerProcess | None = None) -> None:
        self.server = server
        self.wall = self.server_cpu = self.client_cpu = self.other_cpu = 0.0
        self.server_main_cpu = 0.0  # the server's main (event loop) thread alone

    def __enter__(self) -> CpuMeter:
        self._s0 = self.server.cpu() if self.server else 0.0
        self._sm0 = main_thread_cpu_seconds(self.server.pid) if self.server else 0.0
        self._c0 = self_cpu_seconds()
        self._m0 = machine_busy_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.client_cpu = self_cpu_seconds() - self._c0
        self.server_cpu = (self.server.cpu() if self.server else 0.0) - self._s0
        if self.server:
            self.server_main_cpu = main_thread_cpu_seconds(self.server.pid) - self._sm0
        busy = machine_busy_seconds() - self._m0
        self.other_cpu = max(0.0, busy - self.client_cpu - self.server_cpu)

    def pct(self, cpu: float) -> float:
        return 100.0 * cpu / self.wall if self.wall else 0.0

    def summary(self) -> str:
        return (
            f"server {self.pct(self.server_cpu):.0f}% (main thread "
            f"{self.pct(self.server_main_cpu):.0f}%) client {self.pct(self.client_cpu):.0f}% "
            f"other processes {self.pct(self.other_cpu):.0f}% of a core"
        )


# -- numbers --------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fs_create_cost(n: int = 300) -> float:
    """Microseconds of CPU to create, write (4 KiB), chmod and rename one file in the temp dir."""
    d = Path(tempfile.mkdtemp(prefix="reexec-bench-fs-", dir=BENCH_TMPDIR))
    try:
        data = os.urandom(4096)
        c0 = time.process_time()
        for i in range(n):
            tmp = d / f"t{i}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.fchmod(fd, 0o444)
            os.close(fd)
            os.rename(tmp, d / f"b{i}")
        return 1e6 * (time.process_time() - c0) / n
    finally:
        shutil.rmtree(d, ignore_errors=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
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


def banner(title: str) -> None:
    print(f"== {title} ==")
    print(machine_facts(), flush=True)


def verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


# -- grpcio.aio client ----------------------------------------------------------------------

GRPC_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class AioClient:
    """Typed method handles on one grpcio.aio channel (one TCP connection); fastpb messages."""

    def __init__(self, target: str) -> None:
        import grpc.aio

        from reexec import fastpb

        self.channel = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
        ch = self.channel
        m = fastpb.message_class

        def uu(path: str, req: type, resp: type):  # type: ignore[no-untyped-def]
            return ch.unary_unary(
                path,
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )

        self.get_capabilities = uu(
            f"/{REAPI}.Capabilities/GetCapabilities",
            m(f"{REAPI}.GetCapabilitiesRequest"),
            m(f"{REAPI}.ServerCapabilities"),
        )
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
        self.execute = ch.unary_stream(
            f"/{REAPI}.Execution/Execute",
            request_serializer=fastpb.ExecuteRequest.SerializeToString,
            response_deserializer=fastpb.Operation.FromString,
        )
        self.connect = ch.stream_stream(
            "/reexec.worker.v1.WorkerApi/Connect",
            request_serializer=m("reexec.worker.v1.WorkerMessage").SerializeToString,
            response_deserializer=m("reexec.worker.v1.SchedulerMessage").FromString,
        )

    async def close(self) -> None:
        await self.channel.close()


def execute_response(op: object) -> object:
    """The ExecuteResponse in a done Operation."""
    from reexec import fastpb

    resp = fastpb.ExecuteResponse()
    op.response.Unpack(resp)  # type: ignore[attr-defined]
    return resp
