"""Bazel 4.2.3 rebuild of tests/e2e/workspace with every action a cache hit: reexecd vs --disk_cache.

The issue-13 row: "Bazel rebuild of the e2e workspace, fresh output base, all remote cache hits:
<= 1.2x the floor; floor = the same rebuild from a local --disk_cache".

Setup (not timed): a private copy of the workspace (tests/e2e/harness.py), reexecd as a
subprocess with its default config, then three filling builds of `bazel test //...`:
remote execution on reexecd (fills its action cache and CAS), a local build with reexecd as
--remote_cache (the same actions; checks the entries are shared) and a local build with
--disk_cache=DIR (fills the floor's cache). Then `--rounds` interleaved rounds (the order rotates
each round) of these rebuilds, each in a fresh output base whose Bazel server is started first
(`bazel info`, not timed) and shut down after:
  remote-exec   remote_exec_flags(...) as the e2e tests use them (default download mode):
                every spawn is a GetActionResult hit on reexecd, outputs read with ByteStream
  remote-cache  remote_cache_flags(...) (--remote_cache only, local strategy for misses)
  disk          --disk_cache=DIR filled above, no remote: the floor
  memo          remote_exec_flags(...) against bench/_memo_server.py, a grpcio (C core) proxy
                in front of reexecd that answers repeated requests from memory (filled by one
                untimed rebuild): what Bazel's client costs against a near-free server
                (--no-memo leaves it out)
Each timed run's process summary must show every spawned process as "remote cache hit" (Bazel's
word for disk-cache hits too) and the tests "(cached) PASSED". Printed per run: wall time, CPU
seconds of the Bazel server JVM, of reexecd (with its worker) and of everything else on the
machine (other load, in % of one core), and for the remote variants the RPCs reexecd handled
(counts and server-side mean latency from its /metrics on the status socket, ByteStream bytes).
The summary gives medians, the ratios to the disk floor and the RPC profile of one rebuild.

--diagnose DIR adds one untimed run of each variant with --profile=DIR/NAME.profile.gz (read
with `bazel analyze-profile` or the summary printed here) and, for the remote variants,
--experimental_remote_grpc_log (client-side count, latency and sizes per RPC method, printed).

Usage: .venv/bin/python bench/bazel_cached_rebuild.py [--rounds 5] [--diagnose DIR]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import http.client
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _sched_common import (
    BENCH_TMPDIR,
    banner,
    machine_busy_seconds,
    proc_tree_cpu_seconds,
    self_cpu_seconds,
    table,
)

from tests.e2e.harness import (
    BazelWorkspace,
    ReexecdProcess,
    bazel_available,
    free_port,
    grpc_log_flags,
    parse_process_summary,
    remote_cache_flags,
    remote_exec_flags,
)

# --------------------------------------------------------------------------------------------
# reexecd's /metrics over its status socket


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(sock: Path) -> dict[str, float]:
    """The counters of reexecd's /metrics that a rebuild moves, keyed by series text."""
    conn = _UnixHTTPConnection(sock)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name = m.group(1)
        if name.startswith("reexec_rpc_duration_seconds_") and not name.endswith("_bucket"):
            out[name + (m.group(2) or "")] = float(m.group(3))
        elif name in ("reexec_cas_bytes_total", "reexec_action_cache_requests_total"):
            out[name + (m.group(2) or "")] = float(m.group(3))
    return out


