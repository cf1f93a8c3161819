"""Cost of starting a command through the sandbox runner, against a bare `subprocess.run`.

Runs `/bin/true` N times (default 300) sequentially three ways in the same process:
`subprocess.run` (the baseline: fork+exec+wait, output to /dev/null), `run_command` with no
namespace (one Popen through Trio, output to files, pidfd wait, final killpg), and, where the
kernel allows, `run_command` with every namespace (the unshare/sh/env chain). Prints the mean
per exec in ms and the ratio to the baseline.

Usage: .venv/bin/python bench/runner_overhead.py [-n 300]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from reexec.sandbox.runner import (
    NamespaceOptions,
    RunRequest,
    check_namespace_support,
    run_command,
)

TRUE = "/bin/true"


def bench_subprocess(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(
            [TRUE], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, env={}
        )
    return (time.perf_counter() - t0) / n


def bench_runner(n: int, work: Path, namespaces: NamespaceOptions) -> float:
    request = RunRequest(
        argv=[TRUE],
        env={},
        cwd=work,
        stdout_path=work / "stdout",
        stderr_path=work / "stderr",
        timeout_s=60,
        namespaces=namespaces,
    )

    async def main() -> float:
        await run_command(request)  # warm-up (thread pool, namespace probe)
        t0 = time.perf_counter()
        for _ in range(n):
            result = await run_command(request)
            assert result.exit_code == 0, result
        return (time.perf_counter() - t0) / n

    return trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="execs per variant (default 300)")
    args = parser.parse_args()

    all_ns = NamespaceOptions(network=True, pid=True, private_tmp=True)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        work = Path(d)
        subprocess.run([TRUE], check=True)  # warm-up
        base = bench_subprocess(args.n)
        plain = bench_runner(args.n, work, NamespaceOptions())
        reason = check_namespace_support(all_ns)
        sandboxed = None if reason else bench_runner(args.n, work, all_ns)

    print(f"{args.n} sequential execs of {TRUE}, mean per exec:")
    print(f"  subprocess.run                      {base * 1e3:7.3f} ms")
    print(f"  run_command (plain)                 {plain * 1e3:7.3f} ms   x{plain / base:.2f}")
    if sandboxed is None:
        print(f"  run_command (all namespaces)        unavailable: {reason}")
    else:
        print(
            f"  run_command (net+pid+private /tmp)  {sandboxed * 1e3:7.3f} ms"
            f"   x{sandboxed / base:.2f}"
        )


if __name__ == "__main__":
    main()
