"""systemd integration: the sd_notify protocol, the unit files, and the daemon started exactly as
the units start it.

(a) `Notifier` against real AF_UNIX datagram sockets (a path and an abstract '@' name), read
    with SO_PASSCRED so every message's sender pid is known: systemd (NotifyAccess=main) only
    believes messages from the service's main pid.
(b) The unit files, parsed: required keys, hardening, TimeoutStopSec longer than the drain of the
    matching example config; then their ExecStart run for real (reexecd -> `python -m
    reexec.daemon`, /etc/reexec/*.toml -> the example adjusted to temporary paths and a free
    port, NOTIFY_SOCKET/WATCHDOG_USEC/WATCHDOG_PID set as systemd sets them).
(c) `systemd-analyze verify` and `systemd-sysusers --root` when those tools exist.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from reexec.daemon.cli import _parser
from reexec.daemon.config import Config, load_config, parse_listen
from reexec.daemon.sdnotify import Notifier
from reexec.gen.build.bazel.remote.execution import v2 as reapi
from tests.conftest import call, open_channel
from tests.e2e.harness import free_port

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
EXAMPLES = REPO / "examples"
INSTALLED_REEXECD = "/usr/local/bin/reexecd"
STATE_ROOT = "/var/lib/reexec"

# unit file -> the example config users install as its --config
UNIT_EXAMPLES = {
    "reexec-scheduler.service": "scheduler.toml",
    "reexec-worker@.service": "worker.toml",
    "reexec-serve.service": "reexecd.toml",
    "reexec-storage.service": "storage.toml",
}


# -- a notify socket as systemd has it --------------------------------------------------------


@dataclass
class Message:
    fields: dict[str, str]
    pid: int | None
    at: float = field(default_factory=time.monotonic)


class Receiver:
    """A bound AF_UNIX datagram socket that reports the sender's pid of each message."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.seen: list[Message] = []
        self.cursor = 0  # seen[:cursor] were consumed by UnitProcess.wait_for

    def poll(self) -> Message | None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        except BlockingIOError:
            return None
        pid = None
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", cdata[:12])[0]
        lines = data.decode().split("\n")
        assert all("=" in line for line in lines), f"malformed notification {data!r}"
        message = Message(dict(line.split("=", 1) for line in lines), pid)
        self.seen.append(message)
        return message

    def drain(self) -> list[Message]:
        out = []
        while (m := self.poll()) is not None:
            out.append(m)
        return out

    async def pump(self) -> None:
        """Reads as systemd does, continuously: the kernel queues only net.unix.max_dgram_qlen
        datagrams (10 by default; systemd raises it to 512), then senders get EAGAIN."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            self.drain()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # outside Trio: nothing waits on it
            trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


@asynccontextmanager
async def pumping(*receivers: Receiver) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for r in receivers:
            nursery.start_soon(r.pump)
        yield
        nursery.cancel_scope.cancel()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def receiver(sock_dir: Path) -> Iterator[Receiver]:
    r = Receiver(str(sock_dir / "notify"))
    yield r
    r.close()


def notifier_for(path: Path | str, **env: str) -> Notifier:
    return Notifier.from_environment({"NOTIFY_SOCKET": str(path), **env})


# -- (a) the protocol -------------------------------------------------------------------------


def test_messages_on_a_path_socket(sock_dir: Path, receiver: Receiver) -> None:
    n = notifier_for(sock_dir / "notify")
    assert n.enabled
    assert n.ready("serving on 127.0.0.1:8980")
    m = receiver.poll()
    assert m is not None and m.fields == {"READY": "1", "STATUS": "serving on 127.0.0.1:8980"}
    assert m.pid == os.getpid()

    n.ready()
    assert receiver.poll().fields == {"READY": "1"}  # no empty STATUS=
    n.status("2 workers\n5 queued")  # a newline must not start a bogus assignment
    assert receiver.poll().fields == {"STATUS": "2 workers 5 queued"}
    n.stopping("draining")
    assert receiver.poll().fields == {"STOPPING": "1", "STATUS": "draining"}
    n.stopping()
    assert receiver.poll().fields == {"STOPPING": "1"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = receiver.poll()
    assert m.fields.keys() == {"RELOADING", "MONOTONIC_USEC"} and m.fields["RELOADING"] == "1"
    assert before <= int(m.fields["MONOTONIC_USEC"]) <= after
    n.ready("reloaded")
    assert receiver.poll().fields == {"READY": "1", "STATUS": "reloaded"}

    n.extend_timeout(2.5)
    assert receiver.poll().fields == {"EXTEND_TIMEOUT_USEC": "2500000"}
    assert receiver.poll() is None
    n.close()


def test_messages_on_an_abstract_socket() -> None:
    name = f"reexec-test-{uuid.uuid4().hex}"
    r = Receiver(b"\0" + name.encode())
    try:
        n = notifier_for("@" + name)
        assert n.address == b"\0" + name.encode()
        assert n.ready("up") and n.stopping()
        assert [m.fields for m in r.drain()] == [
            {"READY": "1", "STATUS": "up"},
            {"STOPPING": "1"},
        ]
    finally:
        r.close()


async def test_without_notify_socket_everything_is_a_no_op() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "1000000"}):
        n = Notifier.from_environment(env)
        assert not n.enabled
        assert not n.ready("x") and not n.status("x") and not n.stopping() and not n.reloading()
        assert n._sock is None  # not even a socket
        assert n.watchdog_interval() is None
        with trio.fail_after(1):
            await n.run_watchdog()  # returns at once


def test_unsupported_address_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        n = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and not n.ready()
    assert "not a unix socket address" in caplog.text


def test_send_failures_never_raise_and_warn_once(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="reexec.daemon.sdnotify"):
        n = notifier_for(sock_dir / "nobody-listens")  # ENOENT
        for _ in range(3):
            assert n.ready() is False
            assert n.status("x") is False
        # A socket that existed and went away: ECONNREFUSED.
        r = Receiver(str(sock_dir / "gone"))
        m = notifier_for(sock_dir / "gone")
        assert m.ready()
        r.close()
        assert m.stopping() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per notifier
    assert "cannot notify systemd" in warnings[0].getMessage()


def test_a_full_receive_queue_does_not_block(sock_dir: Path) -> None:
    r = Receiver(str(sock_dir / "slow"))  # never read: its queue fills up
    r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    n = notifier_for(sock_dir / "slow")
    results: list[bool] = []
    sender = threading.Thread(
        target=lambda: results.extend(n.status("x" * 200) for _ in range(3000))
    )
    sender.daemon = True
    try:
        sender.start()
        sender.join(10)
        assert not sender.is_alive(), "Notifier blocked on a full notify socket"
    finally:
        r.close()  # unblocks a blocked sender (ECONNREFUSED), so the thread always ends
        sender.join(5)
    assert results[0] is True and results[-1] is False  # delivered, then dropped (EAGAIN)
    assert len(results) == 3000


def test_watchdog_interval() -> None:
    def interval(**env: str) -> float | None:
        return notifier_for("/run/systemd/notify", **env).watchdog_interval()

    assert interval() is None
    assert interval(WATCHDOG_USEC="30000000") == 15.0  # half of WatchdogSec=30s
    assert interval(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid())) == 15.0
    assert interval(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid() + 1)) is None
    assert interval(WATCHDOG_USEC="0") is None
    assert interval(WATCHDOG_USEC="soon") is None
    assert interval(WATCHDOG_USEC="1000", WATCHDOG_PID="x") is None


async def test_run_watchdog_pings_repeatedly(sock_dir: Path, receiver: Receiver) -> None:
    n = notifier_for(sock_dir / "notify", WATCHDOG_USEC="100000")  # ping every 50 ms
    assert n.watchdog_interval() == 0.05
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(n.run_watchdog)
        while time.monotonic() - start < 0.33:  # receive as they come, to time them
            receiver.drain()
            await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    pings = receiver.seen
    assert all(m.fields == {"WATCHDOG": "1"} for m in pings)
    # Loose bounds: CI shares two cores with Bazel and other daemons.
    assert 3 <= len(pings) <= 8, len(pings)
    assert pings[0].at - start < 0.2  # the first one at once
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert all(0.03 < g < 0.4 for g in gaps), gaps


async def test_run_watchdog_returns_when_the_watchdog_is_another_process(sock_dir: Path) -> None:
    n = notifier_for(sock_dir / "notify", WATCHDOG_USEC="100000", WATCHDOG_PID="1")
    with trio.fail_after(1):
        await n.run_watchdog()


# -- (b) the unit files -----------------------------------------------------------------------

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """systemd's unit syntax, enough for our files: sections, repeated keys, comments, '\\'."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue  # also inside a continuation, as systemd does
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}: bad section header {line!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        key, eq, value = line.partition("=")
        assert eq and current is not None, f"{path.name}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"{section}.{key}: expected exactly one value, found {values}"
    return values[0]


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|sec|s|min|m|hr|h|d)?\s*")
_SPAN_UNITS = {"us": 1e-6, "ms": 1e-3, "": 1, "s": 1, "sec": 1, "m": 60, "min": 60}
_SPAN_UNITS |= {"h": 3600, "hr": 3600, "d": 86400}


