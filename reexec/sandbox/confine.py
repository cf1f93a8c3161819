"""The bubblewrap (`bwrap`) command line that confines one action. Pure: builds argv, runs nothing.

Why bubblewrap: it is the small, audited setuid-free tool that Flatpak and BuildGrid's
buildbox-run use for exactly this job (namespaces, bind mounts, pivot_root, a reaping PID 1),
packaged by Debian as `bubblewrap`. Writing the same mount sequence by hand would repeat its
careful ordering (mount points created inside a private tmpfs, pivot_root, old root detached)
for no gain.

What every confined action gets:
  * its own mount, PID, IPC, UTS, cgroup and user namespaces (`--unshare-all --unshare-user`),
    and a network namespace with only loopback unless `network` is on (`--share-net`);
  * a private `/tmp` (a tmpfs, or the per-action `tmp_dir` bound on it), a minimal `/dev`
    (null, zero, full, random, urandom, tty, shm, pts) and its own `/proc`;
  * `--die-with-parent`, `--new-session` (no TIOCSTI into a terminal), `--disable-userns`
    (no nested user namespace to gain capabilities in), `--clearenv` then exactly the request's
    environment;
  * a reaping PID 1 (bwrap's own): when the command exits, PID 1 exits and the kernel kills
    every process left in the namespace, `setsid` or not.

The two modes:
  * `host` (Bazel): the host's `/` read-only (`--ro-bind / /`, recursive), then `/dev`, `/proc`,
    `/tmp` as above, an empty tmpfs over each `hidden` directory (the worker's own data), then
    the exec root bound read-write at its own path, so absolute paths into it and the host's
    toolchains keep working. Nothing else is writable.
  * `input_root` (BuildStream): the exec root is `/` (`--bind EXEC_ROOT /`), `/dev`, `/proc`,
    `/tmp` are provided on top, plus the read-only binds the worker's config lists. The host's
    filesystem is not reachable at all: `..` of `/` is `/`, so no symlink chain leaves it.

Users. Inside, the command runs as `uid`/`gid` (BuildStream's `unixUID`/`unixGID`, default 0),
which the user namespace maps to the host user that runs bwrap. The caller must start bwrap as
an unprivileged host user (never host root): then "root" inside holds no privilege over any host
file, in particular not over the root-owned, read-only input files hardlinked from the worker's
cache, which it can neither write nor chmod nor re-date. Hardlinking a host file as an output is
refused by the kernel (`EXDEV`: the exec root is its own mount; `fs.protected_hardlinks` as
well), and in `input_root` mode no host file is visible to begin with.

`--json-status-fd` makes bwrap report the host PID of its PID 1 (`child_pid_from_status`), so
the caller can wait for that process to be gone: bwrap itself may return a moment before the
kernel has finished killing the namespace.
"""

from __future__ import annotations

import enum
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ConfineMode",
    "ConfineSpec",
    "bwrap_argv",
    "child_pid_from_status",
    "inside_path",
]


class ConfineMode(enum.Enum):
    OFF = "off"
    HOST = "host"
    INPUT_ROOT = "input_root"


@dataclass(frozen=True)
class ConfineSpec:
    mode: ConfineMode
    exec_root: str
    """Absolute, normalised host path of the action's input root."""
    cwd: str
    """Absolute host path of the working directory, inside `exec_root`."""
    network: bool = False
    """Share the host's network; off: a private network namespace with only loopback."""
    uid: int = 0
    gid: int = 0
    """Ids the command runs as inside its user namespace."""
    tmp_dir: str | None = None
    """Host directory bound on /tmp (the per-action temp dir); None: a fresh tmpfs."""
    ro_binds: tuple[tuple[str, str], ...] = ()
    """`input_root` mode: (host source, absolute destination) bound read-only inside."""
    hidden: tuple[str, ...] = ()
    """`host` mode: absolute host directories covered by an empty tmpfs (the worker's data,
    cache and work directories: other actions' inputs and the CAS stay unreadable)."""
    status_fd: int | None = None
    """An fd bwrap inherits and writes its JSON status to (see `child_pid_from_status`)."""
    hostname: str = "reexec"


def inside_path(spec: ConfineSpec, host_path: str) -> str:
    """Where `host_path` (inside the exec root) appears to the command."""
    if posixpath.commonpath([host_path, spec.exec_root]) != spec.exec_root:
        raise ValueError(f"{host_path} is not inside the exec root {spec.exec_root}")
    if spec.mode is not ConfineMode.INPUT_ROOT:
        return host_path
    rel = posixpath.relpath(host_path, spec.exec_root)
    return "/" if rel == "." else "/" + rel


def bwrap_argv(
    bwrap: str, spec: ConfineSpec, argv: Sequence[str], env: Mapping[str, str]
) -> list[str]:
    """The full command line: `bwrap OPTIONS -- argv...`; the environment is set by options,
    so bwrap itself should be started with a fixed, minimal environment."""
    if spec.mode is ConfineMode.OFF:
        raise ValueError("confinement is off: there is no bwrap command line")
    for name in ("exec_root", "cwd"):
        value = getattr(spec, name)
        if not posixpath.isabs(value) or posixpath.normpath(value) != value:
            raise ValueError(f"{name} must be an absolute, normalised path: {value!r}")
    if spec.exec_root == "/":
        raise ValueError("the exec root cannot be the host's /")
    cwd_inside = inside_path(spec, spec.cwd)

    out = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
    if spec.network:
        out.append("--share-net")
    out += ["--uid", str(spec.uid), "--gid", str(spec.gid), "--hostname", spec.hostname]
    out += ["--die-with-parent", "--new-session"]
    if spec.status_fd is not None:
        out += ["--json-status-fd", str(spec.status_fd)]

    tmp = ["--bind", spec.tmp_dir, "/tmp"] if spec.tmp_dir else ["--tmpfs", "/tmp"]
    if spec.mode is ConfineMode.HOST:
        # Order matters: the read-only host first, then what covers it. The exec root comes
        # last so that an exec root under /tmp is bound on top of the private /tmp.
        out += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *tmp]
        for path in spec.hidden:
            if not posixpath.isabs(path) or posixpath.normpath(path) in ("/", "/dev", "/proc"):
                raise ValueError(f"hidden directory {path!r} is not allowed")
            out += ["--tmpfs", path]
        out += ["--bind", spec.exec_root, spec.exec_root]
    else:
        out += ["--bind", spec.exec_root, "/", "--dev", "/dev", "--proc", "/proc", *tmp]
        for src, dest in spec.ro_binds:
            if not posixpath.isabs(dest) or posixpath.normpath(dest) in ("/", "/dev", "/proc"):
                raise ValueError(f"read-only bind destination {dest!r} is not allowed")
            out += ["--ro-bind", src, dest]
    out += ["--chdir", cwd_inside, "--clearenv"]
    for name, value in env.items():
        out += ["--setenv", name, value]
    out += ["--", *argv]
    return out


def child_pid_from_status(data: bytes) -> int | None:
    """The host PID of bwrap's PID 1 from what it wrote to `--json-status-fd`, if present.

    bwrap writes one JSON object per line: first `{"child-pid": N, ...namespaces}`, and
    `{"exit-code": N}` at the end.
    """
    for line in data.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("child-pid"), int):
            return int(doc["child-pid"])
    return None
