"""Headless Chromium (Debian's `chromium`) for the web UI's browser tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    """The browser's path; skips the test when it is not installed (scripts/
    install-system-deps.sh installs it, so this happens only where apt could not)."""
    path = chromium()
    if path is None:
        pytest.skip("chromium is not installed (scripts/install-system-deps.sh installs it)")
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    # A profile per call: Chromium refuses to share one between concurrent instances.
    with tempfile.TemporaryDirectory(prefix="reexec-chromium-") as profile:
        return subprocess.run(
            [
                require_chromium(),
                "--headless",
                "--no-sandbox",  # root in a container: Chromium's own sandbox cannot start
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def dump_dom(url: str, *, wait_ms: int = 0, timeout: float = 60) -> str:
    """The DOM after the page loaded and ran its scripts for `wait_ms` of virtual time."""
    args = ["--dump-dom"]
    if wait_ms:
        args.append(f"--virtual-time-budget={wait_ms}")
    out = _run([*args, url], timeout)
    assert out.returncode == 0 and "<html" in out.stdout, out.stderr[-2000:]
    return out.stdout


def screenshot(
    url: str, path: Path, *, size: tuple[int, int] = (1280, 1000), wait_ms: int = 0
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [f"--screenshot={path}", f"--window-size={size[0]},{size[1]}"]
    if wait_ms:
        args.append(f"--virtual-time-budget={wait_ms}")
    out = _run([*args, url], 60)
    assert out.returncode == 0 and path.stat().st_size > 0, out.stderr[-2000:]
    return path
