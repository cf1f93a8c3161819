"""The worker's process sandbox: real processes, real namespaces (the suite runs as root).

Most behaviour is checked twice: "plain" (one Popen) and "sandbox" (every namespace, i.e. the
unshare/sh/env chain), since the two start commands in different ways and must not differ in
what the command sees.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reexec.sandbox import runner
from reexec.sandbox.runner import (
    NamespaceOptions,
    RunRequest,
    RunResult,
    SandboxUnavailable,
    check_namespace_support,
    run_command,
)

ALL_NS = NamespaceOptions(network=True, pid=True, private_tmp=True)
PATH = "/usr/bin:/bin"
TEST_USER = "reexec-test-user"
SH = shutil.which("sh") or "/bin/sh"
ENV = shutil.which("env") or "/usr/bin/env"

# Timeouts and grace kept short so the whole file runs in a few seconds.
T = 0.3

_ns_reason = check_namespace_support(ALL_NS)
needs_ns = pytest.mark.skipif(_ns_reason is not None, reason=f"namespaces: {_ns_reason}")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(params=["plain", "sandbox"])
def ns(request: pytest.FixtureRequest) -> NamespaceOptions:
    if request.param == "plain":
        return NamespaceOptions()
    if _ns_reason is not None:
        pytest.skip(f"namespaces: {_ns_reason}")
    return ALL_NS


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The action's working directory (writable by the test user too)."""
    d = tmp_path / "work"
    d.mkdir()
    d.chmod(0o777)
    return d


