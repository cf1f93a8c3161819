"""Helpers for end-to-end tests: reexecd as a subprocess, driven by a real Bazel (4.2.3 here).

Nothing here imports reexec: the daemon runs in its own process exactly as an operator would
start it, and Bazel talks to it over gRPC. Bazel writes only below the temporary directories
the tests hand in (output user root, output bases, a copy of the workspace), never into the
repository or the home directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKSPACE_SOURCE = Path(__file__).resolve().parent / "workspace"
WORKSPACE_NAME = "reexec_e2e"

# The copy must be named "workspace": Bazel names its convenience symlink bazel-<dirname>, and
# the workspace's .bazelignore lists bazel-workspace so `//...` never descends into it.
_WORKSPACE_DIRNAME = "workspace"

BAZEL_MISSING_MESSAGE = (
    "bazel is not installed: the e2e tests need Debian's Bazel 4.2.3 "
    "(apt-get install -y bazel-bootstrap bazel-rules-java)"
)

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROCESS_SUMMARY = re.compile(r"INFO: (\d+) process(?:es)?(?:: (.*?))?\.\s*$")
_PROCESS_KIND = re.compile(r"(\d+) (\S.*)")


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago (the usual small race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# reexecd


class ReexecdError(RuntimeError):
    """reexecd did not start, or did not stop when asked."""


class ReexecdProcess:
    """reexecd running as a subprocess, for the duration of a ``with`` block.

    ``__enter__`` returns once the daemon accepts TCP connections on its port; if the process
    exits first or is not listening within ``startup_timeout`` seconds, it raises ReexecdError
    with the tail of the daemon's log. ``module`` replaces ``reexec.daemon`` (for testing the
    harness itself with a stand-in). Leaving the block stops the daemon (SIGTERM, then SIGKILL
    of its whole process group if it does not exit in time).

    stdout and stderr go to ``log_dir/reexecd.log`` (default: a ``<data_dir>-log`` directory
    beside ``data_dir``); the daemon's working directory is ``log_dir`` too, so nothing it
    writes by relative path lands in the repository.

    The daemon runs in its own session, so a Ctrl-C aimed at pytest reaches it only through this
    class's orderly stop, and its process group (the daemon and any action it spawned) can be
    killed as one.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        args: Sequence[str] | None = None,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        wait_ready: bool = True,
        module: str = "reexec.daemon",
    ) -> None:
        self.module = module
        self.data_dir = Path(data_dir)
        self.port = free_port() if port is None else port
        self.args: list[str] = (
            list(args)
            if args is not None
            else [
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--data-dir",
                str(self.data_dir),
            ]
        )
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.wait_ready = wait_ready
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """The address as Bazel wants it, e.g. ``grpc://127.0.0.1:40123``."""
        return f"grpc://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._running_proc().pid

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while the daemon runs."""
        return self._running_proc().poll()

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]

    def start(self) -> None:
        """Starts the daemon and, unless ``wait_ready`` is false, waits until it listens."""
        if self._proc is not None:
            raise ReexecdError("reexecd already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_dir = self._log_dir or self.data_dir.with_name(self.data_dir.name + "-log")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "reexecd.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self._extra_env)
        with self.log_path.open("wb") as log:
            # Children inherit their own copy of the descriptor; ours can close at once.
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=log_dir,
                env=env,
                start_new_session=True,
            )
        if self.wait_ready:
            self._wait_until_listening()

    def _wait_until_listening(self) -> None:
        proc = self._running_proc()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise ReexecdError(
                    f"reexecd exited with code {code} before listening on port {self.port}; "
                    f"command {self.command()}; log tail:\n{_tail(self.log_text())}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._kill_group()
                raise ReexecdError(
                    f"reexecd did not listen on port {self.port} within "
                    f"{self.startup_timeout:.0f} s; log tail:\n{_tail(self.log_text())}"
                )
            time.sleep(0.05)

    def log_text(self) -> str:
        """Everything the daemon wrote to stdout and stderr so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Waits for the daemon to exit by itself and returns its exit code."""
        return self._running_proc().wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Sends ``sig`` and returns the exit code once the daemon has exited.

        If it has not exited after ``timeout`` seconds, its process group is killed and
        ReexecdError is raised: a daemon that ignores SIGTERM is a bug worth a failed test.
        """
        proc = self._running_proc()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                raise ReexecdError(
                    f"reexecd did not exit within {timeout:.0f} s of signal {sig}; "
                    f"killed it; log tail:\n{_tail(self.log_text())}"
                ) from None
        self._kill_group()
        return proc.returncode

    def _kill_group(self) -> None:
        """SIGKILLs the daemon's process group (daemon plus stragglers) and reaps the daemon."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def _running_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise ReexecdError("reexecd not started")
        return self._proc

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is None:
            return
        if exc_type is None:
            self.stop()
        else:
            # Do not mask the test's own failure with a shutdown error.
            with contextlib.suppress(ReexecdError):
                self.stop(timeout=10)


# --------------------------------------------------------------------------------------------
# Bazel


def bazel_available(bazel: str = "bazel") -> bool:
    """True if a ``bazel`` executable is on PATH."""
    return shutil.which(bazel) is not None


class BazelError(AssertionError):
    """A Bazel command exited non-zero while the caller expected success."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(
            f"bazel exited with {result.returncode}: {' '.join(map(str, result.args))}\n"
            f"--- stdout (tail) ---\n{_tail(result.stdout, 40)}\n"
            f"--- stderr (tail) ---\n{_tail(result.stderr, 80)}"
        )


