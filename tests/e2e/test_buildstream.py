"""BuildStream 2.8.1 builds a small project by remote execution against
`reexecd serve --config examples/buildstream.toml` (issue 10's acceptance).

The actions run in `input_root` confinement: the sysroot is `/`, so `/bin/sh` is the project's
static busybox, `%{install-root}` (`/buildstream-install`) is inside the input root, and the
host's `/` is untouched. A second build with a fresh local cache must take every artifact from
the server: the only way a fresh cache gets them is the Remote Asset API (FetchBlob of the
artifact's URN) plus the CAS.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.buildstream import (
    BUSYBOX,
    EXPECTED,
    Bst,
    ensure_buildstream,
    rpc_count,
    tree_bytes,
    write_project,
)
from tests.e2e.harness import REPO_ROOT, ReexecdProcess, free_port

pytestmark = pytest.mark.e2e

CONFIG = REPO_ROOT / "examples" / "buildstream.toml"


@pytest.fixture(scope="module")
def bst_path() -> Path:
    bst, why = ensure_buildstream()
    if bst is None:
        pytest.skip(why)
    return bst


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ReexecdProcess]:
    port = free_port()
    data = tmp_path / "reexecd-data"
    daemon = ReexecdProcess(
        data,
        port=port,
        args=[
            "serve",
            "--config",
            str(CONFIG),
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data),
        ],
        log_dir=tmp_path / "reexecd-log",
    )
    try:
        with daemon:
            yield daemon
    finally:
        print(f"--- reexecd log ---\n{daemon.log_text()[-20000:]}")


def _host_root() -> set[str]:
    return set(os.listdir("/"))


def test_buildstream_builds_remotely_in_the_input_root(
    bst_path: Path, server: ReexecdProcess, tmp_path: Path
) -> None:
    if not BUSYBOX.exists():
        pytest.fail("busybox-static is not installed (scripts/install-system-deps.sh)")
    url = f"http://127.0.0.1:{server.port}"
    project = write_project(tmp_path)
    host_root_before = _host_root()

    first = Bst(bst_path, project, tmp_path / "first", url)
    built = first.run("build", "consumer.bst", "probe.bst")
    (tmp_path / "first-build.log").write_text(built.output)
    assert built.returncode == 0, built.output[-8000:]
    # hello, consumer and probe each ran as one action on reexecd's confined worker.
    assert server.log_text().count("operation completed") == 3, server.log_text()[-4000:]
    assert "status=OK" in server.log_text()

    # Artifacts, byte for byte.
    for element, files in EXPECTED.items():
        out = tmp_path / "checkout" / element
        got = first.run("artifact", "checkout", "--deps", "none", element, "--directory", str(out))
        assert got.returncode == 0, got.output[-4000:]
        assert tree_bytes(out) == files, element

    # The probe: /bin/sh inside was the sysroot's busybox, and / was the input root.
    probe = tmp_path / "checkout" / "probe"
    got = first.run(
        "artifact", "checkout", "--deps", "none", "probe.bst", "--directory", str(probe)
    )
    assert got.returncode == 0, got.output[-4000:]
    busybox_sha = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()
    assert (probe / "probe" / "sh-sha256").read_text().split()[0] == busybox_sha
    assert (probe / "probe" / "self-exe").read_text().strip() == "/bin/busybox"
    listing = set((probe / "probe" / "root-listing").read_text().split())
    assert {"bin", "buildstream", "buildstream-install"} <= listing
    assert not listing & {"etc", "var", "home", "root", "work"}, listing

    # The host's / is unchanged (no /buildstream, no /buildstream-install).
    assert _host_root() == host_root_before

    # A fresh local cache: artifacts come back through the Remote Asset API and the CAS.
    status = server.data_dir / "reexecd.sock"
    fetched_before = rpc_count(status, "/build.bazel.remote.asset.v1.Fetch/FetchBlob")
    second = Bst(bst_path, project, tmp_path / "second", url)
    again = second.run("build", "consumer.bst", "probe.bst")
    (tmp_path / "second-build.log").write_text(again.output)
    assert again.returncode == 0, again.output[-8000:]
    assert server.log_text().count("operation completed") == 3, "the second build executed"
    # Every artifact of the fresh cache came through FetchBlob (its URN -> the artifact proto).
    fetched = rpc_count(status, "/build.bazel.remote.asset.v1.Fetch/FetchBlob") - fetched_before
    assert fetched >= 4, (fetched, again.output[-4000:])
    for element in ("consumer.bst", "probe.bst"):
        assert re.search(rf"pull:{re.escape(element)}.*Pulled artifact", again.output), element
    for element, files in EXPECTED.items():
        out = tmp_path / "checkout2" / element
        got = second.run("artifact", "checkout", "--deps", "none", element, "--directory", str(out))
        assert got.returncode == 0, got.output[-4000:]
        assert tree_bytes(out) == files, element
    assert _host_root() == host_root_before