def rpc_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, tuple[int, float]]:
    """{method: (calls, server seconds)} handled between two scrapes; bytes as pseudo-methods."""
    out: dict[str, tuple[int, float]] = {}
    for key, value in after.items():
        d = value - before.get(key, 0.0)
        if d == 0:
            continue
        method = re.search(r'method="([^"]*)"', key)
        if key.startswith("reexec_rpc_duration_seconds_count") and method:
            name = method.group(1).rsplit("/", 1)[-1]
            n, s = out.get(name, (0, 0.0))
            out[name] = (n + int(d), s)
        elif key.startswith("reexec_rpc_duration_seconds_sum") and method:
            name = method.group(1).rsplit("/", 1)[-1]
            n, s = out.get(name, (0, 0.0))
            out[name] = (n, s + d)
        elif key.startswith("reexec_cas_bytes_total"):
            direction = re.search(r'direction="([^"]*)"', key)
            out[f"bytes {direction.group(1) if direction else '?'}"] = (int(d), 0.0)
        elif key.startswith("reexec_action_cache_requests_total"):
            result = re.search(r'result="([^"]*)"', key)
            out[f"AC {result.group(1) if result else '?'}"] = (int(d), 0.0)
    return out


def fmt_rpcs(delta: dict[str, tuple[int, float]]) -> str:
    parts = []
    for name, (n, s) in sorted(delta.items()):
        if name.startswith(("bytes", "AC ", "forwarded")):
            parts.append(f"{name}={n}")
        else:
            parts.append(f"{name}={n} ({1000 * s / max(n, 1):.1f} ms)")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Bazel's --experimental_remote_grpc_log (remote_execution_log.proto LogEntry records, each
# prefixed by its varint length). A minimal wire-format reader: no generated code needed.


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
            out.append((num, v))
        elif wire == 2:
            n, i = _varint(buf, i)
            out.append((num, buf[i : i + n]))
            i += n
        elif wire == 1:
            out.append((num, int.from_bytes(buf[i : i + 8], "little")))
            i += 8
        elif wire == 5:
            out.append((num, int.from_bytes(buf[i : i + 4], "little")))
            i += 4
        else:
            raise ValueError(f"wire type {wire}")
    return out


def _timestamp(buf: bytes) -> float:
    f = dict(_fields(buf))
    return int(f.get(1, 0)) + int(f.get(2, 0)) / 1e9


def read_grpc_log(path: Path) -> list[dict[str, object]]:
    """[{method, start, end, request (GetActionResult, Read), bytes (Read)}] from the log."""
    data = path.read_bytes()
    entries: list[dict[str, object]] = []
    i = 0
    while i < len(data):
        n, i = _varint(data, i)
        rec = _fields(data[i : i + n])
        i += n
        e: dict[str, object] = {"bytes": 0}
        # LogEntry: 1 metadata, 2 status, 3 method_name, 4 details, 5 start_time, 6 end_time.
        for num, v in rec:
            if not isinstance(v, bytes):
                continue
            if num == 5:
                e["start"] = _timestamp(v)
            elif num == 6:
                e["end"] = _timestamp(v)
            elif num == 3:
                e["method"] = v.decode().rsplit("/", 1)[-1]
            elif num == 4:
                for kind, det in _fields(v):
                    if not isinstance(det, bytes):
                        continue
                    d = dict(_fields(det))
                    if kind in (5, 8):  # ReadDetails, GetActionResultDetails: 1 request
                        e["request"] = d.get(1, b"")
                    if kind == 5:  # ReadDetails: 3 bytes_read
                        e["bytes"] = int(d.get(3, 0))
        entries.append(e)
    return entries


def summarize_grpc_log(entries: list[dict[str, object]]) -> str:
    by: dict[str, list[dict[str, object]]] = collections.defaultdict(list)
    for e in entries:
        by[str(e.get("method", "?"))].append(e)
    starts = [float(e["start"]) for e in entries if "start" in e]  # type: ignore[arg-type]
    ends = [float(e["end"]) for e in entries if "end" in e]  # type: ignore[arg-type]
    lines = [
        f"  {len(entries)} RPCs over {max(ends) - min(starts):.2f} s (first start to last end)"
    ]
    for method, es in sorted(by.items()):
        lat = sorted(
            1000 * (float(e["end"]) - float(e["start"]))  # type: ignore[arg-type]
            for e in es
            if "start" in e and "end" in e
        )
        busy = _union_seconds(
            [(float(e["start"]), float(e["end"])) for e in es if "start" in e and "end" in e]  # type: ignore[arg-type]
        )
        extra = ""
        if method == "Read":
            sizes = sorted(int(e["bytes"]) for e in es)  # type: ignore[call-overload]
            extra = (
                f", bytes total {sum(sizes)}, per read min/median/max "
                f"{sizes[0]}/{statistics.median(sizes):.0f}/{sizes[-1]}"
            )
        lines.append(
            f"  {method:18s} n={len(es):3d}  client latency ms median {statistics.median(lat):.1f}"
            f" p90 {lat[int(0.9 * (len(lat) - 1))]:.1f} max {lat[-1]:.1f} sum {sum(lat):.0f}"
            f"; wall with >=1 in flight {busy:.2f} s{extra}"
        )
    return "\n".join(lines)


