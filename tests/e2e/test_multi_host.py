"""Several hosts, made by the test as Linux network namespaces on one machine.

    lan namespace: a bridge; every host namespace has a veth on it and one address (10.213.0.x)
    storage-a, storage-b   `reexecd storage`
    scheduler              `reexecd scheduler`, its CAS a `shard` of the two storage hosts
    worker                 `reexecd worker`
    client                 a real Bazel building and testing the e2e workspace remotely

Then storage-b stops, and a build from a fresh output base still succeeds: what was lost is
missing, Bazel uploads it again, and it lands on storage-a. Everything is started and removed by
the test, bounded in time; the addresses exist only inside the test's own namespaces.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    BazelWorkspace,
    ReexecdProcess,
    bazel_available,
    parse_process_summary,
    remote_exec_flags,
)

pytestmark = pytest.mark.e2e

HOSTS = ("storage-a", "storage-b", "scheduler", "worker", "client")
SUBNET = "10.213.0"
PORT = 8980


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Lan:
    """Namespaces joined by a bridge; `address(host)` is the host's only address."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000}"
        self.lan = f"rx{self.tag}-lan"
        self.ns = {h: f"rx{self.tag}-{h}" for h in HOSTS}
        self._made: list[str] = []

    def address(self, host: str) -> str:
        return f"{SUBNET}.{10 + HOSTS.index(host)}"

    def up(self) -> None:
        _ip("netns", "add", self.lan)
        self._made.append(self.lan)
        _ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.lan, "link", "set", "br0", "up")
        for i, host in enumerate(HOSTS):
            ns = self.ns[host]
            _ip("netns", "add", ns)
            self._made.append(ns)
            inner, outer = f"v{i}-{self.tag}", f"p{i}-{self.tag}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "netns", self.lan)
            _ip("-n", self.lan, "link", "set", outer, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]


@pytest.fixture
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    net = Lan()
    try:
        net.up()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        net.down()
        stderr = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot make network namespaces here: {e} {stderr.decode(errors='replace')}")
    try:
        yield net
    finally:
        net.down()


class HostProcess(ReexecdProcess):
    """reexecd inside one of the test's namespaces; ready when its log says so."""

    def __init__(self, lan: Lan, host: str, *a, ready_line: str, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, wait_ready=False, **kw)
        self.prefix = lan.exec_prefix(host)
        self.ready_line = ready_line

    def command(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", self.module, *self.args]

    def wait_ready_line(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.ready_line not in self.log_text():
            if self._proc is not None and self._proc.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.args[0]} not ready:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)


def test_build_against_a_sharded_cas_across_hosts(lan: Lan, tmp_path: Path) -> None:
    if not bazel_available():
        pytest.fail("bazel is not installed", pytrace=False)
    # A data directory outside /tmp: actions see the host read-only and a private /tmp.
    root = Path(os.environ.get("REEXEC_MULTIHOST_ROOT", "/var/tmp")) / f"reexec-mh-{lan.tag}"
    root.mkdir(parents=True, exist_ok=True)
    sched = f"grpc://{lan.address('scheduler')}:{PORT}"
    configs = {
        "storage-a": "",
        "storage-b": "",
        "scheduler": (
            '[cas]\ntype = "shard"\n'
            + "".join(
                f'[[cas.shards]]\nname = "{h}"\n'
                f'store = {{ type = "grpc", url = "grpc://{lan.address(h)}:{PORT}", '
                "timeout_s = 20 }\n"
                for h in ("storage-a", "storage-b")
            )
            + "[worker]\nenabled = false\n"
        ),
        "worker": f'[worker]\nscheduler = "{sched}"\nworker_id = "mh-worker"\n'
        "max_inflight_tasks = 2\n",
    }
    roles = {"storage-a": "storage", "storage-b": "storage", "scheduler": "scheduler"}
    procs: dict[str, HostProcess] = {}
    try:
        for host, body in configs.items():
            cfg = root / f"{host}.toml"
            listen = (
                "" if host == "worker" else f'[server]\nlisten = ["{lan.address(host)}:{PORT}"]\n'
            )
            cfg.write_text(listen + body)
            role = roles.get(host, "worker")
            ready = "connected to the scheduler" if role == "worker" else "reexecd ready"
            p = HostProcess(
                lan,
                host,
                root / host,
                args=[role, "--config", str(cfg), "--data-dir", str(root / host)],
                log_dir=root / f"{host}-log",
                ready_line=ready,
            )
            p.start()
            procs[host] = p
            p.wait_ready_line()

        wrapper = tmp_path / "bazel-in-client-ns"
        wrapper.write_text(
            "#!/bin/sh\nexec " + " ".join(lan.exec_prefix("client")) + ' bazel "$@"\n'
        )
        wrapper.chmod(0o755)
        with BazelWorkspace(tmp_path / "bazel", bazel=str(wrapper)) as ws:
            flags = [*remote_exec_flags(sched), "--remote_retries=5"]
            first = ws.run("test", *flags, "//...", timeout=600)
            summary = parse_process_summary(first.stderr)
            assert summary.get("remote", 0) >= 10, summary
            assert "2 tests pass" in first.stdout

            procs["storage-b"].stop()
            second = ws.run(
                "test",
                *flags,
                "--noremote_accept_cached",
                "//...",
                output_base=ws.new_output_base("after-storage-b-stopped"),
                timeout=600,
            )
            assert "2 tests pass" in second.stdout, second.stderr[-3000:]
            assert "shard storage-b failed" in procs["scheduler"].log_text()
    finally:
        for p in reversed(list(procs.values())):
            p.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False, timeout=120)
