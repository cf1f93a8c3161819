"""Bazel 4.2.3 on tests/e2e/workspace: local vs remote execution on `reexecd serve` vs fully cached.

Uses the e2e harness (tests/e2e/harness.py): a private copy of the workspace, reexecd as a
subprocess (`ReexecdProcess`, default config: local worker with one slot per CPU), and
`bazel test //...` in three fresh output bases:
  local   --spawn_strategy=local (no sandbox, no remote)
  remote  remote_exec_flags(...) --noremote_accept_cached: every spawn runs on reexecd's worker
  cached  remote_exec_flags(...) in another fresh output base: every spawn is an action cache hit
Each output base's Bazel server is started first (`bazel info`, not timed), so the timed
command measures loading, analysis and execution, not JVM start-up. Median of `--rounds` (default
3, interleaved) wall times and ratios to the local build; the process summaries (`INFO: N processes: ...`) are checked.

Usage: .venv/bin/python bench/bazel_remote.py [--target //...]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _sched_common import BENCH_TMPDIR, banner, table

from tests.e2e.harness import (
    BazelWorkspace,
    ReexecdProcess,
    bazel_available,
    parse_process_summary,
    remote_exec_flags,
)


def timed(ws: BazelWorkspace, base: Path, *args: str) -> tuple[float, dict[str, int], str]:
    ws.run("info", "release", output_base=base)  # start this output base's server
    t0 = time.perf_counter()
    result = ws.run(*args, output_base=base, timeout=600)
    elapsed = time.perf_counter() - t0
    return elapsed, parse_process_summary(result.stderr), result.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="//...")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not bazel_available():
        sys.exit("bazel is not installed (apt-get install -y bazel-bootstrap bazel-rules-java)")
    banner("Bazel 4.2.3: local vs remote execution vs fully cached")
    tmp = Path(tempfile.mkdtemp(prefix="reexec-bench-bazel-", dir=BENCH_TMPDIR))
    rows = []
    try:
        with (
            BazelWorkspace(tmp / "bazel") as ws,
            ReexecdProcess(tmp / "reexecd-data", log_dir=tmp / "reexecd-log") as daemon,
        ):
            flags = remote_exec_flags(daemon.address)
            cmd = ["test", args.target]
            variants = {
                "local": ["--spawn_strategy=local"],
                "remote": [*flags, "--noremote_accept_cached"],
                "cached": flags,
            }
            walls: dict[str, list[float]] = {k: [] for k in variants}
            sums: dict[str, dict[str, int]] = {}
            for rnd in range(args.rounds):
                for name, extra in variants.items():
                    base = ws.new_output_base(f"{name}{rnd}")
                    load = Path("/proc/loadavg").read_text().split()[0]
                    wall, summary, out = timed(ws, base, *cmd, *extra)
                    walls[name].append(wall)
                    sums[name] = summary
                    print(
                        f"round {rnd + 1} {name:6s}: {wall:6.2f}s  {summary}  "
                        f"(load average before: {load})",
                        flush=True,
                    )
                    if name == "cached":
                        assert "(cached) PASSED" in out
                ws.shutdown()  # one JVM per output base: do not keep them all
            spawned = sum(n for k, n in sums["remote"].items() if k != "internal")
            assert sums["remote"].get("remote", 0) == spawned > 0, sums["remote"]
            assert sums["cached"].get("remote cache hit", 0) == spawned, sums["cached"]
            assert sums["local"].get("local", 0) == spawned, sums["local"]
        med = {k: statistics.median(v) for k, v in walls.items()}
        low = {k: min(v) for k, v in walls.items()}
        labels = {
            "local": "local (--spawn_strategy=local)",
            "remote": "remote execution (--noremote_accept_cached)",
            "cached": "fully cached (fresh output base)",
        }
        rows = [
            [
                labels[k],
                med[k],
                " ".join(f"{w:.2f}" for w in walls[k]),
                med[k] / med["local"],
                low[k] / low["local"],
                sums[k],
            ]
            for k in variants
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        table(
            [
                f"bazel test {args.target}",
                "median wall s",
                "all rounds",
                "x local (medians)",
                "x local (minima)",
                "processes",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