def _union_seconds(spans: list[tuple[float, float]]) -> float:
    total = 0.0
    end = float("-inf")
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


# --------------------------------------------------------------------------------------------
# Bazel's --profile (JSON trace format, gzipped)


def summarize_profile(path: Path, top: int = 12) -> str:
    """Critical phases and the slowest categories of a Bazel JSON trace profile."""
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    phases = []
    cats: dict[str, list[float]] = collections.defaultdict(list)
    for ev in events:
        if ev.get("ph") == "i" and ev.get("cat") == "build phase marker":
            phases.append((ev["ts"] / 1e6, ev["name"]))
        if ev.get("ph") == "X":
            cats[f"{ev.get('cat', '?')}: {_norm_name(ev.get('name', ''))}"].append(
                ev.get("dur", 0) / 1000
            )
    lines = ["  phases: " + ", ".join(f"{n} @{t - phases[0][0]:.2f}s" for t, n in phases)]
    ranked = sorted(cats.items(), key=lambda kv: -sum(kv[1]))[:top]
    for name, durs in ranked:
        lines.append(f"  {sum(durs):8.0f} ms in {len(durs):4d} x  {name[:110]}")
    return "\n".join(lines)


def _norm_name(name: str) -> str:
    return re.sub(r"[0-9a-f]{64}|bazel-out/\S+|//\S+|@\S+", "*", name)


# --------------------------------------------------------------------------------------------


def replay(entries: list[dict[str, object]], address: str, repeats: int = 5) -> str:
    """Replays the logged GetActionResult and Read requests one at a time with grpcio.

    The same request bytes, sequentially, on one channel: the latency reexecd gives a native
    client that does nothing else, to set beside the latency Bazel's client saw.
    """
    import grpc

    channel = grpc.insecure_channel(address.removeprefix("grpc://"))
    gar = channel.unary_unary("/build.bazel.remote.execution.v2.ActionCache/GetActionResult")
    read = channel.unary_stream("/google.bytestream.ByteStream/Read")
    lat: dict[str, list[float]] = collections.defaultdict(list)
    try:
        for _ in range(repeats):
            for e in entries:
                req = e.get("request")
                if not isinstance(req, bytes):
                    continue
                t0 = time.perf_counter()
                if e.get("method") == "GetActionResult":
                    gar(req)
                elif e.get("method") == "Read":
                    for _chunk in read(req):
                        pass
                else:
                    continue
                lat[str(e["method"])].append(1000 * (time.perf_counter() - t0))
    finally:
        channel.close()
    return "\n".join(
        f"  replay {m:15s} n={len(v):3d}  latency ms median {statistics.median(v):.2f}"
        f" p90 {sorted(v)[int(0.9 * (len(v) - 1))]:.2f}"
        for m, v in sorted(lat.items())
    )


