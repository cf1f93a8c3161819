"""Host-side preparation for confined actions: which host user runs bwrap, and a work directory
that user can reach. Blocking (file system calls): run at start-up or in a thread.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_CONFINED_USER",
    "HostUser",
    "as_user",
    "become_subreaper",
    "confinement_problem",
    "find_bwrap",
    "host_user",
    "make_searchable",
]

# The host user confined actions run as when the worker is root and `run_as` is not set: it
# owns nothing, so "root" inside the action's user namespace holds no power over host files.
DEFAULT_CONFINED_USER = "nobody"
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HostUser:
    uid: int
    gid: int


def find_bwrap() -> str | None:
    return shutil.which("bwrap") or shutil.which("bwrap", path=_SYSTEM_PATH)


def host_user(run_as: str | int | None) -> HostUser | None:
    """The host user that starts bwrap: `run_as`, else `nobody` when the worker is root, else
    None (an unprivileged worker runs bwrap as itself). Raises ValueError for an unknown user
    and for root (actions never run as host root)."""
    if run_as is None:
        if os.geteuid() != 0:
            return None
        run_as = DEFAULT_CONFINED_USER
    try:
        if isinstance(run_as, int) or run_as.isdigit():
            entry = pwd.getpwuid(int(run_as))
        else:
            entry = pwd.getpwnam(run_as)
    except KeyError:
        raise ValueError(f"no such user {run_as!r} on this worker") from None
    if entry.pw_uid == 0:
        raise ValueError("confined actions cannot run as host root; choose another run_as")
    return HostUser(entry.pw_uid, entry.pw_gid)


def make_searchable(path: Path) -> list[Path]:
    """Give "others" search (x) permission on `path` and its ancestors that lack it and that the
    worker owns, so the unprivileged user bwrap runs as can reach input roots under `path`.
    Search alone lets nobody list these directories. Returns what was changed; raises
    PermissionError naming a directory the worker cannot change."""
    changed: list[Path] = []
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_mode & stat.S_IXOTH:
            continue
        if st.st_uid != os.geteuid():
            raise PermissionError(
                f"{p} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}) is not "
                f"searchable by other users; confined actions run as an unprivileged user who "
                f"must reach {path}: chmod o+x {p}"
            )
        os.chmod(p, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
        changed.append(p)
    return changed


def as_user(user: HostUser | None) -> list[str]:
    """The argv prefix that runs the rest as `user` (none for None): util-linux's setpriv,
    rather than Popen's user=/group=, which force a plain fork() (slower, and it runs the
    at-fork handlers of libraries such as grpcio in the child, which may abort there)."""
    if user is None:
        return []
    setpriv = shutil.which("setpriv", path=_SYSTEM_PATH)
    if setpriv is None:
        raise FileNotFoundError("setpriv (util-linux) is not installed")
    return [setpriv, f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--"]


def confinement_problem(bwrap: str | None, user: HostUser | None) -> str | None:
    """None if bwrap can create every namespace a confined action gets, as `user`; else why not.

    Tried for real (`bwrap --unshare-all --unshare-user ... true`), the way an action will run.
    """
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed (Debian package: bubblewrap)"
    true = shutil.which("true", path=_SYSTEM_PATH)
    if true is None:
        return "the true command (coreutils) is not installed"
    try:
        argv = as_user(user)
    except FileNotFoundError as e:
        return str(e)
    argv += [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--ro-bind", "/", "/"]
    argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--", true]
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env={"PATH": _SYSTEM_PATH, "LC_ALL": "C"},
            cwd="/",
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"bwrap did not finish a trivial sandbox within {_PROBE_TIMEOUT_S:g} s"
    except OSError as e:
        return f"bwrap could not be started: {e}"
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
        who = f"as uid {user.uid}" if user else "as the worker's user"
        return (
            f"bwrap cannot create the action namespaces {who}: {detail} (the kernel must allow "
            f"unprivileged user namespaces: user.max_user_namespaces > 0, and no seccomp or "
            f"container policy forbidding unshare)"
        )
    return None


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (prctl PR_SET_CHILD_SUBREAPER).

    bwrap's PID 1 can outlive bwrap by a moment; it is then re-parented, and an init that does
    not reap (some container inits) would collect one zombie per action. As a subreaper the
    worker gets it instead, and `run_confined` reaps it. Returns whether it worked.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