def timespan(text: str) -> float:
    """A systemd time span ("60", "90s", "6min", "1min 30s") in seconds."""
    total, pos = 0.0, 0
    while pos < len(text):
        m = _SPAN.match(text, pos)
        assert m and m.end() > pos, f"not a time span: {text!r}"
        total += float(m.group(1)) * _SPAN_UNITS[m.group(2) or ""]
        pos = m.end()
    return total


def expand(arg: str, instance: str) -> str:
    """The specifiers our units use: %i (instance), %H (host name), %% ."""
    return re.sub(
        r"%(.)",
        lambda m: {"i": instance, "H": socket.gethostname(), "%": "%"}[m.group(1)],
        arg,
    )


def exec_start(name: str, instance: str = "1") -> list[str]:
    return [expand(a, instance) for a in shlex.split(one(parse_unit(UNITS / name), "ExecStart"))]


def option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# /etc/reexec/<name> -> examples/<file> (worker-1.toml is the first instance's copy)
UNIT_EXAMPLES_BY_CONFIG = {
    "scheduler.toml": "scheduler.toml",
    "worker-1.toml": "worker.toml",
    "reexecd.toml": "reexecd.toml",
    "storage.toml": "storage.toml",
}


def effective_config(argv: list[str]) -> Config:
    """What `reexecd` would run with: the example for --config, plus the command line's
    overrides (the same ones cli.main applies)."""
    config_path = option(argv, "--config")
    assert config_path is not None and config_path.startswith("/etc/reexec/")
    config = load_config(EXAMPLES / UNIT_EXAMPLES_BY_CONFIG[Path(config_path).name])
    if (data_dir := option(argv, "--data-dir")) is not None:
        config.data_dir = data_dir
    if (worker_id := option(argv, "--worker-id")) is not None:
        config.worker.worker_id = worker_id
    return config


