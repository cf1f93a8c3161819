"""run_confined: the runner of confined workers, with real bwrap."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from reexec.sandbox.confine import ConfineMode, ConfineSpec
from reexec.sandbox.confine_setup import become_subreaper
from reexec.sandbox.confined_runner import run_confined
from reexec.sandbox.runner import RunRequest
from tests.sandbox.test_confine import BWRAP, USER, make_searchable, needs_bwrap

pytestmark = needs_bwrap


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_searchable(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    if USER is not None:
        os.chown(root, USER.uid, USER.gid)
    return root


def request(root: Path, script: str, timeout_s: float = 30, **env: str) -> RunRequest:
    return RunRequest(
        argv=["sh", "-c", script],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=root,
        stdout_path=root.parent / "stdout",
        stderr_path=root.parent / "stderr",
        timeout_s=timeout_s,
        kill_grace_s=2,
    )


def spec(root: Path) -> ConfineSpec:
    return ConfineSpec(ConfineMode.HOST, str(root), str(root))


async def run(root: Path, req: RunRequest):  # type: ignore[no-untyped-def]
    assert BWRAP is not None
    return await run_confined(req, spec(root), bwrap=BWRAP, user=USER)


def read(path: Path) -> str:
    return path.read_text()


async def test_exit_code_env_and_identity(root: Path) -> None:
    result = await run(root, request(root, 'echo "$FOO $HOME"; id -u; exit 3', FOO="bar"))
    assert result.exit_code == 3 and not result.timed_out
    out = read(root.parent / "stdout").splitlines()
    assert out == ["bar ", "0"]  # HOME unset: the environment is exactly the request's


async def test_signal_exit_is_128_plus_n(root: Path) -> None:
    result = await run(root, request(root, "kill -TERM $$"))
    assert result.exit_code == 128 + 15


async def test_command_not_found_is_127_with_a_message(root: Path) -> None:
    req = request(root, "")
    req = RunRequest(**{**req.__dict__, "argv": ["no-such-tool-xyz"]})
    result = await run(root, req)
    assert result.exit_code == 127 and "command not found" in result.error
    assert "no-such-tool-xyz" in read(root.parent / "stderr")


async def test_timeout_kills_everything_even_setsid_and_sigterm_ignorers(root: Path) -> None:
    script = (
        "trap '' TERM; "
        f"setsid sh -c \"trap '' TERM; sleep 3; echo late > {root}/marker\" & "
        "sleep 100"
    )
    t0 = time.monotonic()
    result = await run(root, request(root, script, timeout_s=0.5))
    assert result.timed_out
    assert time.monotonic() - t0 < 5
    await trio.sleep(4)
    assert not (root / "marker").exists()


async def test_cancellation_kills_the_namespace(root: Path) -> None:
    script = f'setsid sh -c "sleep 2; echo late > {root}/marker" & sleep 100'
    with trio.move_on_after(0.5):
        await run(root, request(root, script))
    await trio.sleep(3)
    assert not (root / "marker").exists()


async def test_timeout_sends_sigterm_to_the_command_first(root: Path) -> None:
    script = "trap 'echo got-term; exit 3' TERM; sleep 100 & wait"
    t0 = time.monotonic()
    result = await run(root, request(root, script, timeout_s=0.5))
    assert result.timed_out and result.exit_code == 3
    assert read(root.parent / "stdout") == "got-term\n"
    assert time.monotonic() - t0 < 2  # it exited on SIGTERM: no wait for the grace period


def _zombie_children() -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            out.append(int(entry))
    return out


async def test_bwraps_pid_1_is_reaped_by_the_subreaper_worker(root: Path) -> None:
    assert become_subreaper()
    before = set(_zombie_children())
    for script in ("true", f'setsid sh -c "sleep 1; echo x > {root}/m" & exit 0'):
        result = await run(root, request(root, script))
        assert result.exit_code == 0
    await trio.sleep(0.2)
    assert set(_zombie_children()) <= before
