"""Run one REAPI action's command on a worker: exact environment, output to files, time limit,
whole-process-group cleanup, optional user switch and Linux namespaces.

How a command is started
------------------------
* **Plain** (no namespace requested): one ``subprocess.Popen`` through
  ``trio.lowlevel.open_process`` with ``env=request.env``, ``cwd``, stdin ``/dev/null``,
  stdout/stderr on files the worker opened, ``start_new_session=True`` and, for ``run_as``,
  ``user=``/``group=``/``extra_groups=[]``. Python resolves a bare ``argv[0]`` exactly like
  ``os.execvpe`` with the *request's* environment: its ``PATH``, or ``os.defpath``
  (``/bin:/usr/bin``) when the request has no ``PATH``, which is what an exec without a shell does
  (glibc's ``execvp`` falls back to the same list). The worker's own ``PATH`` is never used.
  ``argv[0]`` is passed to the command as given.
* **Sandboxed** (any namespace): a chain of small util-linux/coreutils tools, each exec'ing the
  next, in front of the command::

      unshare [--net] [--pid --fork --kill-child] [--mount --propagation private] --
        [sh -c 'SET-UP; exec "$@"  (or, as PID 1: "$@"; exit $?)' ...]
        [setpriv --reuid U --regid G --clear-groups --]                   (run_as)
        env -i -- NAME=VALUE... argv...

  SET-UP, as root inside the namespaces: ``ip link set lo up`` (a new network namespace starts
  with loopback down, and tests that start local servers need it), then for a private /tmp a
  tmpfs (or ``tmp_dir`` bind-mounted) on /tmp, and when the working directory lives under /tmp, a
  bind of it back at its own path so absolute paths into it keep working.
  The wrappers run as root with a fixed, minimal environment (``PATH``, ``LC_ALL=C``): the
  request's environment reaches only the last step, so variables such as ``LD_PRELOAD`` cannot
  reach anything that runs as root. ``env -i`` then execs the command with exactly the request's
  environment (``execvp`` with that environment's ``PATH``: the same resolution as above). The
  user switch happens after the mounts, which need root. With a PID namespace, PID 1 is the small
  shell, which ignores the SIGTERM a timeout sends (an init ignores signals it has no handler for)
  and runs the command as its child, so the command sees SIGTERM exactly as it would without the
  namespace; when the command exits PID 1 exits with its status and the kernel kills whatever is
  left in the namespace.

Errors before the command runs
------------------------------
A command that cannot be executed (not found, not executable, not a recognised executable
format) is not an exception: the result has exit code 127 (not found) or 126 (found but cannot
be run) and ``error`` set, and the message is also written to the stderr file. In sandboxed mode
this is checked before starting (the exec happens deep in the chain); if the check passes but the
exec still fails (an ACL, a ``noexec`` mount, a race), ``env`` prints the reason to the stderr
file and exits 126/127, and ``error`` stays empty. Everything else (a bad request, an unknown
``run_as`` user, fork failing, the working directory missing, the sandbox unavailable) raises.

Ending the process group
------------------------
The command is the leader of a new session and process group. On timeout, and when the caller
cancels ``run_command``, the whole group gets SIGTERM, then SIGKILL after ``kill_grace_s``. After
the leader exits, the group is SIGKILLed once more so background children left behind (``sleep
100 &``) do not outlive the action. The leader is waited for through a pidfd and only reaped after
that last ``killpg``, so its PID, which is also the group's ID, cannot have been reused by an
unrelated process in between.

Limits: a descendant that calls ``setsid()``/``setpgid()`` leaves the group and cannot be found
this way; only a PID namespace (``NamespaceOptions(pid=True)``) catches those (as PID 1 exits,
the kernel kills the whole namespace). With a private /tmp, only the working directory is brought
back from the real /tmp: other inputs under /tmp (a ``PATH`` entry, a sibling directory) are
reachable through relative paths only, so keep action directories outside /tmp. The bind-mounted
``tmp_dir`` must be writable by the ``run_as`` user; the caller creates and cleans it. With
``pid=True`` /proc is left as is (it shows the host's processes; they cannot be signalled).
"""

