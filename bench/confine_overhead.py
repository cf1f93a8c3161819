"""Cost of confining a trivial action with bubblewrap, next to the unconfined runner and a bare
`subprocess.run` of the same command, measured in the same run.

Runs `/bin/true` N times (default 200) sequentially, interleaving the variants in rounds so
that a burst of other load hits all of them alike:

  subprocess.run       fork+exec+wait, output to /dev/null: the floor
  subprocess.run of the bwrap argv (host mode), with and without a network namespace: what
                       bubblewrap itself costs, the floor of any confinement with it
  run_command          the unconfined runner (Popen through Trio, outputs to files, pidfd)
  run_confined host    bwrap as `nobody` (when root): user+mount+pid+ipc+uts+net+cgroup
                       namespaces, read-only host, private /tmp, /dev, /proc; waits for the
                       namespace to be empty
  run_confined input_root   the same with a busybox sysroot as `/` (BuildStream's mode)

Prints the mean per exec in ms, the ratio to the floor, the machine, the date and how busy the
rest of the machine was (CPU used by other processes during the measured rounds).

Usage: .venv/bin/python bench/confine_overhead.py [-n 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from bench._common import machine_busy_seconds, machine_facts
from reexec.sandbox.confine import ConfineMode, ConfineSpec, bwrap_argv
from reexec.sandbox.confine_setup import (
    as_user,
    confinement_problem,
    find_bwrap,
    host_user,
    make_searchable,
)
from reexec.sandbox.confined_runner import run_confined
from reexec.sandbox.runner import RunRequest, run_command

TRUE = "/bin/true"
ROUND = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="execs per variant (default 200)")
    args = parser.parse_args()
    bwrap, user = find_bwrap(), host_user(None)
    problem = confinement_problem(bwrap, user)
    if problem is not None:
        sys.exit(f"confinement unavailable: {problem}")
    assert bwrap is not None

    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        base = Path(d)
        make_searchable(base)
        host_root, sysroot = base / "host-root", base / "sysroot"
        for p in (host_root, sysroot, sysroot / "bin"):
            p.mkdir()
        busybox = shutil.which("busybox")
        if busybox is None:
            sys.exit("busybox-static is not installed")
        shutil.copy(busybox, sysroot / "bin" / "busybox")
        os.symlink("busybox", sysroot / "bin" / "true")
        if user is not None:
            for p in (host_root, sysroot):
                os.chown(p, user.uid, user.gid)

        def request(root: Path, argv: list[str]) -> RunRequest:
            return RunRequest(
                argv=argv,
                env={"PATH": "/usr/bin:/bin"},
                cwd=root,
                stdout_path=base / "stdout",
                stderr_path=base / "stderr",
                timeout_s=60,
            )

        plain_req = request(host_root, [TRUE])
        host_spec = ConfineSpec(ConfineMode.HOST, str(host_root), str(host_root))
        input_spec = ConfineSpec(ConfineMode.INPUT_ROOT, str(sysroot), str(sysroot))
        input_req = request(sysroot, ["/bin/true"])

        def bwrap_cmd(network: bool) -> list[str]:
            spec = replace(host_spec, network=network)
            return as_user(user) + bwrap_argv(bwrap, spec, [TRUE], {"PATH": "/usr/bin:/bin"})

        bwrap_private, bwrap_shared = bwrap_cmd(False), bwrap_cmd(True)

        def bwrap_floor(argv: list[str]) -> None:
            subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, env={}
            )

        def floor() -> None:
            subprocess.run(
                [TRUE], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, env={}
            )

        async def plain() -> None:
            assert (await run_command(plain_req)).exit_code == 0

        async def host() -> None:
            r = await run_confined(plain_req, host_spec, bwrap=bwrap, user=user)
            assert r.exit_code == 0, (base / "stderr").read_text()

        async def input_root() -> None:
            r = await run_confined(input_req, input_spec, bwrap=bwrap, user=user)
            assert r.exit_code == 0, (base / "stderr").read_text()

        totals = {
            "subprocess.run": 0.0,
            "run_command": 0.0,
            "bwrap": 0.0,
            "bwrap_net": 0.0,
            "host": 0.0,
            "input_root": 0.0,
        }

        async def measure() -> tuple[float, float]:
            await plain()
            await host()
            await input_root()  # warm-ups
            busy0, wall0, self0 = machine_busy_seconds(), time.monotonic(), _self_cpu()
            done = 0
            while done < args.n:
                k = min(ROUND, args.n - done)
                t0 = time.perf_counter()
                for _ in range(k):
                    floor()
                totals["subprocess.run"] += time.perf_counter() - t0
                for name, argv in (("bwrap", bwrap_private), ("bwrap_net", bwrap_shared)):
                    t0 = time.perf_counter()
                    for _ in range(k):
                        bwrap_floor(argv)
                    totals[name] += time.perf_counter() - t0
                for name, fn in (
                    ("run_command", plain),
                    ("host", host),
                    ("input_root", input_root),
                ):
                    t0 = time.perf_counter()
                    for _ in range(k):
                        await fn()
                    totals[name] += time.perf_counter() - t0
                done += k
            wall = time.monotonic() - wall0
            other = machine_busy_seconds() - busy0 - (_self_cpu() - self0)
            return wall, other

        wall, other = trio.run(measure)

    base_s = totals["subprocess.run"] / args.n
    print(f"== confinement overhead: {args.n} sequential execs of /bin/true per variant ==")
    print(machine_facts())
    print(f"bwrap as uid {user.uid if user else os.geteuid()}; {shutil.which('bwrap')}")
    print(
        f"other processes during the measurement: {100 * other / wall:.0f}% of a core on average "
        f"(over {wall:.1f} s)"
    )
    labels = {
        "subprocess.run": "subprocess.run (floor)",
        "run_command": "run_command, unconfined",
        "bwrap": "subprocess.run of the bwrap argv",
        "bwrap_net": "  the same, --share-net",
        "host": "run_confined, host mode",
        "input_root": "run_confined, input_root mode",
    }
    for name, label in labels.items():
        mean = totals[name] / args.n
        extra = f"   x{mean / base_s:5.2f}   +{(mean - base_s) * 1e3:6.2f} ms over the floor"
        print(f"  {label:36s} {mean * 1e3:7.2f} ms{extra}")


def _self_cpu() -> float:
    """CPU of this process and its reaped children (the measured commands themselves)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":
    main()