def test_every_unit_is_tested() -> None:
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(UNIT_EXAMPLES)


@pytest.mark.parametrize("name", sorted(UNIT_EXAMPLES))
def test_unit_keys(name: str) -> None:
    unit = parse_unit(UNITS / name)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "WantedBy", "Install") == "multi-user.target"
    assert one(unit, "Type") == "notify"
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "KillMode") == "mixed"
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert timespan(one(unit, "WatchdogSec")) == 30
    assert one(unit, "LimitNOFILE") == "1048576"
    # The worker is root so that confined actions never hold its privileges (bwrap runs as
    # nobody, the action as root only in its user namespace); the servers need none.
    user = "root" if name == "reexec-worker@.service" else "reexec"
    assert one(unit, "User") == user and one(unit, "Group") == user

    # ExecStart: the installed reexecd with a real subcommand and valid flags.
    argv = exec_start(name)
    assert argv[0] == INSTALLED_REEXECD
    args = _parser().parse_args(argv[1:])  # exits (fails the test) on an unknown flag
    assert args.command == {"reexec-scheduler.service": "scheduler", "reexec-worker@.service":
                            "worker", "reexec-serve.service": "serve",
                            "reexec-storage.service": "storage"}[name]  # fmt: skip
    config = effective_config(argv)

    # The data directory is the state directory, and writable despite ProtectSystem=strict.
    assert config.data_dir == f"/var/lib/{expand(one(unit, 'StateDirectory'), '1')}"
    assert config.data_dir in expand(one(unit, "ReadWritePaths"), "1").split()
    if name == "reexec-worker@.service":
        assert config.worker.worker_id == f"{socket.gethostname()}-1"
        assert exec_start(name, "2") != argv  # instances never share a directory or an id

    # Stopping must outlast the daemon's own drain, or systemd SIGKILLs it mid-drain.
    drain = {
        "scheduler": config.server.grace_period_s,
        "storage": config.server.grace_period_s,
        "worker": config.worker.drain_timeout_s + config.worker.sandbox.kill_grace_s,
        "serve": config.server.grace_period_s + config.worker.drain_timeout_s,
    }[args.command]
    assert timespan(one(unit, "TimeoutStopSec")) > drain + 10

    # Hardening.
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
    }.items():
        assert one(unit, key) == value, key
    families = set(one(unit, "RestrictAddressFamilies").split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    service = unit["Service"]
    if args.command in ("scheduler", "storage"):
        assert one(unit, "RestrictNamespaces") == "yes"
        assert one(unit, "CapabilityBoundingSet") == ""
        assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    else:
        # Actions inherit the service's restrictions: the sandbox creates namespaces
        # (CLONE_NEWNET/NEWPID/NEWNS) and, as root, switches users.
        for key in ("RestrictNamespaces", "PrivateUsers", "SystemCallFilter", "PrivateDevices"):
            assert key not in service, f"{key} would break actions or the sandbox"
        assert "AF_NETLINK" in families  # `ip link set lo up` in a network namespace


def test_sysusers_declares_the_service_user() -> None:
    lines = [
        line.split()
        for line in (UNITS / "reexec.sysusers.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    users = {fields[1]: fields for fields in lines if fields[0] == "u"}
    assert "reexec" in users
    assert STATE_ROOT in users["reexec"]  # its home: the units' state directory
    # The user actions run as (worker.sandbox.run_as in the docs) is not in the reexec group.
    assert "reexec-action" in users
    assert not [f for f in lines if f[0] == "m" and f[1] == "reexec-action"]


# -- (b) the units' ExecStart, run -------------------------------------------------------------


def adjusted_config(example: str, tmp: Path, port: int, scheduler_port: int = 0) -> Path:
    """The example with the paths moved under `tmp` and the ports replaced; checked, so a
    change to the example cannot quietly make the test use /var/lib or port 8980."""
    text = (EXAMPLES / example).read_text()
    text = text.replace(STATE_ROOT, str(tmp / "state"))
    text = text.replace('"0.0.0.0:8980"', f'"127.0.0.1:{port}"')
    text = text.replace('"127.0.0.1:8980"', f'"127.0.0.1:{port}"')
    text = text.replace("grpc://scheduler.example:8980", f"grpc://127.0.0.1:{scheduler_port}")
    path = tmp / example
    path.write_text(text)
    config = load_config(path)
    assert config.data_dir.startswith(str(tmp)) or not config.data_dir.startswith("/")
    if example == "worker.toml":
        assert config.worker.scheduler == f"grpc://127.0.0.1:{scheduler_port}"
    else:
        assert [parse_listen(a)[1] for a in config.server.listen] == [port]
    return path


class UnitProcess:
    """A unit's ExecStart run as systemd would: NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID
    (the main pid: set by a shell that then execs the daemon, keeping its pid)."""

    def __init__(self, name: str, tmp: Path, notify: str, *, port: int = 0, sched_port: int = 0):
        self.name = name
        argv = exec_start(name)
        self.config = adjusted_config(
            UNIT_EXAMPLES[name], tmp, port or free_port(), scheduler_port=sched_port
        )
        self.port = port
        argv[argv.index("--config") + 1] = str(self.config)
        argv = [a.replace(STATE_ROOT, str(tmp / "state")) for a in argv]
        assert argv[0] == INSTALLED_REEXECD
        self.argv = [sys.executable, "-m", "reexec.daemon", *argv[1:]]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env |= {"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "400000"}  # ping every 0.2 s
        self.log_path = tmp / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh", *self.argv],
                env=env,
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    async def wait_for(self, receiver: Receiver, key: str, timeout: float = 20) -> Message:
        """The next message with `key`, from this process's pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None  # first: what it sent before is queued now
            receiver.drain()
            while receiver.cursor < len(receiver.seen):
                m = receiver.seen[receiver.cursor]
                receiver.cursor += 1
                assert m.pid == self.proc.pid, f"{self.name}: {m.fields} from pid {m.pid}"
                if key in m.fields:
                    return m
            if exited:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}) before {key}=:\n"
                            f"{self.log_text()[-3000:]}")  # fmt: skip
            await trio.sleep(0.02)
        seen = [m.fields for m in receiver.seen]
        pytest.fail(
            f"{self.name}: no {key}= in {timeout}s (got {seen}):\n{self.log_text()[-3000:]}"
        )

    async def stop(self, receiver: Receiver) -> None:
        """SIGTERM as `systemctl stop` sends it: STOPPING=1, then exit status 0."""
        self.proc.send_signal(signal.SIGTERM)
        await self.wait_for(receiver, "STOPPING", 10)
        with trio.fail_after(20):
            while self.proc.poll() is None:
                await trio.sleep(0.05)
        assert self.proc.returncode == 0, self.log_text()[-3000:]


async def capabilities(port: int) -> reapi.ServerCapabilities:
    ch = await open_channel(port)
    try:
        stub = reapi.CapabilitiesStub(ch)
        return await call(stub.get_capabilities, reapi.GetCapabilitiesRequest())
    finally:
        ch.close()


@pytest.mark.parametrize(
    "name", ["reexec-scheduler.service", "reexec-serve.service", "reexec-storage.service"]
)
async def test_server_unit_notifies_ready_watchdog_and_stopping(
    aio_loop: None, tmp_path: Path, receiver: Receiver, sock_dir: Path, name: str
) -> None:
    port = free_port()
    unit = UnitProcess(name, tmp_path, str(sock_dir / "notify"), port=port)
    try:
        async with pumping(receiver):
            ready = await unit.wait_for(receiver, "READY")
            assert ready.fields.get("STATUS")
            # READY=1 means it accepts RPCs now: no retrying.
            caps = await capabilities(port)
            assert caps.execution_capabilities.exec_enabled == (name != "reexec-storage.service")
            assert caps.cache_capabilities.max_batch_total_size_bytes > 0
            # WatchdogSec= is safe: pings keep coming (WATCHDOG_USEC=0.4 s: one every 0.2 s).
            for _ in range(3):
                await unit.wait_for(receiver, "WATCHDOG", 3)
            await unit.stop(receiver)
    finally:
        unit.kill()


async def test_scheduler_unit_reload(
    aio_loop: None, tmp_path: Path, receiver: Receiver, sock_dir: Path
) -> None:
    """`systemctl reload` (ExecReload=kill -HUP) must not end the daemon: SIGHUP's default
    action would kill it, and systemd counts that as a clean exit, so no Restart= either."""
    port = free_port()
    unit = UnitProcess("reexec-scheduler.service", tmp_path, str(sock_dir / "notify"), port=port)
    try:
        async with pumping(receiver):
            await unit.wait_for(receiver, "READY")
            unit.proc.send_signal(signal.SIGHUP)
            reloading = await unit.wait_for(receiver, "RELOADING", 10)
            assert int(reloading.fields["MONOTONIC_USEC"]) > 0
            await unit.wait_for(receiver, "READY", 10)
            assert unit.proc.poll() is None
            await capabilities(port)
            await unit.stop(receiver)
    finally:
        unit.kill()


async def test_worker_unit_connects_and_drains(
    aio_loop: None, tmp_path: Path, sock_dir: Path
) -> None:
    sched_rx = Receiver(str(sock_dir / "sched"))
    worker_rx = Receiver(b"\0" + f"reexec-test-{uuid.uuid4().hex}".encode())  # abstract
    port = free_port()
    (tmp_path / "s").mkdir()
    (tmp_path / "w").mkdir()
    scheduler = UnitProcess("reexec-scheduler.service", tmp_path / "s", str(sock_dir / "sched"),
                            port=port)  # fmt: skip
    worker: UnitProcess | None = None
    try:
        async with pumping(sched_rx, worker_rx):
            await scheduler.wait_for(sched_rx, "READY")
            notify = "@" + worker_rx.sock.getsockname()[1:].decode()
            worker = UnitProcess("reexec-worker@.service", tmp_path / "w", notify, sched_port=port)
            await worker.wait_for(worker_rx, "READY")
            for _ in range(3):
                await worker.wait_for(worker_rx, "WATCHDOG", 3)
            # It registered under the unit's --worker-id %H-%i.
            with trio.fail_after(10):
                while f"worker={socket.gethostname()}-1" not in scheduler.log_text():
                    await trio.sleep(0.05)
            assert (tmp_path / "w" / "state" / "worker-1").is_dir()  # --data-dir .../worker-%i
            await worker.stop(worker_rx)
            await scheduler.stop(sched_rx)
    finally:
        if worker is not None:
            worker.kill()
        scheduler.kill()
        sched_rx.close()
        worker_rx.close()


# -- (c) systemd's own tools ------------------------------------------------------------------


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists: point it at a stand-in.
    stub = tmp_path / "reexecd"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    problems = []
    for name in sorted(UNIT_EXAMPLES):
        copy = tmp_path / name
        copy.write_text((UNITS / name).read_text().replace(INSTALLED_REEXECD, str(stub)))
        r = subprocess.run(
            [tool, "verify", "--man=no", "--generators=no", str(copy)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # Unknown keys and bad values are only warnings ("..., ignoring"), rc stays 0.
        ours = [line for line in r.stderr.splitlines() if "reexec" in line]
        if r.returncode != 0 and not ours:  # e.g. a container without what verify needs
            pytest.skip(f"systemd-analyze verify does not work here: {r.stderr.strip()}")
        if r.returncode != 0 or ours:
            problems.append(f"{name}: rc={r.returncode}\n{r.stderr}")
    assert not problems, "\n".join(problems)


def test_systemd_sysusers_creates_the_users(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    r = subprocess.run(
        [tool, f"--root={tmp_path}", str(UNITS / "reexec.sysusers.conf")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in
              (tmp_path / "etc" / "passwd").read_text().splitlines()}  # fmt: skip
    assert passwd["reexec"][5] == STATE_ROOT
    assert passwd["reexec"][6].endswith("nologin")
    assert "reexec-action" in passwd
