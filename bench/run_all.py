"""Run every benchmark, each once the machine is quiet, and keep their outputs.

Usage: .venv/bin/python bench/run_all.py [--out DIR] [--runs N] [NAME ...]
Waits (up to --max-wait seconds) until other processes use < 10% of a core before each run,
so that shared machines give comparable figures; every script also reports the other load
during its measured phases. Outputs go to DIR/NAME.RUN.txt (default DIR: a new temp dir).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_busy_seconds

BENCH = Path(__file__).resolve().parent
ALL = ["bytestream", "find_missing", "small_blobs", "get_action_result"]


def wait_quiet(max_wait: float, threshold_pct: float = 10.0, window: float = 3.0) -> float:
    """Block until the machine's busy CPU over `window` seconds is below the threshold."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = machine_busy_seconds()
        time.sleep(window)
        pct = 100 * (machine_busy_seconds() - b0) / window
        if pct < threshold_pct or time.monotonic() > deadline:
            return pct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=ALL)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--max-wait", type=float, default=120.0)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="reexec-bench-results-"))
    out.mkdir(parents=True, exist_ok=True)
    for run in range(1, args.runs + 1):
        for name in args.names:
            pct = wait_quiet(args.max_wait)
            path = out / f"{name}.{run}.txt"
            print(f"{name} run {run} (machine busy {pct:.0f}% before start) -> {path}", flush=True)
            with open(path, "w") as f:
                subprocess.run(
                    [sys.executable, str(BENCH / f"{name}.py")],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
            tail = path.read_text().splitlines()
            for line in tail:
                if line.startswith("other processes"):
                    print("   ", line)
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