from __future__ import annotations

import errno
import math
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

__all__ = [
    "NamespaceOptions",
    "RunRequest",
    "RunResult",
    "SandboxUnavailable",
    "check_namespace_support",
    "run_command",
]

# The environment of the sandbox's own wrappers (never the request's, never the worker's).
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_WRAPPER_ENV = {"PATH": _SYSTEM_PATH, "LC_ALL": "C"}
_PROBE_TIMEOUT_S = 10.0
# Exit status of the sandbox shell when its set-up (loopback, /tmp) fails: after a successful
# probe this means something changed underneath; the reason is in the stderr file.
_SETUP_FAILED = 125
_TMPFS_MOUNT_ARGS = ["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "reexec-tmp", "/tmp"]


@dataclass(frozen=True)
class NamespaceOptions:
    network: bool = False  # private network namespace (only loopback) -> "network=off"
    pid: bool = False  # private PID namespace (the action is PID 1's child; /proc as is)
    private_tmp: bool = False  # a private, empty /tmp (tmpfs, or RunRequest.tmp_dir bound on it)

    @property
    def requested(self) -> bool:
        """Whether any isolation is asked for (and so the sandboxed chain is used)."""
        return self.network or self.pid or self.private_tmp


@dataclass(frozen=True)
class RunRequest:
    argv: Sequence[str]
    env: Mapping[str, str]  # EXACTLY this environment, nothing inherited
    cwd: Path  # absolute; already exists (the action's working directory)
    stdout_path: Path  # output goes to files, never to memory (may equal stderr_path)
    stderr_path: Path
    timeout_s: float  # execution time allowed; 0 = no limit
    kill_grace_s: float = 5.0  # SIGTERM to the whole process group, then SIGKILL after this
    run_as: str | int | None = None  # user name or uid (worker runs as root); None = same user
    namespaces: NamespaceOptions = field(default_factory=NamespaceOptions)
    # Per-action temp dir: with namespaces.private_tmp it is bind-mounted on /tmp (else a fresh
    # tmpfs is). TMPDIR is NOT set automatically; the env is exact.
    tmp_dir: Path | None = None


@dataclass(frozen=True)
class RunResult:
    exit_code: int  # the command's exit status; for a signal, 128+signum (like a shell)
    timed_out: bool
    started_at: float  # wall clock (time.time())
    finished_at: float
    error: str = ""  # set when the command could not be started (exit_code 126 or 127)


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided here; the command was not run."""


# -- namespace support ---------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_cache: dict[str, str | None] = {}


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SYSTEM_PATH)


def _probe(feature: str) -> str | None:
    """Try one namespace kind for real once; None if it works, else why not."""
    with _probe_lock:
        if feature in _probe_cache:
            return _probe_cache[feature]
        reason, definitive = _run_probe(feature)
        if definitive:  # a probe that timed out (a loaded machine) is tried again next time
            _probe_cache[feature] = reason
        return reason


def _run_probe(feature: str) -> tuple[str | None, bool]:
    unshare, sh, true = _tool("unshare"), _tool("sh"), _tool("true")
    if unshare is None:
        return "the unshare command (util-linux) is not installed", True
    if sh is None or true is None:
        return "sh or true is not installed", True
    if feature == "network":
        ip = _tool("ip")
        if ip is None:
            return "network isolation needs the ip command (iproute2) to bring up loopback", True
        flags, cmd = ["--net"], [ip, "link", "set", "lo", "up"]
    elif feature == "pid":
        flags, cmd = ["--pid", "--fork", "--kill-child"], [true]
    elif feature == "private_tmp":
        mount = _tool("mount")
        if mount is None:
            return "the mount command (util-linux) is not installed", True
        flags, cmd = ["--mount", "--propagation", "private"], [mount, *_TMPFS_MOUNT_ARGS]
    else:  # pragma: no cover - internal misuse
        raise ValueError(feature)
    argv = [unshare, *flags, "--", *cmd]
    shown = " ".join(["unshare", *flags])
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_WRAPPER_ENV,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{shown} did not finish within {_PROBE_TIMEOUT_S:g} s", False
    except OSError as exc:
        return f"{shown} failed: {exc}", True
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        # unshare says "unshare: unshare failed: Operation not permitted"; keep only the reason.
        detail = detail.removeprefix("unshare: ").removeprefix("unshare failed: ")
        return f"{shown} failed: {detail}", True
    return None, True


def check_namespace_support(options: NamespaceOptions) -> str | None:
    """None if every namespace in ``options`` works here, else a precise reason.

    Each kind is tried for real once per process (``unshare --net ip link set lo up``,
    ``unshare --pid --fork --kill-child true``, ``unshare --mount`` + a tmpfs on /tmp) and the
    answer cached. Blocks for a few milliseconds the first time: call it at worker start-up (or from a
    thread).
    """
    if not options.requested:
        return None
    if _tool("env") is None:
        return "the env command (coreutils) is not installed"
    wanted = [
        ("network", options.network),
        ("pid", options.pid),
        ("private_tmp", options.private_tmp),
    ]
    for feature, on in wanted:
        if on and (reason := _probe(feature)) is not None:
            return reason
    return None


# -- preparation (blocking: runs in a thread) ------------------------------------------------------


@dataclass(frozen=True)
class _User:
    name: str
    uid: int
    gid: int


@dataclass
class _Prepared:
    """What the worker sets up before spawning; owns the output fds until closed."""

    stdout_fd: int = -1
    stderr_fd: int = -1
    user: _User | None = None
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    exec_error: tuple[int, str] | None = None  # (errno, message): not started, reported

    def close(self) -> None:
        for fd in {self.stdout_fd, self.stderr_fd}:
            if fd >= 0:
                os.close(fd)
        self.stdout_fd = self.stderr_fd = -1


def _validate(request: RunRequest) -> None:
    if isinstance(request.argv, str) or not request.argv:
        raise ValueError("argv must be a non-empty sequence of strings")
    for arg in request.argv:
        if not isinstance(arg, str) or "\0" in arg:
            raise ValueError(f"invalid argument {arg!r}: must be a string without NUL")
    if not request.argv[0]:
        raise ValueError("argv[0] is empty")
    for name, value in request.env.items():
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"invalid environment variable name {name!r}")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"invalid value for environment variable {name!r}")
    if not request.cwd.is_absolute():
        raise ValueError(f"cwd must be absolute: {request.cwd}")
    if request.timeout_s < 0 or math.isnan(request.timeout_s):
        raise ValueError(f"timeout_s must be >= 0 (0 = no limit): {request.timeout_s}")
    if request.kill_grace_s < 0 or math.isnan(request.kill_grace_s):
        raise ValueError(f"kill_grace_s must be >= 0: {request.kill_grace_s}")


def _resolve_user(run_as: str | int) -> _User:
    try:
        if isinstance(run_as, int) or (run_as.isascii() and run_as.isdigit()):
            entry = pwd.getpwuid(int(run_as))
        else:
            entry = pwd.getpwnam(run_as)
    except KeyError:
        raise ValueError(f"run_as: no such user {run_as!r} on this worker") from None
    return _User(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _open_output(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        # Exact mode whatever the umask or an older file's mode; never touch a device such as
        # /dev/null, which a caller may pass to discard a stream.
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != 0o644:
            os.fchmod(fd, 0o644)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _may_execute(st: os.stat_result, user: _User | None) -> bool:
    """Exec permission as the command will run (no supplementary groups; ACLs ignored)."""
    uid, gid = (user.uid, user.gid) if user else (os.geteuid(), os.getegid())
    if uid == 0:
        return bool(st.st_mode & 0o111)
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == gid or (user is None and st.st_gid in os.getgroups()):
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _binfmt_misc_in_use() -> bool:
    try:
        entries = os.listdir("/proc/sys/fs/binfmt_misc")
    except OSError:
        return False
    return any(e not in ("register", "status") for e in entries)


def _known_format(path: str) -> bool:
    """Whether the kernel can exec this file: ELF, #! or (unknowable here) a binfmt_misc one.

    glibc's execvp (used by `env`) runs a file the kernel rejects with ENOEXEC through /bin/sh;
    plain mode does not (Python's exec never does). Checking first keeps both modes the same.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True  # let the exec decide
    return head.startswith(b"#!") or head == b"\x7fELF" or _binfmt_misc_in_use()


def _find_executable(
    name: str, env: Mapping[str, str], cwd: Path, user: _User | None
) -> tuple[int, str | None]:
    """execvp's search, done ahead: (0, path) or (errno, None)."""
    if "/" in name:
        candidates = [name]
    else:
        # os.get_exec_path: the env's PATH, else os.defpath; an empty entry means the cwd.
        candidates = [os.path.join(d, name) for d in os.get_exec_path(dict(env))]
    first_error = 0
    for candidate in candidates:
        path = os.path.join(cwd, candidate)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            first_error = first_error or exc.errno or errno.EACCES
            continue
        if not stat.S_ISREG(st.st_mode) or not _may_execute(st, user):
            first_error = first_error or errno.EACCES
            continue
        if not _known_format(path):
            first_error = first_error or errno.ENOEXEC
            continue
        return 0, path
    return first_error or errno.ENOENT, None


def _exec_error_message(name: str, err: int, env: Mapping[str, str]) -> str:
    if err in (errno.ENOENT, errno.ENOTDIR):
        if "/" in name:
            return f"reexec: {name}: No such file or directory"
        where = f"PATH={env['PATH']}" if "PATH" in env else f"no PATH set; searched {os.defpath}"
        return f"reexec: {name}: command not found ({where})"
    return f"reexec: {name}: cannot execute: {os.strerror(err)}"


# Only for an argv[0] containing "=", which `env` would take for an assignment: slower (starts
# Python) but exact. Receives the environment as NAME=VALUE arguments, never inherits one.
_EXEC_SHIM = (
    "import os,sys\n"
    "n=int(sys.argv[1]);env=dict(a.split('=',1) for a in sys.argv[2:2+n]);argv=sys.argv[2+n:]\n"
    "try:os.execvpe(argv[0],argv,env)\n"
    "except OSError as e:\n"
    " sys.stderr.write(f'reexec: {argv[0]}: cannot execute: {e.strerror}\\n')\n"
    " os._exit(127 if e.errno in (2,20) else 126)\n"
)


def _sandbox_command(request: RunRequest, user: _User | None) -> list[str]:
    ns = request.namespaces
    unshare, sh, env_tool = _tool("unshare"), _tool("sh"), _tool("env")
    if unshare is None or sh is None or env_tool is None:
        raise SandboxUnavailable("unshare, sh or env is not installed")
    cmd = [unshare]
    if ns.network:
        cmd.append("--net")
    if ns.pid:
        cmd += ["--pid", "--fork", "--kill-child"]
    if ns.private_tmp:
        cmd += ["--mount", "--propagation", "private"]
    cmd.append("--")

    # Set-up that needs a shell inside the namespaces: done as root, before the user switch.
    script: list[str] = []
    script_args: list[str] = []
    if ns.network:
        ip = _tool("ip")
        if ip is None:
            raise SandboxUnavailable("network isolation needs the ip command (iproute2)")
        # A new network namespace has loopback down: local servers in tests need it up.
        script.append(f"{shlex.quote(ip)} link set lo up || exit {_SETUP_FAILED}")
    if ns.private_tmp:
        mount = _tool("mount")
        if mount is None:
            raise SandboxUnavailable("the mount command (util-linux) is not installed")
        if request.tmp_dir is not None:
            script.append(f'{shlex.quote(mount)} --bind "$1" /tmp || exit {_SETUP_FAILED}; shift')
            script_args.append(str(request.tmp_dir))
        else:
            tmpfs = shlex.join([mount, *_TMPFS_MOUNT_ARGS])
            script.append(f"{tmpfs} || exit {_SETUP_FAILED}")
        # A working directory under /tmp would now be hidden (the process keeps it as its cwd,
        # but absolute paths into it break): bind it back at the same path. "." is still the
        # old directory; --no-canonicalize makes mount hand "." to the kernel as is, instead
        # of a path string that would resolve in the new /tmp.
        real_cwd = os.path.realpath(request.cwd)
        if os.path.commonpath([real_cwd, "/tmp"]) == "/tmp" and real_cwd != "/tmp":
            mkdir = _tool("mkdir")
            if mkdir is None:
                raise SandboxUnavailable("mkdir is not installed")
            script.append(
                f'{shlex.quote(mkdir)} -p "$1" && {shlex.quote(mount)} --no-canonicalize'
                f' --bind . "$1" || exit {_SETUP_FAILED}; shift'
            )
            script_args.append(real_cwd)
    if script or ns.pid:
        # As PID 1 the shell must not exec: it stays to run the command as its child.
        script.append('"$@"; exit $?' if ns.pid else 'exec "$@"')
        cmd += [sh, "-c", "\n".join(script), "reexec-sandbox", *script_args]

    if user is not None:
        setpriv = _tool("setpriv")
        if setpriv is None:
            raise SandboxUnavailable("run_as with namespaces needs setpriv (util-linux)")
        cmd += [setpriv, f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--"]

    assignments = [f"{k}={v}" for k, v in request.env.items()]
    if "=" in request.argv[0]:
        # The real interpreter, not a venv's symlink: a venv under /tmp is hidden by private_tmp,
        # and -I -S need nothing from the venv.
        python = os.path.realpath(sys.executable)
        cmd += [python, "-I", "-S", "-c", _EXEC_SHIM, str(len(assignments))]
        cmd += [*assignments, *request.argv]
    else:
        cmd += [env_tool, "-i", "--", *assignments, *request.argv]
    return cmd


def _prepare(request: RunRequest, prep: _Prepared) -> None:
    """Everything that may block: user lookup, probes, opening the output files."""
    if request.run_as is not None:
        user = _resolve_user(request.run_as)
        if user.uid != os.geteuid() or user.gid != os.getegid():
            if os.geteuid() != 0:
                raise SandboxUnavailable(
                    f"run_as={request.run_as!r} needs the worker to run as root"
                )
            prep.user = user
        elif os.geteuid() == 0:
            prep.user = user  # still drop root's supplementary groups
    if not request.cwd.is_dir():
        raise FileNotFoundError(errno.ENOENT, "working directory does not exist", str(request.cwd))
    ns = request.namespaces
    if ns.requested:
        reason = check_namespace_support(ns)
        if reason is not None:
            raise SandboxUnavailable(reason)
        if ns.private_tmp and request.tmp_dir is not None and not request.tmp_dir.is_dir():
            raise FileNotFoundError(errno.ENOENT, "tmp_dir does not exist", str(request.tmp_dir))

    prep.stdout_fd = _open_output(request.stdout_path)
    if os.path.abspath(request.stderr_path) == os.path.abspath(request.stdout_path):
        prep.stderr_fd = prep.stdout_fd  # one file, one offset: the streams interleave
    else:
        prep.stderr_fd = _open_output(request.stderr_path)

    if ns.requested:
        err, _ = _find_executable(request.argv[0], request.env, request.cwd, prep.user)
        if err:
            message = _exec_error_message(request.argv[0], err, request.env)
            _write_error(prep.stderr_fd, message)
            prep.exec_error = (err, message)
            return
        prep.command = _sandbox_command(request, prep.user)
        prep.env = dict(_WRAPPER_ENV)
    else:
        prep.command = list(request.argv)
        prep.env = dict(request.env)


# -- running -------------------------------------------------------------------------------------


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is already empty


def _write_error(fd: int, message: str) -> None:
    data = (message + "\n").encode(errors="replace")
    while data:
        data = data[os.write(fd, data) :]


class _Leader:
    """Waits for the group leader's exit *without* reaping it (see the module docstring)."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        try:
            self.pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # pragma: no cover - kernels before 5.3
            self.pidfd = None

    async def exited(self) -> None:
        if self.pidfd is not None:
            await trio.lowlevel.wait_readable(self.pidfd)
        else:  # pragma: no cover - reaps: a tiny PID-reuse window before the final killpg
            await self.proc.wait()

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM the group; SIGKILL it if the leader is still there after the grace."""
        _killpg(self.proc.pid, signal.SIGTERM)
        with trio.move_on_after(grace_s):
            await self.exited()
            return
        _killpg(self.proc.pid, signal.SIGKILL)
        await self.exited()

    async def reap(self) -> int:
        # Leader exited but not reaped: its PID (= the group ID) is still ours to signal.
        _killpg(self.proc.pid, signal.SIGKILL)
        returncode = await self.proc.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        return returncode


async def _supervise(proc: trio.Process, request: RunRequest) -> tuple[int, bool]:
    leader = _Leader(proc)
    timed_out = False
    try:
        limit = request.timeout_s if request.timeout_s > 0 else math.inf
        with trio.move_on_after(limit) as scope:
            await leader.exited()
        if scope.cancelled_caught:
            timed_out = True
            with trio.CancelScope(shield=True):
                await leader.terminate(request.kill_grace_s)
    except BaseException:
        # The caller cancelled (or something went wrong): the group must not outlive us.
        with trio.CancelScope(shield=True):
            await leader.terminate(request.kill_grace_s)
            await leader.reap()
        raise
    with trio.CancelScope(shield=True):
        returncode = await leader.reap()
    return _exit_code(returncode), timed_out


async def run_command(request: RunRequest) -> RunResult:
    """Run ``request.argv`` as described in the module docstring; return once it is gone.

    Raises ValueError for an invalid request or an unknown ``run_as`` user, SandboxUnavailable
    when requested isolation is not possible here, OSError when the worker cannot start processes
    at all. Cancelling the call kills the process group (SIGTERM, grace, SIGKILL) and re-raises.
    """
    _validate(request)
    prep = _Prepared()
    try:
        await trio.to_thread.run_sync(_prepare, request, prep)
        started_at = time.time()
        if prep.exec_error is not None:  # already written to the stderr file
            return _error_result(*prep.exec_error, started_at)
        options: dict[str, object] = {}
        if prep.user is not None and not request.namespaces.requested:
            options = {"user": prep.user.uid, "group": prep.user.gid, "extra_groups": []}
        # Shielded: a cancellation arriving mid-spawn must not lose the process; _supervise
        # sees it at its first checkpoint and ends the group.
        with trio.CancelScope(shield=True):
            try:
                proc = await trio.lowlevel.open_process(
                    prep.command,
                    stdin=subprocess.DEVNULL,
                    stdout=prep.stdout_fd,
                    stderr=prep.stderr_fd,
                    env=prep.env,
                    cwd=request.cwd,
                    start_new_session=True,
                    **options,  # type: ignore[arg-type]
                )
            except OSError as exc:
                # Popen names the executable only when exec itself failed; anything else
                # (fork, chdir, setuid) is the worker's problem, not the command's.
                if request.namespaces.requested or exc.filename != request.argv[0]:
                    raise
                err = exc.errno or errno.ENOEXEC
                message = _exec_error_message(request.argv[0], err, request.env)
                await trio.to_thread.run_sync(_write_error, prep.stderr_fd, message)
                return _error_result(err, message, started_at)
    finally:
        prep.close()
    exit_code, timed_out = await _supervise(proc, request)
    return RunResult(exit_code, timed_out, started_at, time.time())


def _error_result(err: int, message: str, started_at: float) -> RunResult:
    code = 127 if err in (errno.ENOENT, errno.ENOTDIR) else 126
    return RunResult(code, False, started_at, time.time(), error=message)