_LIVE_WORKSPACES: weakref.WeakSet[BazelWorkspace] = weakref.WeakSet()


class BazelWorkspace:
    """A private copy of tests/e2e/workspace and the Bazel commands run in it.

    Layout below ``root``: ``workspace/`` (the copy), ``user-root/`` (Bazel's
    --output_user_root, shared by every output base of this workspace) and ``output-bases/``.

    Without ``batch``, every output base gets a Bazel server (faster for several commands in a
    row); ``shutdown()`` (also run on ``__exit__`` and by the e2e session fixture) stops them,
    and ``--max_idle_secs`` bounds the life of any server a crashed test run leaves behind.
    """

    def __init__(
        self,
        root: Path,
        *,
        source: Path = WORKSPACE_SOURCE,
        batch: bool = False,
        bazel: str = "bazel",
        max_idle_secs: int = 300,
    ) -> None:
        if not bazel_available(bazel):
            raise RuntimeError(BAZEL_MISSING_MESSAGE)
        self.root = Path(root)
        self.path = self.root / _WORKSPACE_DIRNAME
        self.user_root = self.root / "user-root"
        self._output_bases_dir = self.root / "output-bases"
        self.batch = batch
        self.bazel = shutil.which(bazel) or bazel
        self.max_idle_secs = max_idle_secs
        self._server_bases: set[Path] = set()
        self._counter = 0
        shutil.copytree(source, self.path, symlinks=True, ignore=_ignore_convenience_links)
        self.user_root.mkdir(parents=True, exist_ok=True)
        self._output_bases_dir.mkdir(parents=True, exist_ok=True)
        self.default_output_base = self.new_output_base("default")
        _LIVE_WORKSPACES.add(self)

    def new_output_base(self, label: str = "ob") -> Path:
        """Returns a fresh, empty directory to use as an --output_base."""
        self._counter += 1
        path = self._output_bases_dir / f"{self._counter:02d}-{label}"
        path.mkdir(parents=True)
        return path

    def startup_options(self, output_base: Path) -> list[str]:
        # No --nosystem_rc: Debian's /etc/bazel/bazelrc carries the --install_base Bazel needs.
        options = [
            f"--output_user_root={self.user_root}",
            f"--output_base={output_base}",
            "--nohome_rc",
        ]
        if self.batch:
            options.append("--batch")
        else:
            options.append(f"--max_idle_secs={self.max_idle_secs}")
        return options

    def run(
        self,
        *args: str,
        output_base: Path | None = None,
        check: bool = True,
        timeout: float = 300.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``bazel <startup options> *args`` in the workspace copy and captures its output.

        ``args`` start with the command (``build``, ``test``, ...). Bazel prints progress and
        the ``INFO: N processes`` summary on stderr, test results on stdout. With ``check``,
        a non-zero exit raises BazelError showing the output tails.
        """
        base = self.default_output_base if output_base is None else Path(output_base)
        command = [self.bazel, *self.startup_options(base), *args]
        if not self.batch:
            self._server_bases.add(base)
        run_env = dict(os.environ)
        if env is not None:
            run_env.update(env)
        try:
            result = subprocess.run(
                command,
                cwd=self.path,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                env=run_env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            raise AssertionError(
                f"bazel did not finish within {timeout:.0f} s: {' '.join(command)}\n"
                f"--- stderr (tail) ---\n{_tail(stderr)}"
            ) from None
        if check and result.returncode != 0:
            raise BazelError(result)
        return result

    def output_path(self, output_base: Path | None = None) -> Path:
        """The ``bazel-out`` directory of an output base."""
        base = self.default_output_base if output_base is None else Path(output_base)
        return base / "execroot" / WORKSPACE_NAME / "bazel-out"

    def bin_dir(self, output_base: Path | None = None) -> Path:
        """``bazel-bin`` of an output base (the single ``*-fastbuild`` configuration)."""
        return self._config_dir(output_base) / "bin"

    def testlogs_dir(self, output_base: Path | None = None) -> Path:
        return self._config_dir(output_base) / "testlogs"

    def _config_dir(self, output_base: Path | None) -> Path:
        configs = sorted(self.output_path(output_base).glob("*-fastbuild"))
        if len(configs) != 1:
            raise AssertionError(f"expected one *-fastbuild configuration, found {configs}")
        return configs[0]

    def shutdown(self) -> None:
        """Stops every Bazel server this workspace started. Safe to call more than once."""
        while self._server_bases:
            base = self._server_bases.pop()
            if not (base / "server").exists():
                continue
            try:
                subprocess.run(
                    [self.bazel, *self.startup_options(base), "shutdown"],
                    cwd=self.path,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                pass
            _kill_leftover_server(base)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def _ignore_convenience_links(directory: str, names: list[str]) -> list[str]:
    return [name for name in names if name.startswith("bazel-")]


def _kill_leftover_server(output_base: Path) -> None:
    """Kills the server of ``output_base`` if ``bazel shutdown`` left it running."""
    pid_file = output_base / "server" / "server.pid.txt"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def shutdown_all_workspaces() -> None:
    """Stops the Bazel servers of every BazelWorkspace still alive in this process."""
    for workspace in list(_LIVE_WORKSPACES):
        workspace.shutdown()


def remote_cache_flags(address: str, instance: str = "") -> list[str]:
    """Flags for a build that executes locally and uses ``address`` as remote cache only."""
    flags = [f"--remote_cache={address}"]
    if instance:
        flags.append(f"--remote_instance_name={instance}")
    return flags


def remote_exec_flags(address: str, instance: str = "") -> list[str]:
    """Flags for a build whose every action (genrules and tests included) runs remotely.

    Local fallback stays off (Bazel's default), so a remote failure fails the build.
    """
    flags = [
        f"--remote_executor={address}",
        "--spawn_strategy=remote",
        "--genrule_strategy=remote",
        "--strategy=TestRunner=remote",
        "--noremote_local_fallback",
    ]
    if instance:
        flags.append(f"--remote_instance_name={instance}")
    return flags


def grpc_log_flags(path: Path) -> list[str]:
    """Makes Bazel record every remote RPC in ``path`` (remote_execution_log.proto records)."""
    return [f"--experimental_remote_grpc_log={path}"]


def parse_process_summary(output: str) -> dict[str, int]:
    """Counts by kind from the last ``INFO: N processes: ...`` line in Bazel's output.

    ``INFO: 29 processes: 18 remote cache hit, 11 internal.`` gives
    ``{"remote cache hit": 18, "internal": 11}``; ``INFO: 0 processes.`` gives ``{}``.
    Kinds are whatever Bazel prints ("internal", "local", "linux-sandbox", "remote",
    "remote cache hit" (also used for --disk_cache hits), "processwrapper-sandbox", "worker"...).
    Raises ValueError if there is no such line or its counts do not add up to N.
    """
    summary: tuple[int, str | None] | None = None
    for line in _ANSI_ESCAPE.sub("", output).splitlines():
        match = _PROCESS_SUMMARY.search(line.rstrip("\r"))
        if match:
            summary = (int(match.group(1)), match.group(2))
    if summary is None:
        raise ValueError("no 'INFO: N processes' line in Bazel output")
    total, detail = summary
    counts: dict[str, int] = {}
    for item in (detail or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind = _PROCESS_KIND.fullmatch(item)
        if kind is None:
            raise ValueError(f"cannot parse process count {item!r}")
        counts[kind.group(2)] = counts.get(kind.group(2), 0) + int(kind.group(1))
    if sum(counts.values()) != total:
        raise ValueError(f"process counts {counts} do not add up to {total}")
    return counts
