"""Bazel 4.2.3 with reexecd as its remote cache: upload, full hits after clean, and restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.harness import (
    BazelWorkspace,
    ReexecdProcess,
    parse_process_summary,
    remote_cache_flags,
)

pytestmark = pytest.mark.e2e

TARGETS = ["//..."]


def _spawned(summary: dict[str, int]) -> int:
    """Processes that were not Bazel-internal (the ones a cache can answer)."""
    return sum(n for kind, n in summary.items() if kind != "internal")


def test_bazel_remote_cache_round_trip(
    bazel_workspace: BazelWorkspace, reexecd: ReexecdProcess, tmp_path: Path
) -> None:
    flags = remote_cache_flags(reexecd.address)

    cold = bazel_workspace.run("test", *flags, *TARGETS)
    cold_summary = parse_process_summary(cold.stderr)
    assert cold_summary.get("remote cache hit", 0) == 0, cold.stderr
    spawned = _spawned(cold_summary)
    assert spawned >= 10, cold_summary
    assert list((reexecd.data_dir / "cas" / "blobs" / "sha256").iterdir()), "nothing uploaded"

    # A clean output base: every spawned action, tests included, must come from the cache.
    warm = bazel_workspace.run(
        "test", *flags, *TARGETS, output_base=bazel_workspace.new_output_base("warm")
    )
    warm_summary = parse_process_summary(warm.stderr)
    assert warm_summary.get("remote cache hit", 0) == spawned, warm.stderr
    assert _spawned(warm_summary) == spawned, warm_summary
    assert "(cached) PASSED" in warm.stdout

    # The filesystem stores survive a restart: same hits from a new daemon process.
    assert reexecd.stop() == 0, reexecd.log_text()
    with ReexecdProcess(reexecd.data_dir, log_dir=tmp_path / "log2") as again:
        restarted = bazel_workspace.run(
            "test",
            *remote_cache_flags(again.address),
            *TARGETS,
            output_base=bazel_workspace.new_output_base("restarted"),
        )
        summary = parse_process_summary(restarted.stderr)
        assert summary.get("remote cache hit", 0) == spawned, restarted.stderr

        # Action cache entries are per instance name: another instance sees none of them.
        other = bazel_workspace.run(
            "build",
            *remote_cache_flags(again.address, instance="other"),
            "//gen:a",
            output_base=bazel_workspace.new_output_base("other-instance"),
        )
        assert parse_process_summary(other.stderr).get("remote cache hit", 0) == 0, other.stderr
        assert again.stop() == 0, again.log_text()