def make_request(
    work: Path,
    argv: list[str],
    env: dict[str, str] | None = None,
    **kw: object,
) -> RunRequest:
    base = RunRequest(
        argv=argv,
        env={"PATH": PATH} if env is None else env,
        cwd=work,
        stdout_path=work.parent / "stdout",
        stderr_path=work.parent / "stderr",
        timeout_s=10.0,
        kill_grace_s=T,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


async def run(
    work: Path, argv: list[str], env: dict[str, str] | None = None, **kw: object
) -> tuple[RunResult, str, str]:
    req = make_request(work, argv, env, **kw)
    result = await run_command(req)
    return result, req.stdout_path.read_text(), req.stderr_path.read_text()


def sh(script: str) -> list[str]:
    return [SH, "-c", script]


def unique_sleep() -> str:
    """A sleep duration no other process on the machine uses, to find it in /proc."""
    return str(random.randint(10**6, 10**7))


def live_sleeps(duration: str) -> list[int]:
    """Live (non-zombie) `sleep DURATION` processes, by host PID."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline[:2] == [b"sleep", duration.encode()] and state != "Z":
            found.append(int(entry))
    return found


async def assert_gone(duration: str) -> None:
    # SIGKILL is delivered asynchronously: allow the kernel a moment.
    with trio.move_on_after(2):
        while live_sleeps(duration):
            await trio.sleep(0.01)
    assert live_sleeps(duration) == []


# -- environment, cwd, stdio -----------------------------------------------------------------------


async def test_env_is_exact(work: Path, ns: NamespaceOptions, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REEXEC_WORKER_SECRET", "leaked")
    result, out, err = await run(work, [ENV], {"A": "1", "B": "x=y z"}, namespaces=ns)
    assert (result.exit_code, err) == (0, "")
    assert sorted(out.splitlines()) == ["A=1", "B=x=y z"]

    result, out, _ = await run(work, [ENV], {}, namespaces=ns)  # not even PATH
    assert (result.exit_code, out) == (0, "")


@pytest.mark.parametrize("mode", ["plain", "sandbox"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    env=st.dictionaries(
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="=\0"), min_size=1),
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0")),
        max_size=8,
    )
)
def test_env_round_trips_any_names_and_values(mode: str, env: dict[str, str]) -> None:
    if mode == "sandbox" and _ns_reason is not None:
        pytest.skip(f"namespaces: {_ns_reason}")
    namespaces = ALL_NS if mode == "sandbox" else NamespaceOptions()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        req = make_request(work, [ENV, "-0"], env, namespaces=namespaces)
        result = trio.run(run_command, req)
        assert result.exit_code == 0, req.stderr_path.read_text()
        entries = req.stdout_path.read_bytes().split(b"\0")[:-1]
        seen = dict(os.fsdecode(e).split("=", 1) for e in entries)
        assert seen == env


async def test_bare_argv0_is_resolved_with_the_request_path(
    work: Path, ns: NamespaceOptions, monkeypatch: pytest.MonkeyPatch
):
    bindir = work / "bin"
    bindir.mkdir()
    tool = bindir / "reexec-test-tool"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)

    result, out, _ = await run(work, ["reexec-test-tool"], {"PATH": str(bindir)}, namespaces=ns)
    assert (result.exit_code, out) == (0, "tool ran\n")
    # Relative PATH entries are relative to the working directory, as for execvp.
    result, out, _ = await run(work, ["reexec-test-tool"], {"PATH": "bin"}, namespaces=ns)
    assert (result.exit_code, out) == (0, "tool ran\n")

    # The worker's PATH is never used...
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    result, _, err = await run(work, ["reexec-test-tool"], {"PATH": PATH}, namespaces=ns)
    assert result.exit_code == 127
    assert "command not found (PATH=/usr/bin:/bin)" in err

    # ...and without a PATH, execvpe's default list (/bin:/usr/bin) is searched.
    result, out, _ = await run(work, ["echo", "hi"], {}, namespaces=ns)
    assert (result.exit_code, out) == (0, "hi\n")


async def test_argv0_with_equals_sign_keeps_env_exact(work: Path, ns: NamespaceOptions):
    # `env NAME=VALUE... CMD` would take "./e=nv" for an assignment; the runner must not.
    (work / "e=nv").symlink_to(ENV)
    result, out, err = await run(work, ["./e=nv"], {"X": "1"}, namespaces=ns)
    assert (result.exit_code, out, err) == (0, "X=1\n", "")


async def test_cwd_and_stdin(work: Path, ns: NamespaceOptions):
    result, out, _ = await run(
        work, sh("pwd; readlink /proc/self/fd/0; cat | wc -c"), namespaces=ns
    )
    assert result.exit_code == 0
    assert out.split() == [str(work), "/dev/null", "0"]


async def test_stdout_and_stderr_go_to_separate_files(work: Path, ns: NamespaceOptions):
    req = make_request(work, sh("echo out; echo err >&2"), namespaces=ns)
    req.stdout_path.write_text("old content that must be truncated\n" * 10)
    req.stdout_path.chmod(0o600)
    old_umask = os.umask(0o077)
    try:
        result = await run_command(req)
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0
    assert req.stdout_path.read_text() == "out\n"
    assert req.stderr_path.read_text() == "err\n"
    for path in (req.stdout_path, req.stderr_path):
        assert path.stat().st_mode & 0o777 == 0o644


async def test_stdout_and_stderr_may_be_one_file(work: Path):
    req = make_request(work, sh("echo out; echo err >&2; echo out2"))
    req = replace(req, stderr_path=req.stdout_path)
    assert (await run_command(req)).exit_code == 0
    assert req.stdout_path.read_text() == "out\nerr\nout2\n"


async def test_output_to_dev_null_leaves_it_alone(work: Path):
    mode = os.stat("/dev/null").st_mode
    req = make_request(work, sh("echo out; echo err >&2"))
    req = replace(req, stdout_path=Path("/dev/null"), stderr_path=Path("/dev/null"))
    assert (await run_command(req)).exit_code == 0
    assert os.stat("/dev/null").st_mode == mode


async def test_large_output_goes_to_the_file(work: Path, ns: NamespaceOptions):
    req = make_request(work, ["head", "-c", "50000000", "/dev/zero"], namespaces=ns)
    result = await run_command(req)
    assert result.exit_code == 0
    assert req.stdout_path.stat().st_size == 50_000_000


# -- exit codes and start failures ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "code"),
    [("exit 0", 0), ("exit 3", 3), ("kill -KILL $$", 137), ("kill -SEGV $$", 139)],
)
async def test_exit_codes(work: Path, ns: NamespaceOptions, script: str, code: int):
    result, _, _ = await run(work, sh(script), namespaces=ns)
    assert result == RunResult(code, False, result.started_at, result.finished_at)
    assert result.started_at <= result.finished_at


async def test_command_not_found(work: Path, ns: NamespaceOptions):
    result, out, err = await run(work, ["no-such-command-xyz", "arg"], namespaces=ns)
    assert (result.exit_code, result.timed_out, out) == (127, False, "")
    assert result.error == "reexec: no-such-command-xyz: command not found (PATH=/usr/bin:/bin)"
    assert err == result.error + "\n"

    result, _, err = await run(work, ["./missing"], namespaces=ns)
    assert result.exit_code == 127
    assert err == "reexec: ./missing: No such file or directory\n"


async def test_not_executable_and_bad_format(work: Path, ns: NamespaceOptions):
    (work / "plain-file").write_text("echo hi\n")
    result, _, err = await run(work, ["./plain-file"], namespaces=ns)
    assert result.exit_code == 126
    assert result.error == "reexec: ./plain-file: cannot execute: Permission denied"
    assert err == result.error + "\n"

    # No #! line: the kernel says ENOEXEC; the sandbox must not quietly run it with /bin/sh.
    (work / "plain-file").chmod(0o755)
    result, out, err = await run(work, ["./plain-file"], namespaces=ns)
    assert (result.exit_code, out) == (126, "")
    assert result.error == "reexec: ./plain-file: cannot execute: Exec format error"


async def test_invalid_requests_raise(work: Path):
    for bad in (
        make_request(work, []),
        make_request(work, ["true"], {"A=B": "1"}),
        make_request(work, ["true"], cwd=Path("relative")),
        make_request(work, ["true"], timeout_s=-1),
    ):
        with pytest.raises(ValueError):
            await run_command(bad)
    with pytest.raises(FileNotFoundError):
        await run_command(make_request(work, ["true"], cwd=work / "missing"))


# -- timeouts, cancellation, stragglers ----------------------------------------------------------


async def test_timeout_term_honoured(work: Path, ns: NamespaceOptions):
    script = "trap 'echo got TERM; exit 0' TERM; echo started; sleep 100 & wait"
    t0 = time.monotonic()
    result, out, _ = await run(work, sh(script), namespaces=ns, timeout_s=T, kill_grace_s=5)
    elapsed = time.monotonic() - t0
    assert (result.exit_code, result.timed_out) == (0, True)
    assert out == "started\ngot TERM\n"
    assert T <= elapsed < T + 1  # did not wait for the grace


async def test_timeout_kill_after_grace(work: Path, ns: NamespaceOptions):
    t0 = time.monotonic()
    result, out, _ = await run(
        work, sh("trap '' TERM; echo partial; sleep 100"), namespaces=ns, timeout_s=T
    )
    elapsed = time.monotonic() - t0
    assert (result.exit_code, result.timed_out) == (137, True)
    assert out == "partial\n"  # partial output stays
    assert 2 * T <= elapsed < 2 * T + 1


async def test_timeout_kills_background_children(work: Path, ns: NamespaceOptions):
    d1, d2 = unique_sleep(), unique_sleep()
    script = f"(trap '' TERM; exec sleep {d1}) & sleep {d2} & echo $! > bgpid; wait"
    result, _, _ = await run(work, sh(script), namespaces=ns, timeout_s=T)
    assert result.timed_out
    await assert_gone(d1)
    await assert_gone(d2)


async def test_background_children_die_with_the_command(work: Path, ns: NamespaceOptions):
    d = unique_sleep()
    t0 = time.monotonic()
    result, _, _ = await run(work, sh(f"sleep {d} & exit 0"), namespaces=ns)
    assert (result.exit_code, result.timed_out) == (0, False)
    assert time.monotonic() - t0 < 2
    await assert_gone(d)


async def test_caller_cancellation_kills_the_group(work: Path, ns: NamespaceOptions):
    d1, d2 = unique_sleep(), unique_sleep()
    script = f"sleep {d1} & trap '' TERM; sleep {d2}"
    req = make_request(work, sh(script), namespaces=ns, timeout_s=0)  # no limit
    t0 = time.monotonic()
    with trio.move_on_after(T) as scope:
        await run_command(req)
    elapsed = time.monotonic() - t0
    assert scope.cancelled_caught  # Cancelled was re-raised, not swallowed
    assert 2 * T <= elapsed < 2 * T + 1  # SIGTERM, grace (d2 ignores TERM), SIGKILL
    await assert_gone(d1)
    await assert_gone(d2)


# -- run_as ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("run_as needs root")
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        pytest.skip("useradd is not installed")
    # Left in place afterwards: creating it is idempotent and other runs reuse it.
    subprocess.run([useradd, "--system", "--no-create-home", TEST_USER], check=True)
    return pwd.getpwnam(TEST_USER)


@needs_root
async def test_run_as(work: Path, ns: NamespaceOptions, test_user: pwd.struct_passwd):
    script = "id -u; id -g; id -G; grep CapEff /proc/self/status; touch made-by-action"
    for run_as in (TEST_USER, str(test_user.pw_uid)):
        result, out, err = await run(work, sh(script), namespaces=ns, run_as=run_as)
        assert (result.exit_code, err) == (0, "")
        # Its primary group and no supplementary groups (root's are dropped).
        uid, gid = str(test_user.pw_uid), str(test_user.pw_gid)
        assert out.split() == [uid, gid, gid, "CapEff:", "0000000000000000"]
        assert (work / "made-by-action").stat().st_uid == test_user.pw_uid
        assert (work.parent / "stdout").stat().st_uid == 0  # opened by the worker
        (work / "made-by-action").unlink()


@needs_root
async def test_run_as_cannot_execute_root_only_file(
    work: Path, ns: NamespaceOptions, test_user: pwd.struct_passwd
):
    (work / "secret-tool").write_text("#!/bin/sh\necho ran\n")
    (work / "secret-tool").chmod(0o700)
    result, out, _ = await run(work, ["./secret-tool"], namespaces=ns, run_as=TEST_USER)
    assert (result.exit_code, out) == (126, "")
    assert "Permission denied" in result.error


async def test_run_as_unknown_user_is_a_value_error(work: Path):
    with pytest.raises(ValueError, match="no such user 'no-such-user-xyz'"):
        await run_command(make_request(work, ["true"], run_as="no-such-user-xyz"))


# -- namespaces ----------------------------------------------------------------------------------


def test_check_namespace_support() -> None:
    assert check_namespace_support(NamespaceOptions()) is None
    # This suite's machines (root in a VM) support all of them; say so loudly if not.
    if os.geteuid() == 0 and sys.platform == "linux":
        assert _ns_reason is None


async def test_unsupported_namespace_raises(work: Path, monkeypatch: pytest.MonkeyPatch):
    reason = "unshare --net failed: Operation not permitted"
    monkeypatch.setitem(runner._probe_cache, "network", reason)
    assert check_namespace_support(NamespaceOptions(network=True)) == reason
    req = make_request(work, ["true"], namespaces=NamespaceOptions(network=True))
    with pytest.raises(SandboxUnavailable, match=reason):
        await run_command(req)
    assert not req.stdout_path.exists()  # nothing ran, not even unsandboxed


@needs_ns
async def test_network_namespace_has_only_loopback(work: Path):
    result, out, _ = await run(work, ["cat", "/proc/net/dev"])
    assert result.exit_code == 0 and len(out.splitlines()) > 3  # the host has more than lo

    result, out, _ = await run(
        work, ["cat", "/proc/net/dev"], namespaces=NamespaceOptions(network=True)
    )
    assert result.exit_code == 0
    assert [line.split(":")[0].strip() for line in out.splitlines()[2:]] == ["lo"]

    # Loopback is up: a local server works; the host's addresses are unreachable.
    code = (
        "import socket\n"
        "s = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(s.getsockname())\n"
        "print('loopback ok')\n"
    )
    result, out, err = await run(
        work, [sys.executable, "-c", code], namespaces=NamespaceOptions(network=True)
    )
    assert (result.exit_code, out) == (0, "loopback ok\n"), err


@needs_ns
async def test_network_namespace_cannot_reach_the_host(work: Path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        script = f"exec 3<>/dev/tcp/127.0.0.1/{port}" if shutil.which("bash") else ""
        if not script:
            pytest.skip("needs bash for /dev/tcp")
        argv = ["bash", "-c", script]
        result, _, _ = await run(work, argv)
        assert result.exit_code == 0  # reachable without the namespace
        result, _, err = await run(work, argv, namespaces=NamespaceOptions(network=True))
        assert result.exit_code != 0 and "Connection refused" in err


@needs_ns
async def test_pid_namespace(work: Path):
    result, out, _ = await run(work, sh("echo $$ $PPID"), namespaces=NamespaceOptions(pid=True))
    assert result.exit_code == 0
    pid, ppid = map(int, out.split())
    assert ppid == 1 and pid <= 3  # the command is PID 1's child


@needs_ns
async def test_pid_namespace_catches_setsid_escapees(work: Path):
    # setsid leaves the process group: only the PID namespace can catch it.
    d1, d2 = unique_sleep(), unique_sleep()
    script = f"setsid sleep {d1} & (trap '' TERM; setsid sleep {d2}) & trap '' TERM; sleep 100"
    result, _, _ = await run(work, sh(script), namespaces=NamespaceOptions(pid=True), timeout_s=T)
    assert (result.exit_code, result.timed_out) == (137, True)
    await assert_gone(d1)
    await assert_gone(d2)

    d3 = unique_sleep()
    result, _, _ = await run(work, sh(f"setsid sleep {d3} & exit 0"), namespaces=ALL_NS)
    assert result.exit_code == 0
    await assert_gone(d3)


@pytest.fixture
def real_tmp_marker() -> Iterator[Path]:
    with tempfile.NamedTemporaryFile(dir="/tmp", prefix="reexec-marker-") as f:
        yield Path(f.name)


@pytest.fixture
def work_outside_tmp() -> Iterator[Path]:
    """A working directory not under /tmp (a real worker keeps its directories elsewhere)."""
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="reexec-test-"))
    try:
        (base / "work").mkdir()
        (base / "work").chmod(0o777)
        yield base / "work"
    finally:
        shutil.rmtree(base)


@needs_ns
async def test_private_tmp_is_empty_and_private(work_outside_tmp: Path, real_tmp_marker: Path):
    inside = Path(f"/tmp/reexec-inside-{os.getpid()}")
    script = f"ls -A /tmp; test -e {real_tmp_marker} && echo LEAK; echo x > {inside}; cat {inside}"
    result, out, err = await run(
        work_outside_tmp, sh(script), namespaces=NamespaceOptions(private_tmp=True)
    )
    assert (result.exit_code, out, err) == (0, "x\n", "")
    assert not await trio.Path(inside).exists()


@needs_ns
async def test_private_tmp_keeps_a_working_directory_under_tmp(work: Path, real_tmp_marker: Path):
    assert work.is_relative_to("/tmp")  # pytest's tmp_path
    (work / "input").write_text("data\n")
    script = f"cat {work}/input; pwd; test -e {real_tmp_marker} || echo private; ls -A /tmp"
    result, out, err = await run(work, sh(script), namespaces=NamespaceOptions(private_tmp=True))
    assert (result.exit_code, err) == (0, "")
    # Only the path down to the working directory is there.
    assert out.split() == ["data", str(work), "private", work.parts[2]]


@needs_ns
async def test_private_tmp_binds_tmp_dir(work: Path, tmp_path: Path):
    tmp_dir = tmp_path / "action-tmp"
    tmp_dir.mkdir()
    (tmp_dir / "given").write_text("from the worker\n")
    result, out, _ = await run(
        work,
        sh("cat /tmp/given; echo from the action > /tmp/made"),
        namespaces=NamespaceOptions(private_tmp=True),
        tmp_dir=tmp_dir,
    )
    assert (result.exit_code, out) == (0, "from the worker\n")
    assert (tmp_dir / "made").read_text() == "from the action\n"


@needs_ns
@needs_root
async def test_all_namespaces_with_run_as(
    work_outside_tmp: Path, test_user: pwd.struct_passwd, real_tmp_marker: Path
):
    script = (
        "id -u; echo $PPID; ls -A /tmp | wc -l; test -e"
        f" {real_tmp_marker} || echo private; touch /tmp/ok && echo tmp-writable;"
        " grep -c : /proc/net/dev"
    )
    result, out, err = await run(work_outside_tmp, sh(script), namespaces=ALL_NS, run_as=TEST_USER)
    assert (result.exit_code, err) == (0, "")
    assert out.split() == [str(test_user.pw_uid), "1", "0", "private", "tmp-writable", "1"]