def profile_phases(path: Path) -> dict[str, float]:
    """Seconds per part of a Bazel command from its JSON profile (command.profile.gz).

    setup: "Initialize command" to "Evaluate target patterns" (the remote module connects and
    calls GetCapabilities here); analysis: to "Build artifacts"; execution: to "Complete build";
    cache_check, download: summed durations of the remote cache lookups and output downloads
    (RemoteSpawnCache, also used for --disk_cache).
    """
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    marks = {ev["name"]: ev["ts"] / 1e6 for ev in events if ev.get("cat") == "build phase marker"}
    out = {
        "setup": marks["Evaluate target patterns"] - marks["Initialize command"],
        "analysis": marks["Build artifacts"] - marks["Evaluate target patterns"],
        "execution": marks["Complete build"] - marks["Build artifacts"],
        "cache_check": 0.0,
        "download": 0.0,
    }
    for ev in events:
        if ev.get("ph") != "X":
            continue
        if ev.get("cat") == "remote action cache check":
            out["cache_check"] += ev.get("dur", 0) / 1e6
        elif ev.get("cat") == "remote output download":
            out["download"] += ev.get("dur", 0) / 1e6
    return out


def wait_quiet(
    exclude: list[int], threshold_pct: float, max_wait: float, window: float = 2.0
) -> float:
    """Waits until processes other than `exclude` (and this one) use < threshold_pct of a core."""
    deadline = time.monotonic() + max_wait
    while True:
        m0, s0 = machine_busy_seconds(), self_cpu_seconds()
        x0 = sum(proc_tree_cpu_seconds(pid) for pid in exclude)
        time.sleep(window)
        x1 = sum(proc_tree_cpu_seconds(pid) for pid in exclude)
        pct = 100 * ((machine_busy_seconds() - m0) - (self_cpu_seconds() - s0) - (x1 - x0)) / window
        if pct < threshold_pct or time.monotonic() > deadline:
            return pct


Server = tuple[int | None, Path | None]  # (pid whose CPU is counted, reexecd status socket)


class MemoServer:
    """bench/_memo_server.py as a subprocess in front of reexecd (see its docstring)."""

    def __init__(self, upstream_port: int, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve().parent / "_memo_server.py"),
                str(self.port),
                f"127.0.0.1:{upstream_port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while "listening" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"memo server did not start: {log.read_text()}")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def misses(self) -> int:
        return self.log.read_text().count("miss ")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def bazel_server_pid(base: Path) -> int:
    return int((base / "server" / "server.pid.txt").read_text().strip())


def timed_run(
    ws: BazelWorkspace,
    base: Path,
    server: Server,
    args: list[str],
    quiet: tuple[float, float] = (100.0, 0.0),
    profile: Path | None = None,
) -> dict[str, object]:
    ws.run("info", "release", output_base=base)  # start this output base's server, not timed
    bpid = bazel_server_pid(base)
    spid, sock = server
    wait_quiet([bpid] + ([spid] if spid else []), *quiet)
    before = scrape(sock) if sock is not None else {}
    load = float(Path("/proc/loadavg").read_text().split()[0])
    b0, d0 = proc_tree_cpu_seconds(bpid), proc_tree_cpu_seconds(spid) if spid else 0.0
    m0, s0 = machine_busy_seconds(), self_cpu_seconds()
    t0 = time.perf_counter()
    result = ws.run(*args, output_base=base, timeout=600)
    wall = time.perf_counter() - t0
    b1, d1 = proc_tree_cpu_seconds(bpid), proc_tree_cpu_seconds(spid) if spid else 0.0
    m1, s1 = machine_busy_seconds(), self_cpu_seconds()
    after = scrape(sock) if sock is not None else {}
    # The bazel client process is a child of ours; its CPU is not in self_cpu_seconds until
    # reaped, and is small (it only forwards output): counted in "other".
    other = (m1 - m0) - (b1 - b0) - (d1 - d0) - (s1 - s0)
    return {
        "wall": wall,
        "summary": parse_process_summary(result.stderr),
        "stdout": result.stdout,
        "bazel_cpu": b1 - b0,
        "server_cpu": d1 - d0,
        "other_pct": 100 * other / wall,
        "load": load,
        "rpcs": rpc_delta(before, after),
        "phases": profile_phases(profile or base / "command.profile.gz"),
    }


PHASES = ("setup", "analysis", "execution", "cache_check", "download")


