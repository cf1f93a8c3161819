"""Bazel prints the web UI's link for a failed remote action, and the link shows its stderr."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import BazelWorkspace, ReexecdProcess, free_port, remote_exec_flags

pytestmark = pytest.mark.e2e


@pytest.fixture
def reexecd_with_ui(tmp_path: Path) -> Iterator[tuple[ReexecdProcess, str]]:
    port, status_port = free_port(), free_port()
    base = f"http://127.0.0.1:{status_port}"
    cfg = tmp_path / "reexecd.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
        f'[status]\nlisten = "127.0.0.1:{status_port}"\nbase_url = "{base}/"\n'
        "show_blob_contents = true\n"
    )
    data = tmp_path / "reexecd-data"
    daemon = ReexecdProcess(
        data,
        port=port,
        args=["serve", "--config", str(cfg), "--data-dir", str(data)],
        log_dir=tmp_path / "reexecd-log",
    )
    with daemon:
        yield daemon, base


def test_failed_action_prints_the_url_of_its_page_with_its_stderr(
    bazel_workspace: BazelWorkspace, reexecd_with_ui: tuple[ReexecdProcess, str]
) -> None:
    daemon, base = reexecd_with_ui
    result = bazel_workspace.run(
        "build", *remote_exec_flags(daemon.address), "//fail:fail", check=False
    )
    assert result.returncode == 1, result.stderr
    urls = re.findall(re.escape(base) + r"/operation/[0-9a-f-]+", result.stderr)
    assert urls, result.stderr
    with urllib.request.urlopen(urls[0], timeout=20) as page:
        html = page.read().decode()
    stderr = re.search(r'<pre class="output" id="stderr">(.*?)</pre>', html, re.S)
    assert stderr and "REEXEC_EXPECTED_FAILURE: this action fails on purpose" in stderr.group(1)
