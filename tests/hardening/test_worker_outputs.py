"""Hostile action outputs on the real local worker (`serve`): symlinks that point outside the
sandbox must be reported as symlinks, never followed, and never touch what they point at.

A "victim" file and directory live outside the daemon's data directory; actions make their
outputs symlinks to them (as files, as directories, and as a parent directory of a declared
output). After each action: the victim is unchanged (content, mode, still there), its content
is not in the ActionResult nor the CAS, and the daemon still runs normal actions.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reexec import fastpb
from tests.conftest import make_config
from tests.hardening.conftest import RawClient, ThreadDaemon, sha

SECRET = b"victim content that must never reach the CAS\n"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RawClient, Path]]:
    base = tmp_path_factory.mktemp("worker-outputs")
    victim = base / "victim"
    victim.mkdir()
    (victim / "secret").write_bytes(SECRET)
    os.chmod(victim / "secret", 0o640)
    d = ThreadDaemon(make_config(base / "data"), local_worker=True)
    try:
        d.start()
    except RuntimeError as e:
        reason = repr(e.__cause__ or e)
        if any(w in reason for w in ("bwrap", "bubblewrap", "namespace", "confine")):
            pytest.skip(f"the default confined worker cannot start here: {reason[:300]}")
        raise
    client = RawClient(d.port)
    try:
        yield client, victim
    finally:
        client.close()
        d.stop()


def _victim_state(victim: Path) -> tuple[Any, ...]:
    st = os.lstat(victim / "secret")
    return (stat.S_IMODE(st.st_mode), st.st_nlink, (victim / "secret").read_bytes(),
            sorted(os.listdir(victim)), stat.S_IMODE(os.lstat(victim).st_mode))  # fmt: skip


def _run(client: RawClient, victim: Path, script: str, outputs: list[str], salt: bytes) -> Any:
    before = _victim_state(victim)
    req = client.action_request(["/bin/sh", "-c", script], salt=salt, output_paths=outputs)
    resp = client.execute(req)
    assert _victim_state(victim) == before, "the action's outputs changed a file outside it"
    assert client.find_missing(sha(SECRET)) == [sha(SECRET).hash], "the victim reached the CAS"
    for f in resp.result.output_files:
        assert f.digest.hash != sha(SECRET).hash and f.contents != SECRET, f
    return resp


@pytest.mark.parametrize(
    ("script", "outputs", "expect"),
    [
        ('ln -s "$V/secret" out', ["out"], "symlink"),
        ('ln -s "$V" outdir', ["outdir"], "symlink"),
        ('ln -s "$V" parent', ["parent/secret"], "absent"),
        ('mkdir d && ln -s "$V/secret" d/link && ln -s "$V" d/dirlink', ["d"], "tree"),
    ],
    ids=["file-symlink", "dir-symlink", "through-parent-symlink", "symlinks-in-output-dir"],
)
def test_symlink_outputs_are_not_followed(serve, script: str, outputs: list[str],
                                          expect: str) -> None:  # fmt: skip
    client, victim = serve
    script = f"V={victim}; {script}"
    resp = _run(client, victim, script, outputs, salt=script.encode())
    assert resp.status.code == 0, resp.status
    r = resp.result
    assert r.exit_code == 0, r
    if expect == "symlink":
        targets = [s.target for s in r.output_symlinks] + [
            s.target for s in (*r.output_file_symlinks, *r.output_directory_symlinks)
        ]
        assert targets and all(t.startswith(str(victim)) for t in targets), r
        assert not r.output_files and not r.output_directories, r
    elif expect == "absent":
        assert not r.output_files and not r.output_directories, r
    else:
        (od,) = r.output_directories
        tree = fastpb.Tree.FromString(client.read_blob(od.tree_digest))
        assert not tree.root.files and not tree.root.directories, tree
        assert sorted(s.name for s in tree.root.symlinks) == ["dirlink", "link"], tree


def test_worker_still_runs_actions(serve) -> None:
    client, _ = serve
    resp = client.execute(client.action_request(["/bin/sh", "-c", "echo fine"], salt=b"end"))
    assert resp.result.exit_code == 0
    out = resp.result.stdout_raw or client.read_blob(resp.result.stdout_digest)
    assert out == b"fine\n"