def fmt_phases(ph: dict[str, float]) -> str:
    return " ".join(f"{k} {1000 * ph[k]:.0f}" for k in PHASES) + " (ms)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="//...")
    p.add_argument("--command", default="test", help="bazel command (test or build)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--diagnose", type=Path, default=None, help="write profiles and grpc logs here")
    p.add_argument(
        "--quiet-pct",
        type=float,
        default=25.0,
        help="before each timed run wait until other processes use less than this %% of a core",
    )
    p.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for quiet")
    p.add_argument(
        "--no-memo",
        action="store_true",
        help="leave out the memo variant (Bazel against bench/_memo_server.py)",
    )
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        help="flag added to every variant (e.g. --remote_download_minimal; not the issue's row)",
    )
    args = p.parse_args()
    if not bazel_available():
        sys.exit("bazel is not installed (apt-get install -y bazel-bootstrap bazel-rules-java)")
    banner("Bazel 4.2.3: fully cached rebuild, reexecd vs local --disk_cache (issue 13)")
    tmp = Path(tempfile.mkdtemp(prefix="reexec-bench-bazel-cached-", dir=BENCH_TMPDIR))
    disk = tmp / "disk-cache"
    cmd = [args.command, args.target, *args.extra]
    quiet = (args.quiet_pct, args.max_wait)
    runs: dict[str, list[dict[str, object]]] = {}
    memo: MemoServer | None = None
    try:
        with (
            BazelWorkspace(tmp / "bazel") as ws,
            ReexecdProcess(tmp / "reexecd-data", log_dir=tmp / "reexecd-log") as daemon,
        ):
            rx: Server = (daemon.pid, daemon.data_dir / "reexecd.sock")
            variants: dict[str, tuple[list[str], Server]] = {
                "remote-exec": (remote_exec_flags(daemon.address), rx),
                "remote-cache": (remote_cache_flags(daemon.address), rx),
                "disk": ([f"--disk_cache={disk}"], (None, None)),
            }
            fills = {
                "fill remote-exec": [*cmd, *variants["remote-exec"][0]],
                "fill remote-cache": [*cmd, *variants["remote-cache"][0]],
                "fill disk": [*cmd, *variants["disk"][0]],
            }
            for name, fill_args in fills.items():
                t0 = time.perf_counter()
                r = ws.run(*fill_args, output_base=ws.new_output_base(name.replace(" ", "-")))
                summary = parse_process_summary(r.stderr)
                print(f"{name:18s}: {time.perf_counter() - t0:6.2f}s  {summary}", flush=True)
                ws.shutdown()
            if not args.no_memo:
                memo = MemoServer(daemon.port, tmp / "memo.log")
                variants["memo"] = (remote_exec_flags(memo.address), (memo.proc.pid, None))
                # The warm-up rebuild fills the memo from reexecd; timed memo runs must not miss.
                t0 = time.perf_counter()
                r = ws.run(*cmd, *variants["memo"][0], output_base=ws.new_output_base("fill-memo"))
                ws.shutdown()
                summary = parse_process_summary(r.stderr)
                print(
                    f"{'fill memo':18s}: {time.perf_counter() - t0:6.2f}s  {summary}  "
                    f"({memo.misses()} calls forwarded to reexecd)",
                    flush=True,
                )
                memo_misses = memo.misses()
            names = list(variants)
            runs = {k: [] for k in names}
            for rnd in range(args.rounds):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for name in order:
                    flags, server = variants[name]
                    base = ws.new_output_base(f"{name}{rnd}")
                    r = timed_run(ws, base, server, [*cmd, *flags], quiet)
                    ws.shutdown()  # one JVM per output base: do not keep them all
                    runs[name].append(r)
                    summary = r["summary"]
                    assert isinstance(summary, dict)
                    spawned = sum(n for k, n in summary.items() if k != "internal")
                    assert spawned > 0 and summary.get("remote cache hit", 0) == spawned, summary
                    if args.command == "test":
                        assert "(cached) PASSED" in str(r["stdout"]), r["stdout"]
                    rpcs = r["rpcs"]
                    assert isinstance(rpcs, dict)
                    phases = r["phases"]
                    assert isinstance(phases, dict)
                    if name == "memo" and memo is not None:
                        misses = memo.misses()
                        rpcs["forwarded to reexecd"] = (misses - memo_misses, 0.0)
                        memo_misses = misses
                    print(
                        f"round {rnd + 1} {name:12s}: {r['wall']:6.2f}s  bazel cpu "
                        f"{r['bazel_cpu']:.2f}s  server cpu {r['server_cpu']:.2f}s  other "
                        f"{r['other_pct']:.0f}%  load {r['load']:.2f}  {summary}"
                        f"\n    {fmt_phases(phases)}" + (f"\n    {fmt_rpcs(rpcs)}" if rpcs else ""),
                        flush=True,
                    )
            if args.diagnose is not None:
                args.diagnose.mkdir(parents=True, exist_ok=True)
                print(f"\n== diagnostic runs (not timed above), files in {args.diagnose}")
                for name in names:
                    flags, server = variants[name]
                    prof = args.diagnose / f"{name}.profile.gz"
                    extra = [f"--profile={prof}"]
                    log = args.diagnose / f"{name}.grpc.log"
                    remote = name != "disk"
                    if remote:
                        extra += grpc_log_flags(log)
                    base = ws.new_output_base(f"diag-{name}")
                    r = timed_run(ws, base, server, [*cmd, *flags, *extra], quiet, profile=prof)
                    ws.shutdown()
                    print(
                        f"-- {name}: {r['wall']:.2f}s (with profile and log), other {r['other_pct']:.0f}%"
                    )
                    print(summarize_profile(prof))
                    if remote:
                        entries = read_grpc_log(log)
                        print(summarize_grpc_log(entries))
                        wait_quiet([daemon.pid], *quiet)
                        address = memo.address if name == "memo" and memo else daemon.address
                        print(replay(entries, address))
    finally:
        if memo is not None:
            memo.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print_summary(args, runs)


