"""The import contracts in pyproject.toml hold, and they do fail on a planted violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def _lint(project: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the package and its contracts, to plant violations in."""
    shutil.copytree(
        ROOT / "reexec", tmp_path / "reexec", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_contracts_hold(project: Path) -> None:
    result = _lint(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "cas/digest.py",
            "from reexec.daemon import config  # noqa",
            "Libraries never import the daemon BROKEN",
        ),
        (
            "cas/store.py",
            "import reexec.sched.state  # noqa",
            "Storage knows nothing of scheduling or workers BROKEN",
        ),
        (
            "sched/scheduler.py",
            "import reexec.sandbox.outputs  # noqa",
            "The scheduler and the worker share only the worker protocol BROKEN",
        ),
        (
            "daemon/lifecycle.py",
            "import reexec.daemon.app  # noqa",
            "No import cycles between sibling packages or modules anywhere in reexec BROKEN",
        ),
    ],
)
def test_a_planted_violation_fails(project: Path, module: str, line: str, contract: str) -> None:
    _plant(project / "reexec" / module, line)
    result = _lint(project)
    assert result.returncode != 0
    assert contract in result.stdout, result.stdout
