"""The worker's confinement policy: per-action properties, its own platform, and refusing to
start where actions cannot be confined."""

from __future__ import annotations

from pathlib import Path

import pytest

from reexec.errors import InvalidArgument
from reexec.sandbox import confine_setup, factory
from reexec.sandbox.action_confinement import Confinement, own_platform, parse_ro_binds
from reexec.sandbox.config import SandboxConfig, WorkerConfig
from reexec.sandbox.confine import ConfineMode
from reexec.sandbox.confine_setup import HostUser

ROOT = Path("/w/op/root")


def policy(mode: ConfineMode = ConfineMode.INPUT_ROOT, **kw: object) -> Confinement:
    return Confinement(mode, "/usr/bin/bwrap", HostUser(65534, 65534), **kw)  # type: ignore[arg-type]


def test_properties_set_network_and_ids() -> None:
    spec = policy().spec({"network": "on", "unixUID": "1000", "unixGID": "100"}, ROOT, ROOT, ROOT)
    assert (spec.network, spec.uid, spec.gid) == (True, 1000, 100)
    spec = policy().spec({}, ROOT, ROOT / "sub", Path("/w/op/tmp"))
    assert (spec.network, spec.uid, spec.gid, spec.cwd) == (False, 0, 0, "/w/op/root/sub")
    refused = policy(allow_network=False).spec({"network": "on"}, ROOT, ROOT, ROOT)
    assert refused.network is False


@pytest.mark.parametrize(
    "props", [{"network": "yes"}, {"unixUID": "-1"}, {"unixGID": "root"}, {"unixUID": "9" * 11}]
)
def test_malformed_properties_are_the_clients_error(props: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument):
        policy().spec(props, ROOT, ROOT, ROOT)


def test_ro_binds_only_in_input_root_mode() -> None:
    binds = parse_ro_binds(["/etc/resolv.conf", "/opt/sdk:/sdk"])
    assert binds == (("/etc/resolv.conf", "/etc/resolv.conf"), ("/opt/sdk", "/sdk"))
    assert policy(ro_binds=binds).spec({}, ROOT, ROOT, ROOT).ro_binds == binds
    assert policy(ConfineMode.HOST, ro_binds=binds).spec({}, ROOT, ROOT, ROOT).ro_binds == ()
    with pytest.raises(ValueError):
        parse_ro_binds(["relative:/x"])


def test_own_platform() -> None:
    p = own_platform(ConfineMode.HOST)
    assert p["OSFamily"] == "linux" and p["confinement"] == "host"
    assert p["ISA"] and "_" not in p["ISA"]  # x86_64 is spelt x86-64


def _config(mode: str) -> WorkerConfig:
    return WorkerConfig(sandbox=SandboxConfig(confinement=mode))  # type: ignore[arg-type]


def test_worker_refuses_to_start_without_bwrap_saying_why(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(factory, "find_bwrap", lambda: None)
    with pytest.raises(factory.WorkerSetupError) as e:
        factory._confinement(_config("host"), tmp_path / "work")
    message = str(e.value)
    assert "bubblewrap" in message and 'confinement = "off"' in message


def test_worker_refuses_to_start_without_namespaces(tmp_path: Path) -> None:
    # A "bwrap" that fails like one denied its namespaces.
    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    reason = confine_setup.confinement_problem(str(fake), None)
    assert reason is not None and "No permissions to creating new namespace" in reason
    assert "user namespaces" in reason


def test_confinement_off_needs_nothing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(factory, "find_bwrap", lambda: None)
    assert factory._confinement(_config("off"), tmp_path / "work") is None


def test_hidden_directories_only_in_host_mode_and_outermost_only() -> None:
    from reexec.sandbox.action_confinement import outermost
    from reexec.sandbox.confine import bwrap_argv

    hidden = outermost(["/srv/reexec/work", "/srv/reexec", "/srv/reexec-cache", "/srv/reexec/"])
    assert hidden == ("/srv/reexec", "/srv/reexec-cache")
    spec = policy(ConfineMode.HOST, hidden=hidden).spec({}, ROOT, ROOT, ROOT)
    argv = " ".join(bwrap_argv("bwrap", spec, ["true"], {}))
    # After the read-only host, before the exec root (which is bound back on top).
    assert "--tmpfs /srv/reexec --tmpfs /srv/reexec-cache --bind /w/op/root /w/op/root" in argv
    assert policy(hidden=hidden).spec({}, ROOT, ROOT, ROOT).hidden == ()  # input_root