def print_summary(args: argparse.Namespace, runs: dict[str, list[dict[str, object]]]) -> None:
    def med(v: list[dict[str, object]], key: str) -> float:
        return statistics.median(float(r[key]) for r in v)  # type: ignore[arg-type]

    def med_phase(v: list[dict[str, object]], key: str) -> float:
        return statistics.median(float(r["phases"][key]) for r in v)  # type: ignore[index]

    walls = {k: med(v, "wall") for k, v in runs.items()}
    low = {k: min(float(r["wall"]) for r in v) for k, v in runs.items()}  # type: ignore[arg-type]
    rows = []
    for k, v in runs.items():
        rows.append(
            [
                k,
                walls[k],
                " ".join(f"{float(r['wall']):.2f}" for r in v),  # type: ignore[arg-type]
                walls[k] / walls["disk"],
                low[k] / low["disk"],
                med(v, "bazel_cpu"),
                med(v, "server_cpu"),
                *(1000 * med_phase(v, ph) for ph in PHASES),
                f"{max(float(r['other_pct']) for r in v):.0f}%",  # type: ignore[arg-type]
            ]
        )
    print()
    print(
        table(
            [
                f"bazel {args.command} {args.target} {' '.join(args.extra)}".strip(),
                "median wall s",
                "all rounds",
                "x disk (medians)",
                "x disk (minima)",
                "bazel cpu s",
                "server cpu s",
                *(f"{ph} ms" for ph in PHASES),
                "max other",
            ],
            rows,
        )
    )
    ratio = walls["remote-exec"] / walls["disk"]
    print(
        f"\nrow: rebuild {walls['remote-exec']:.2f} s, floor {walls['disk']:.2f} s, ratio "
        f"{ratio:.2f} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'}), "
        f"{args.rounds} rounds (phase columns: medians from each run's Bazel profile)"
    )


if __name__ == "__main__":
    main()
