"""Bazel 4.2.3 building and testing the workspace with reexecd as its remote executor."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.e2e.harness import (
    BazelWorkspace,
    ReexecdProcess,
    free_port,
    parse_process_summary,
    remote_exec_flags,
)

pytestmark = pytest.mark.e2e


def _spawned(summary: dict[str, int]) -> int:
    return sum(n for kind, n in summary.items() if kind != "internal")


def test_remote_execution_then_fully_cached(
    bazel_workspace: BazelWorkspace, reexecd: ReexecdProcess
) -> None:
    flags = remote_exec_flags(reexecd.address)
    first = bazel_workspace.run("test", *flags, "--noremote_accept_cached", "//...")
    summary = parse_process_summary(first.stderr)
    spawned = _spawned(summary)
    # Every spawned action ran on our worker: nothing local, nothing from a cache.
    assert summary.get("remote", 0) == spawned >= 10, summary
    assert "2 tests pass" in first.stdout

    second = bazel_workspace.run(
        "test", *flags, "//...", output_base=bazel_workspace.new_output_base("cached")
    )
    cached = parse_process_summary(second.stderr)
    assert cached.get("remote cache hit", 0) == spawned, second.stderr
    assert "(cached) PASSED" in second.stdout
    assert "operation completed" in reexecd.log_text()


def test_failing_action_fails_cleanly_with_its_stderr(
    bazel_workspace: BazelWorkspace, reexecd: ReexecdProcess
) -> None:
    result = bazel_workspace.run(
        "build", *remote_exec_flags(reexecd.address), "//fail:fail", check=False
    )
    assert result.returncode == 1, result.stderr
    assert "REEXEC_EXPECTED_FAILURE: this action fails on purpose" in result.stderr
    # A failed action is not cached: a second build runs it again and fails the same way.
    again = bazel_workspace.run(
        "build", *remote_exec_flags(reexecd.address), "//fail:fail", check=False
    )
    assert again.returncode == 1 and "REEXEC_EXPECTED_FAILURE" in again.stderr


def test_action_timeout_is_enforced(
    bazel_workspace: BazelWorkspace, reexecd: ReexecdProcess
) -> None:
    started = time.monotonic()
    result = bazel_workspace.run(
        "test",
        *remote_exec_flags(reexecd.address),
        "--test_timeout=3",
        "//slow:timeout",
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert "TIMEOUT" in result.stdout
    assert time.monotonic() - started < 60
    # The worker killed the action's whole process group: nothing of it keeps running.
    time.sleep(0.5)
    assert not _processes_matching("sleep_test.sh"), "the timed-out action is still running"


def _processes_matching(fragment: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
            if fragment in cmdline:
                pids.append(int(proc.name))
    return pids


def _config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_split_scheduler_and_two_workers_route_by_platform(
    bazel_workspace: BazelWorkspace, tmp_path: Path
) -> None:
    port = free_port()
    sched_cfg = _config(
        tmp_path / "scheduler.toml",
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
        '[scheduler]\nsupported_platform_properties = { pool = "exact" }\n',
    )
    scheduler = ReexecdProcess(
        tmp_path / "sched-data",
        port=port,
        args=["scheduler", "--config", str(sched_cfg), "--data-dir", str(tmp_path / "sched-data")],
        log_dir=tmp_path / "sched-log",
    )
    workers = []
    with scheduler:
        for pool in ("small", "big"):
            cfg = _config(
                tmp_path / f"worker-{pool}.toml",
                f'[worker]\nscheduler = "grpc://127.0.0.1:{port}"\nworker_id = "w-{pool}"\n'
                f'max_inflight_tasks = 2\nplatform = {{ pool = "{pool}" }}\n',
            )
            w = ReexecdProcess(
                tmp_path / f"{pool}-data",
                args=["worker", "--config", str(cfg), "--data-dir", str(tmp_path / f"{pool}-data")],
                log_dir=tmp_path / f"{pool}-log",
                wait_ready=False,
            )
            w.start()
            workers.append(w)
        try:
            deadline = time.monotonic() + 30
            while scheduler.log_text().count("worker connected") < 2:
                assert time.monotonic() < deadline, scheduler.log_text()
                time.sleep(0.1)
            flags = remote_exec_flags(scheduler.address)
            big = bazel_workspace.run(
                "build", *flags, "--remote_default_exec_properties=pool=big", "//gen/..."
            )
            assert parse_process_summary(big.stderr).get("remote", 0) >= 3
            ran_on = re.findall(r"operation completed .*worker=(\S+)", scheduler.log_text())
            assert ran_on and set(ran_on) == {"w-big"}, ran_on
            small = bazel_workspace.run(
                "build",
                *flags,
                "--remote_default_exec_properties=pool=small",
                "//gen/...",
                output_base=bazel_workspace.new_output_base("small"),
            )
            assert parse_process_summary(small.stderr).get("remote", 0) >= 3
            ran_on = re.findall(r"operation completed .*worker=(\S+)", scheduler.log_text())
            assert "w-small" in ran_on
            # An unsupported property is refused with a clear message, not queued forever.
            refused = bazel_workspace.run(
                "build",
                *flags,
                "--remote_default_exec_properties=gpu=yes",
                "//gen:a",
                output_base=bazel_workspace.new_output_base("gpu"),
                check=False,
            )
            assert refused.returncode != 0 and "'gpu'" in refused.stderr
            for w in workers:
                assert w.stop() == 0, w.log_text()
        finally:
            for w in workers:
                if w.returncode is None:
                    w.stop()
