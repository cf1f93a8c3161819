"""Issue 10's escapes through the real local worker of `reexecd serve`, confined by default.

Each action tries one escape; afterwards the host is unchanged and the CAS still verifies:
every blob the results name reads back with its digest, and the shared input, hardlinked into
the action from the worker's cache, has kept its content in the CAS and in the cache (a later
action reads it intact).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reexec import fastpb
from reexec.daemon.config import Config, WorkerConfig
from reexec.sandbox.config import SandboxConfig
from reexec.sandbox.confine_setup import as_user, confinement_problem, find_bwrap, host_user
from tests.conftest import make_config
from tests.hardening.conftest import RawClient, ThreadDaemon, sha

_PROBLEM = confinement_problem(find_bwrap(), host_user(None))
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no confinement: {_PROBLEM}")

SHARED = b"a shared input: the same inode as the worker cache's copy\n"
PATH = "/usr/local/bin:/usr/bin:/bin"


def _config(data: Path, mode: str) -> Config:
    config = make_config(data)
    sandbox = SandboxConfig(confinement=mode)  # type: ignore[arg-type]
    return Config(
        data_dir=config.data_dir,
        server=config.server,
        scheduler=config.scheduler,
        worker=WorkerConfig(sandbox=sandbox),
    )


@pytest.fixture(scope="module")
def serve() -> Iterator[tuple[RawClient, Path]]:
    # Outside /tmp: the action's private /tmp would hide a directory there anyway, and these
    # tests must see the read-only host and the hidden data directory for themselves.
    base = Path(tempfile.mkdtemp(prefix="reexec-confined-", dir="/var/tmp"))
    d = ThreadDaemon(_config(base / "data", "host"), local_worker=True).start()
    client = RawClient(d.port)
    try:
        yield client, base
    finally:
        client.close()
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def _execute(
    client: RawClient,
    script: str,
    *,
    outputs: tuple[str, ...] = (),
    props: dict[str, str] | None = None,
    salt: bytes = b"",
) -> Any:
    """Run `sh -c script` with `in.txt` (SHARED) in its input root; the ExecuteResponse."""
    command = fastpb.Command(arguments=["/bin/sh", "-c", script], output_paths=list(outputs))
    command.environment_variables.add(name="PATH", value=PATH)
    root = fastpb.Directory()
    f = root.files.add(name="in.txt")
    f.digest.CopyFrom(sha(SHARED))
    action = fastpb.Action(salt=salt + script.encode(), do_not_cache=True)
    for name, value in sorted((props or {}).items()):
        action.platform.properties.add(name=name, value=value)
    action.command_digest.CopyFrom(sha(command.SerializeToString()))
    action.input_root_digest.CopyFrom(sha(root.SerializeToString()))
    client.upload(
        command.SerializeToString(), root.SerializeToString(), action.SerializeToString(), SHARED
    )
    req = fastpb.ExecuteRequest()
    req.action_digest.CopyFrom(sha(action.SerializeToString()))
    return client.execute(req.SerializeToString())


def _stdout(client: RawClient, resp: Any) -> str:
    r = resp.result
    return (
        r.stdout_raw or (client.read_blob(r.stdout_digest) if r.stdout_digest.hash else b"")
    ).decode()


def _assert_cas_verifies(client: RawClient, resp: Any) -> None:
    """Every blob the result names reads back with its digest, and the shared input too, also
    through the worker's cache (a fresh action reads it)."""
    names = [f.digest for f in resp.result.output_files]
    if resp.result.stdout_digest.hash:
        names.append(resp.result.stdout_digest)
    for d in [*names, sha(SHARED)]:
        data = client.read_blob(d)
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (d.hash, d.size_bytes)
    check = _execute(client, "cat in.txt", salt=str(time.monotonic()).encode())
    assert _stdout(client, check) == SHARED.decode()


def test_actions_run_confined_as_root_only_inside(serve) -> None:
    client, _ = serve
    resp = _execute(client, "id -u; cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname")
    assert resp.status.code == 0 and resp.result.exit_code == 0, resp
    uid, init, hostname = _stdout(client, resp).splitlines()
    assert uid == "0"  # root inside its user namespace ...
    assert "bwrap" in init.split()[0]  # ... PID 1 is bwrap's reaper, not the host's init
    assert hostname == "reexec"
    resp = _execute(client, "id -u", props={"unixUID": "1234", "unixGID": "99"})
    assert _stdout(client, resp).strip() == "1234"


def test_write_outside_exec_root_and_private_tmp_fails(serve) -> None:
    client, base = serve
    targets = [base / "escape", Path("/var/tmp") / f"reexec-escape-{os.getpid()}", Path("/etc/x")]
    script = (
        "; ".join(f"echo x > {t} && echo WROTE {t}" for t in targets) + "; echo t > /tmp/t; true"
    )
    resp = _execute(client, script)
    assert resp.result.exit_code == 0, resp
    assert "WROTE" not in _stdout(client, resp)
    for t in targets:
        assert not os.path.lexists(t), t
    _assert_cas_verifies(client, resp)


