"""Confinement with bubblewrap, run for real: each escape from issue 10 fails inside the sandbox.

Every test builds an exec root like the worker does (directories handed to the unprivileged
user, one input hardlinked from a root-owned, read-only "cache" file), starts bwrap as that
user with the argv from `reexec.sandbox.confine`, waits for bwrap and then for its PID
namespace to be empty (`NamespaceWatch`), and checks the host afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio

from reexec.sandbox.confine import (
    ConfineMode,
    ConfineSpec,
    bwrap_argv,
    child_pid_from_status,
    inside_path,
)
from reexec.sandbox.confine_setup import (
    HostUser,
    as_user,
    confinement_problem,
    find_bwrap,
    host_user,
    make_searchable,
)
from reexec.sandbox.ns_watch import NamespaceWatch

BWRAP = find_bwrap()
USER = host_user(None)
_PROBLEM = confinement_problem(BWRAP, USER)
needs_bwrap = pytest.mark.skipif(_PROBLEM is not None, reason=f"no confinement here: {_PROBLEM}")
PATH_ENV = {"PATH": "/usr/bin:/bin"}
SHARED = b"shared input, also the CAS's blob\n"


# -- pure argv --------------------------------------------------------------------------------


def test_host_mode_argv_orders_mounts_and_sets_exact_env() -> None:
    spec = ConfineSpec(ConfineMode.HOST, "/w/root", "/w/root/sub", tmp_dir="/w/tmp", status_fd=7)
    argv = bwrap_argv("bwrap", spec, ["cc", "-c"], {"A": "1", "LD_PRELOAD": "x"})
    joined = " ".join(argv)
    assert "--ro-bind / / --dev /dev --proc /proc --bind /w/tmp /tmp --bind /w/root /w/root" in (
        joined
    )
    assert "--share-net" not in argv
    assert argv[argv.index("--chdir") + 1] == "/w/root/sub"
    assert argv[argv.index("--json-status-fd") + 1] == "7"
    assert argv.index("--clearenv") < argv.index("--setenv")
    assert argv[-3:] == ["--", "cc", "-c"]
    assert {"--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"} <= set(argv)


def test_input_root_mode_binds_the_exec_root_on_slash() -> None:
    spec = ConfineSpec(
        ConfineMode.INPUT_ROOT,
        "/w/root",
        "/w/root/buildstream/p/e.bst",
        network=True,
        uid=1000,
        gid=100,
        ro_binds=(("/usr/share/zoneinfo", "/usr/share/zoneinfo"),),
    )
    argv = bwrap_argv("bwrap", spec, ["sh"], {})
    joined = " ".join(argv)
    assert "--bind /w/root / --dev /dev --proc /proc --tmpfs /tmp" in joined
    assert "--ro-bind /usr/share/zoneinfo /usr/share/zoneinfo" in joined
    assert "--ro-bind / /" not in joined
    assert argv[argv.index("--chdir") + 1] == "/buildstream/p/e.bst"
    assert "--share-net" in argv
    assert argv[argv.index("--uid") + 1] == "1000" and argv[argv.index("--gid") + 1] == "100"


@pytest.mark.parametrize(
    "spec",
    [
        ConfineSpec(ConfineMode.HOST, "/w/root", "/elsewhere"),
        ConfineSpec(ConfineMode.HOST, "w/root", "w/root"),
        ConfineSpec(ConfineMode.HOST, "/w/root/../x", "/w/x"),
        ConfineSpec(ConfineMode.HOST, "/", "/"),
        ConfineSpec(ConfineMode.OFF, "/w/root", "/w/root"),
        ConfineSpec(ConfineMode.INPUT_ROOT, "/w/root", "/w/root", ro_binds=(("/x", "/proc"),)),
        ConfineSpec(ConfineMode.INPUT_ROOT, "/w/root", "/w/root", ro_binds=(("/x", "rel"),)),
    ],
)
def test_bad_specs_are_refused(spec: ConfineSpec) -> None:
    with pytest.raises(ValueError):
        bwrap_argv("bwrap", spec, ["true"], {})


def test_inside_path_and_status_parsing() -> None:
    spec = ConfineSpec(ConfineMode.INPUT_ROOT, "/w/root", "/w/root")
    assert inside_path(spec, "/w/root") == "/"
    assert inside_path(spec, "/w/root/a/b") == "/a/b"
    assert inside_path(replace(spec, mode=ConfineMode.HOST), "/w/root/a") == "/w/root/a"
    with pytest.raises(ValueError):
        inside_path(spec, "/w/rootx")
    status = b'{ "child-pid": 4242, "pid-namespace": 1 }\n{ "exit-code": 0 }\n'
    assert child_pid_from_status(status) == 4242
    assert child_pid_from_status(b"garbage\n") is None


# -- for real ---------------------------------------------------------------------------------


@dataclass
class Box:
    base: Path
    root: Path
    tmp: Path
    cache_file: Path
    user: HostUser | None

    def spec(self, mode: ConfineMode = ConfineMode.HOST, **kw: object) -> ConfineSpec:
        return ConfineSpec(mode, str(self.root), str(self.root), tmp_dir=str(self.tmp), **kw)  # type: ignore[arg-type]


@pytest.fixture
def box(tmp_path: Path) -> Box:
    make_searchable(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache_file = cache / "blob"
    cache_file.write_bytes(SHARED)
    os.chmod(cache_file, 0o444)
    os.utime(cache_file, (1_000_000, 1_000_000))
    base = tmp_path / "work"
    root, tmp = base / "root", base / "tmp"
    for d in (base, root, tmp):
        d.mkdir()
    os.link(cache_file, root / "in.txt")
    if USER is not None:  # what the executor's hand-over does: directories, never files
        for d in (root, tmp):
            os.chown(d, USER.uid, USER.gid)
    return Box(base, root, tmp, cache_file, USER)


@dataclass
class Ran:
    exit_code: int
    stdout: str
    stderr: str
    seconds: float
    namespace_gone: bool


async def run_confined(box: Box, spec: ConfineSpec, script: str, env: dict | None = None) -> Ran:
    assert BWRAP is not None
    watch = NamespaceWatch()
    spec = replace(spec, status_fd=watch.write_fd)
    # setpriv, like the worker: Popen's user= would fork() with other libraries' at-fork hooks.
    argv = as_user(box.user) + bwrap_argv(BWRAP, spec, ["sh", "-c", script], env or PATH_ENV)
    out, err = box.base / "stdout", box.base / "stderr"
    t0 = time.monotonic()
    try:
        with _open_out(out) as o, _open_out(err) as e:
            async with trio.open_nursery() as nursery:
                proc = await trio.lowlevel.open_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=o,
                    stderr=e,
                    env={"PATH": "/usr/bin:/bin"},
                    cwd="/",
                    start_new_session=True,
                    pass_fds=(watch.write_fd,),
                )
                watch.close_write_end()
                nursery.start_soon(watch.watch)
                code = await proc.wait()
                gone = await watch.wait_gone(10)
    finally:
        watch.close()
    return Ran(code, out.read_text(), err.read_text(), time.monotonic() - t0, gone)


def _open_out(path: Path):  # type: ignore[no-untyped-def]
    return open(path, "wb")  # small local files: blocking is fine in a test


def exists(path: str | Path) -> bool:
    return os.path.lexists(path)


def assert_cas_intact(box: Box) -> None:
    st = box.cache_file.stat()
    assert hashlib.sha256(box.cache_file.read_bytes()).digest() == hashlib.sha256(SHARED).digest()
    assert st.st_mode & 0o777 == 0o444
    assert st.st_mtime == 1_000_000
    assert st.st_uid == os.geteuid()


@needs_bwrap
async def test_an_ordinary_action_runs_and_writes_its_outputs(box: Box) -> None:
    ran = await run_confined(box, box.spec(), "cat in.txt > out; echo tmp > /tmp/t; cat /tmp/t")
    assert ran.exit_code == 0, ran.stderr
    assert (box.root / "out").read_bytes() == SHARED
    assert (box.tmp / "t").read_text() == "tmp\n"  # /tmp is the per-action tmp_dir
    assert ran.namespace_gone
    assert_cas_intact(box)


@needs_bwrap
@pytest.mark.parametrize("mode", [ConfineMode.HOST, ConfineMode.INPUT_ROOT])
async def test_writes_outside_exec_root_and_private_tmp_fail(box: Box, mode: ConfineMode) -> None:
    outside = box.base / "outside"  # a sibling of the exec root on the host
    var_tmp = Path("/var/tmp") / f"reexec-escape-{os.getpid()}"
    spec = box.spec(mode)
    if mode is ConfineMode.INPUT_ROOT:
        # The busybox of the host, bound read-only, is the only shell in there.
        spec = replace(spec, ro_binds=(("/bin", "/bin"), ("/usr", "/usr"), ("/lib", "/lib")))
        if exists("/lib64"):
            spec = replace(spec, ro_binds=(*spec.ro_binds, ("/lib64", "/lib64")))
    script = (
        f"for p in {outside} {var_tmp} /etc/reexec-escape /bin/reexec-escape; do"
        f"  if echo x > $p; then echo WROTE $p; fi; done; echo ok > out"
    )
    ran = await run_confined(box, spec, script)
    assert ran.exit_code == 0, ran.stderr
    assert "WROTE /etc" not in ran.stdout and "WROTE /bin" not in ran.stdout
    assert not exists(outside)
    assert not exists(var_tmp)
    assert not exists("/etc/reexec-escape")
    assert (box.root / "out").read_text() == "ok\n"
    assert_cas_intact(box)


@needs_bwrap
async def test_a_setsid_child_is_dead_before_the_run_returns(box: Box) -> None:
    marker = box.root / "marker"
    script = (
        f'setsid sh -c "sleep 5; echo late > {marker}" </dev/null >/dev/null 2>&1 & echo started'
    )
    ran = await run_confined(box, box.spec(), script)
    assert ran.exit_code == 0 and ran.stdout == "started\n"
    assert ran.namespace_gone
    assert ran.seconds < 4, "the run waited for the child instead of killing it"
    await trio.sleep(6)
    assert not marker.exists()


@needs_bwrap
async def test_an_output_cannot_be_rewritten_through_a_kept_fd(box: Box) -> None:
    script = (
        'exec 3>> out; setsid sh -c "sleep 1; echo evil >&3" </dev/null >/dev/null 2>&1 &'
        " echo good >&3"
    )
    ran = await run_confined(box, box.spec(), script)
    assert ran.exit_code == 0, ran.stderr
    digest = hashlib.sha256((box.root / "out").read_bytes()).hexdigest()
    await trio.sleep(2)
    assert (box.root / "out").read_text() == "good\n"
    assert hashlib.sha256((box.root / "out").read_bytes()).hexdigest() == digest


@needs_bwrap
@pytest.mark.parametrize("uid", [0, 1000])
async def test_a_shared_input_cannot_be_modified(box: Box, uid: int) -> None:
    script = (
        "echo evil > in.txt && echo WROTE;"
        "echo evil >> in.txt && echo APPENDED;"
        "chmod 666 in.txt && echo CHMODDED;"
        "touch -d @0 in.txt && echo TOUCHED;"
        "chown 0:0 in.txt && echo CHOWNED;"
        "true"
    )
    ran = await run_confined(box, box.spec(uid=uid, gid=uid), script)
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout == "", ran.stdout
    assert (box.root / "in.txt").read_bytes() == SHARED
    assert_cas_intact(box)


@needs_bwrap
async def test_a_host_file_cannot_be_hardlinked_as_an_output(box: Box) -> None:
    victim = Path("/etc/passwd")
    before = os.stat(victim)
    script = (
        f"ln {victim} out && echo LINKED; ln -s {victim} sym; ln sym out2 && echo LINKED2; true"
    )
    ran = await run_confined(box, box.spec(), script)
    assert "LINKED\n" not in ran.stdout, ran.stdout
    assert not exists(box.root / "out")
    # `ln` links the symlink itself: out2 may exist, but only as a symlink (collected as one).
    assert not exists(box.root / "out2") or (box.root / "out2").is_symlink()
    after = os.stat(victim)
    assert (after.st_nlink, after.st_mode, after.st_uid) == (
        before.st_nlink,
        before.st_mode,
        before.st_uid,
    )


@needs_bwrap
async def test_a_symlink_chain_does_not_reach_a_writable_host_root(box: Box) -> None:
    (box.root / "d").mkdir()
    os.symlink("..", box.root / "d" / "up")
    os.symlink("d/up/d/up/d/up/../../../../../../..", box.root / "x")
    if USER is not None:
        os.chown(box.root / "d", USER.uid, USER.gid)
    probe = "ls x/ > listing; echo evil > x/etc/reexec-escape && echo WROTE; true"
    # Host mode: the chain reaches the host's / but it is read-only.
    ran = await run_confined(box, box.spec(), probe)
    assert "WROTE" not in ran.stdout
    assert not exists("/etc/reexec-escape")
    # Input-root mode: .. of / is /, so the chain ends in the exec root itself.
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static is not installed")
    (box.root / "bin").mkdir()
    shutil.copy(busybox, box.root / "bin" / "busybox")
    os.symlink("busybox", box.root / "bin" / "sh")
    os.symlink("busybox", box.root / "bin" / "ls")
    ran = await run_confined(
        box, box.spec(ConfineMode.INPUT_ROOT), "ls x/ > listing; ls x/etc && echo HOST; true"
    )
    assert "HOST" not in ran.stdout
    listing = (box.root / "listing").read_text().split()
    assert "in.txt" in listing and "bin" in listing
    assert "etc" not in listing and "usr" not in listing


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


@needs_bwrap
@pytest.mark.parametrize("network", [False, True])
async def test_network_is_off_unless_asked_for(box: Box, listener: int, network: bool) -> None:
    script = (
        f"/usr/bin/python3 -I -S -c \"import socket; socket.create_connection(('127.0.0.1', "
        f'{listener}), timeout=3)" && echo CONNECTED; true'
    )
    ran = await run_confined(box, box.spec(network=network), script)
    assert ("CONNECTED" in ran.stdout) is network, ran.stderr


def _start_sleeper() -> subprocess.Popen:  # type: ignore[type-arg]
    # The same host user as the action: only the PID namespace protects it.
    return subprocess.Popen([*as_user(USER), "sleep", "60"])


@needs_bwrap
async def test_a_process_outside_cannot_be_signalled(box: Box) -> None:
    outside = _start_sleeper()
    try:
        ran = await run_confined(
            box, box.spec(), f"kill -9 {outside.pid} && echo KILLED; kill -9 -1; echo done"
        )
        assert "KILLED" not in ran.stdout
        assert outside.poll() is None, "a process outside the namespace was killed"
    finally:
        outside.kill()
        outside.wait()
