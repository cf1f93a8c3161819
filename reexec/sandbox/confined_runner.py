"""Run one action's command confined by bubblewrap: the `run_command` of confined workers.

Same request and result types as `runner.run_command` (exact environment, stdout/stderr to
files, time limit as a cancel scope, exit code 128+N for a signal), different mechanism: the
command line comes from `confine.bwrap_argv`, bwrap is started as the unprivileged host user
`user` (None: the worker's own, unprivileged, user), and the call returns only once bwrap's PID
namespace is empty (`ns_watch.NamespaceWatch`), so no process the action started, double-forked
or `setsid` or ignoring SIGTERM, can still write when outputs are collected.

Ending early (timeout or cancellation): SIGTERM to the command's process group inside the
sandbox, then, if bwrap has not exited within `kill_grace_s`, SIGKILL to bwrap's group; through
`--die-with-parent` its PID 1 and with it the whole namespace then get SIGKILL. Differences from the plain runner: a command that cannot be executed makes
bwrap exit 1 with "bwrap: execvp ...: No such file or directory" on stderr, not 126/127
(checked ahead in `host` mode, where the host's file system is the action's, so the usual
126/127 result still comes back there); `run_as` is replaced by `user`.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import trio

from reexec.sandbox.confine import ConfineMode, ConfineSpec, bwrap_argv
from reexec.sandbox.confine_setup import HostUser, as_user, make_searchable
from reexec.sandbox.ns_watch import NamespaceWatch
from reexec.sandbox.runner import RunRequest, RunResult, SandboxUnavailable
from reexec.sandbox.spawner import SpawnedProcess, spawn

__all__ = ["run_confined"]

_WRAPPER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
}
# After bwrap has exited, its PID 1 needs only to finish killing the namespace.
_NAMESPACE_GONE_TIMEOUT_S = 30.0


async def run_confined(
    request: RunRequest, spec: ConfineSpec, *, bwrap: str, user: HostUser | None
) -> RunResult:
    """Run `request.argv` confined as `spec` says; return once every process of it is gone.

    `request.cwd`, `namespaces`, `run_as` and `tmp_dir` are not used: `spec` says where the
    command runs and what it sees. Raises SandboxUnavailable if bwrap cannot be started or the
    namespace outlives bwrap (then outputs must not be trusted), OSError for files.
    """
    if request.timeout_s < 0 or math.isnan(request.timeout_s):
        raise ValueError(f"timeout_s must be >= 0 (0 = no limit): {request.timeout_s}")
    if not request.argv or not request.argv[0]:
        raise ValueError("argv must be a non-empty sequence of strings")
    watch = NamespaceWatch()
    fds: list[int] = []
    try:
        fds, error = await trio.to_thread.run_sync(_prepare, request, spec, user)
        started_at = time.time()
        if error is not None:  # already written to the stderr file
            code = 127 if error[0] in (errno.ENOENT, errno.ENOTDIR) else 126
            return RunResult(code, False, started_at, time.time(), error=error[1])
        try:
            argv = as_user(user)
        except FileNotFoundError as e:
            raise SandboxUnavailable(str(e)) from None
        argv += bwrap_argv(
            bwrap, replace(spec, status_fd=watch.write_fd), request.argv, request.env
        )
        with trio.CancelScope(shield=True):  # a process once started must be supervised
            try:
                # From the spawner's long-lived thread: --die-with-parent follows the thread
                # that forked bwrap, and Trio's worker threads exit after 10 s idle.
                proc = await spawn(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fds[0],
                    stderr=fds[-1],
                    env=_WRAPPER_ENV,
                    cwd="/",
                    start_new_session=True,
                    pass_fds=(watch.write_fd,),
                )
            except OSError as e:
                raise SandboxUnavailable(f"bwrap could not be started: {e}") from None
            finally:
                watch.close_write_end()
        for fd in set(fds):
            os.close(fd)
        fds = []
        gone = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.watch)
            try:
                exit_code, timed_out = await _supervise(
                    proc,
                    request.timeout_s,
                    request.kill_grace_s,
                    lambda: _children(watch.child_pid),
                )
            finally:
                # Also when cancelled: whoever removes the work directory next must not race
                # a straggler. Bounded; the watch task may be cancelled by then, but once the
                # PID 1 is known its pidfd is all this needs.
                with trio.CancelScope(shield=True):
                    gone = await watch.wait_gone(_NAMESPACE_GONE_TIMEOUT_S)
                nursery.cancel_scope.cancel()
                if gone:
                    _reap_orphan(watch.child_pid)
        if not gone:
            raise SandboxUnavailable(
                f"the action's PID namespace (PID 1 = host PID {watch.child_pid}) was still "
                f"alive {_NAMESPACE_GONE_TIMEOUT_S:g} s after bwrap exited"
            )
        return RunResult(exit_code, timed_out, started_at, time.time())
    finally:
        for fd in set(fds):
            os.close(fd)
        watch.close()


async def _supervise(
    proc: SpawnedProcess,
    timeout_s: float,
    grace_s: float,
    commands: Callable[[], list[int]] = list,
) -> tuple[int, bool]:
    """Wait for bwrap (pidfd, without reaping) within the time limit; end the action on timeout
    or cancellation; reap bwrap only after a final SIGKILL of its group, so the group's ID
    cannot have been reused by then.

    Ending: SIGTERM to the command's process group inside the sandbox (`commands()`: the
    children of bwrap's PID 1, whose group after `--new-session` is the PID 1's own; a PID 1
    signalled from outside its namespace ignores signals it has no handler for), so the command
    sees SIGTERM as it would unconfined; if bwrap is still there after `grace_s`, SIGKILL to bwrap's
    group, and the namespace dies with it (`--die-with-parent`)."""
    pidfd = os.pidfd_open(proc.pid)
    timed_out = False

    async def exited() -> None:
        await trio.lowlevel.wait_readable(pidfd)

    async def end_group() -> None:
        targets = []
        for pid in commands():
            try:
                targets.append(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for pgid in set(targets):
            _killpg(pgid, signal.SIGTERM)
        if not targets:  # not started yet, or no /proc children list: bwrap itself
            _killpg(proc.pid, signal.SIGTERM)
        with trio.move_on_after(grace_s):
            await exited()
            return
        _killpg(proc.pid, signal.SIGKILL)
        await exited()

    try:
        try:
            with trio.move_on_after(timeout_s if timeout_s > 0 else math.inf) as scope:
                await exited()
            if scope.cancelled_caught:
                timed_out = True
                with trio.CancelScope(shield=True):
                    await end_group()
        except BaseException:
            with trio.CancelScope(shield=True):
                await end_group()
                _killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            raise
        with trio.CancelScope(shield=True):
            _killpg(proc.pid, signal.SIGKILL)
            returncode = await proc.wait()
    finally:
        os.close(pidfd)
    return (128 - returncode if returncode < 0 else returncode), timed_out


def _reap_orphan(pid: int | None) -> None:
    """Reap bwrap's PID 1 if it was handed to this process (a child subreaper, see
    `confine_setup.become_subreaper`) when bwrap exited first; else its new parent does."""
    if pid is None:
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not ours: reaped by bwrap, or by PID 1 where this process is no subreaper


def _children(pid: int | None) -> list[int]:
    """Host PIDs of `pid`'s children (bwrap's PID 1: the command), [] if unknown."""
    if pid is None:
        return []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _prepare(
    request: RunRequest, spec: ConfineSpec, user: HostUser | None
) -> tuple[list[int], tuple[int, str] | None]:
    """Everything before the spawn that touches the file system, in one thread hop: the exec
    root reachable for `user`, the output files opened, and (host mode) argv[0] looked up. A
    command that cannot be executed gets its error written to its stderr file and returned."""
    if user is not None:
        _reachable(spec)
    fds = _open_outputs(request)
    try:
        error = _exec_problem(request, user) if spec.mode is ConfineMode.HOST else None
        if error is not None:
            _write(fds[-1], error[1])
    except BaseException:
        for fd in set(fds):
            os.close(fd)
        raise
    return fds, error


def _reachable(spec: ConfineSpec) -> None:
    """bwrap, running as `user`, resolves the exec root on the host: its ancestors must be
    searchable by others. Checked per action (a few stats) as well as at start-up, because
    something else may tighten a shared parent meanwhile (pytest resets /tmp/pytest-of-USER to
    0700 whenever a session starts)."""
    try:
        make_searchable(Path(spec.exec_root).parent)
    except PermissionError as e:
        raise SandboxUnavailable(str(e)) from None


def _open_outputs(request: RunRequest) -> list[int]:
    def one(path: os.PathLike[str]) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != 0o644:
            os.fchmod(fd, 0o644)
        return fd

    out = one(request.stdout_path)
    if os.path.abspath(request.stderr_path) == os.path.abspath(request.stdout_path):
        return [out]
    try:
        return [out, one(request.stderr_path)]
    except BaseException:
        os.close(out)
        raise


def _exec_problem(request: RunRequest, user: HostUser | None) -> tuple[int, str] | None:
    """In host mode the command sees the host's files: find argv[0] as execvp would, with the
    request's PATH, as the user the command runs as on the host (others' permission bits)."""
    name = request.argv[0]
    if "/" in name:
        candidates = [name if os.path.isabs(name) else os.path.join(request.cwd, name)]
    else:
        path = request.env.get("PATH", os.defpath)
        candidates = [os.path.join(d or str(request.cwd), name) for d in path.split(":")]
    first: int | None = None
    for c in candidates:
        try:
            st = os.stat(c)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                first = first or e.errno
            continue
        if not stat.S_ISREG(st.st_mode) or not _may_execute(st, user):
            first = first or errno.EACCES
            continue
        return None
    err = first or errno.ENOENT
    if err in (errno.ENOENT, errno.ENOTDIR):
        where = f"PATH={request.env['PATH']}" if "PATH" in request.env else os.defpath
        message = (
            f"reexec: {name}: No such file or directory"
            if "/" in name
            else f"reexec: {name}: command not found ({where})"
        )
    else:
        message = f"reexec: {name}: cannot execute: {os.strerror(err)}"
    return err, message


def _may_execute(st: os.stat_result, user: HostUser | None) -> bool:
    uid, gid = (user.uid, user.gid) if user else (os.geteuid(), os.getegid())
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _write(fd: int, message: str) -> None:
    data = (message + "\n").encode(errors="replace")
    while data:
        data = data[os.write(fd, data) :]
