"""The e2e workspace itself, built by Bazel without any server: it must be green locally,
so a red remote build points at reexecd, not at the workspace."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.harness import BazelWorkspace, parse_process_summary

pytestmark = pytest.mark.e2e


def test_everything_builds_and_tests_locally(bazel_workspace: BazelWorkspace) -> None:
    result = bazel_workspace.run("test", "--spawn_strategy=local", "//...")
    summary = parse_process_summary(result.stderr)
    assert set(summary) == {"internal", "local"}
    assert summary["local"] >= 15
    assert "Executed 2 out of 2 tests: 2 tests pass." in result.stdout

    bin_dir = bazel_workspace.bin_dir()
    assert (bin_dir / "gen/sub/dir/x.txt").read_text() == "x:hello-from-a\nx:HELLO-FROM-B\n"
    assert (bin_dir / "tree/tree/nested/deeper/three.txt").read_text() == "three\n"
    assert (bin_dir / "cc/generated.h").is_file()


def test_cached_results_are_counted_as_remote_cache_hits(
    bazel_workspace: BazelWorkspace,
) -> None:
    disk_cache = bazel_workspace.root / "disk-cache"
    flags = ["--spawn_strategy=local", f"--disk_cache={disk_cache}"]
    cold = parse_process_summary(bazel_workspace.run("test", *flags, "//...").stderr)
    bazel_workspace.run("clean")
    warm = parse_process_summary(bazel_workspace.run("test", *flags, "//...").stderr)
    assert warm == {"remote cache hit": cold["local"], "internal": cold["internal"]}


def test_fail_target_fails(bazel_workspace: BazelWorkspace) -> None:
    result = bazel_workspace.run("build", "--spawn_strategy=local", "//fail:fail", check=False)
    assert result.returncode == 1
    assert "REEXEC_EXPECTED_FAILURE" in result.stderr


def test_only_the_failing_targets_are_manual(bazel_workspace: BazelWorkspace) -> None:
    # `manual` keeps them out of `build //...` / `test //...` (query still lists them).
    result = bazel_workspace.run("query", r"attr(tags, '\bmanual\b', //...)")
    assert set(result.stdout.split()) == {"//fail:fail", "//slow:timeout"}


def test_slow_test_times_out(bazel_workspace: BazelWorkspace) -> None:
    result = bazel_workspace.run(
        "test", "--spawn_strategy=local", "--test_timeout=3", "//slow:timeout", check=False
    )
    assert result.returncode == 3
    assert "//slow:timeout" in result.stdout
    assert "TIMEOUT" in result.stdout


def test_batch_mode_works(tmp_path: Path) -> None:
    with BazelWorkspace(tmp_path / "bazel", batch=True) as workspace:
        result = workspace.run("build", "--spawn_strategy=local", "//gen:b")
        assert parse_process_summary(result.stderr)["local"] == 2
        assert not (workspace.default_output_base / "server" / "server.pid.txt").exists()
