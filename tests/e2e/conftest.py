"""Fixtures for the end-to-end tests (reexecd subprocess + real Bazel)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    BAZEL_MISSING_MESSAGE,
    BazelWorkspace,
    ReexecdProcess,
    bazel_available,
    shutdown_all_workspaces,
)


@pytest.fixture(scope="session", autouse=True)
def _no_bazel_server_outlives_the_session() -> Iterator[None]:
    yield
    shutdown_all_workspaces()


@pytest.fixture
def bazel_workspace(tmp_path: Path) -> Iterator[BazelWorkspace]:
    """A fresh copy of tests/e2e/workspace; its Bazel servers stop at teardown.

    Fails (rather than skips) when Bazel is missing: the e2e suite is meant to run.
    """
    if not bazel_available():
        pytest.fail(BAZEL_MISSING_MESSAGE, pytrace=False)
    with BazelWorkspace(tmp_path / "bazel") as workspace:
        yield workspace


@pytest.fixture
def reexecd(tmp_path: Path) -> Iterator[ReexecdProcess]:
    """reexecd serving on a free port with a data directory under tmp_path.

    Its log is printed at teardown, which pytest shows only for failing tests.
    """
    daemon = ReexecdProcess(tmp_path / "reexecd-data", log_dir=tmp_path / "reexecd-log")
    try:
        with daemon:
            yield daemon
    finally:
        log = daemon.log_text()
        if log:
            print(f"--- reexecd log ({daemon.log_path}) ---\n{log}")