def test_a_child_cannot_rewrite_an_output_after_the_action(serve) -> None:
    """A `setsid` child keeps the output open and writes 1 s later; it must be dead by then
    (the worker moved the output into its cache: a write would change a CAS blob)."""
    client, _ = serve
    script = (
        'exec 3> out; setsid sh -c "sleep 1; echo evil >&3" </dev/null >/dev/null 2>&1 & '
        "echo good >&3"
    )
    resp = _execute(client, script, outputs=("out",))
    assert resp.result.exit_code == 0, resp
    (out,) = resp.result.output_files
    time.sleep(2)
    assert client.read_blob(out.digest) == b"good\n"
    _assert_cas_verifies(client, resp)


def test_the_workers_data_is_hidden(serve) -> None:
    client, base = serve
    data = base / "data"
    assert any((data / "cas").iterdir())  # the CAS is there on the host ...
    resp = _execute(client, f"ls -A {data}; ls {data}/cas && echo LISTED; true")
    # ... and an empty tmpfs inside, but for the action's own exec root under work/.
    assert _stdout(client, resp).split() == ["work"], _stdout(client, resp)


def test_shared_input_cannot_be_modified(serve) -> None:
    client, _ = serve
    script = (
        "echo evil > in.txt && echo WROTE; echo evil >> in.txt && echo APPENDED; "
        "chmod 666 in.txt && echo CHMOD; touch -d @0 in.txt && echo TOUCHED; cat in.txt"
    )
    for props in ({}, {"unixUID": "1000", "unixGID": "1000"}):
        resp = _execute(client, script, props=props)
        assert resp.result.exit_code == 0, resp
        assert _stdout(client, resp) == SHARED.decode(), _stdout(client, resp)
        _assert_cas_verifies(client, resp)


def test_host_file_cannot_be_hardlinked_as_an_output(serve) -> None:
    client, _ = serve
    before = os.stat("/etc/passwd")
    resp = _execute(client, "ln /etc/passwd out && echo LINKED; true", outputs=("out",))
    assert "LINKED" not in _stdout(client, resp)
    assert not resp.result.output_files
    after = os.stat("/etc/passwd")
    assert (after.st_mode, after.st_uid, after.st_nlink) == (
        before.st_mode,
        before.st_uid,
        before.st_nlink,
    )


def test_symlink_chain_to_the_host_root_is_read_only(serve) -> None:
    client, _ = serve
    script = (
        "mkdir d && ln -s .. d/up && ln -s d/up/d/up/d/up/../../../../../../.. x && "
        "echo evil > x/etc/reexec-escape && echo WROTE; ls x/ >/dev/null && echo REACHED"
    )
    resp = _execute(client, script)
    out = _stdout(client, resp)
    assert "REACHED" in out and "WROTE" not in out  # host mode shows the host, read-only
    assert not os.path.lexists("/etc/reexec-escape")


@pytest.fixture
def listener() -> Iterator[int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


@pytest.mark.parametrize("network", ["off", None, "on"])
def test_network_only_when_asked(serve, listener: int, network: str | None) -> None:
    client, _ = serve
    script = (
        "/usr/bin/python3 -I -S -c \"import socket; socket.create_connection(('127.0.0.1', "
        f'{listener}), timeout=3)" 2>/dev/null && echo CONNECTED; true'
    )
    props = {"network": network} if network else {}
    resp = _execute(client, script, props=props)
    assert ("CONNECTED" in _stdout(client, resp)) is (network == "on")


def test_processes_outside_cannot_be_signalled(serve) -> None:
    client, _ = serve
    # The same host user the actions run as (setpriv: this process has grpcio's fork hooks).
    sleeper = subprocess.Popen([*as_user(host_user(None)), "sleep", "60"])
    try:
        resp = _execute(client, f"kill -9 {sleeper.pid} && echo KILLED; kill -9 -1; echo done")
        assert "KILLED" not in _stdout(client, resp)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_platform_properties_of_buildstream_are_accepted(serve) -> None:
    import platform

    client, _ = serve
    isa = {"x86_64": "x86-64", "aarch64": "aarch64"}.get(platform.machine(), platform.machine())
    props = {"OSFamily": "linux", "ISA": isa, "unixUID": "0", "unixGID": "0", "network": "off"}
    resp = _execute(client, "echo ok", props=props)
    assert resp.status.code == 0 and _stdout(client, resp) == "ok\n", resp


def test_unknown_property_is_still_failed_precondition(serve) -> None:
    client, _ = serve
    command = fastpb.Command(arguments=["true"])
    root = fastpb.Directory()
    action = fastpb.Action(do_not_cache=True)
    action.platform.properties.add(name="gpu", value="a100")
    action.command_digest.CopyFrom(sha(command.SerializeToString()))
    action.input_root_digest.CopyFrom(sha(root.SerializeToString()))
    client.upload(command.SerializeToString(), root.SerializeToString(), action.SerializeToString())
    req = fastpb.ExecuteRequest()
    req.action_digest.CopyFrom(sha(action.SerializeToString()))
    out = client.server_stream(
        "/build.bazel.remote.execution.v2.Execution/Execute", req.SerializeToString()
    )
    assert out.code.name == "FAILED_PRECONDITION" and "gpu" in out.details, out
