"""A worker's confinement policy, and what one action's platform properties make of it.

The worker's config picks the mode (`host` or `input_root`; `off` means no `Confinement` at
all); each action may then ask, through its platform properties, for
  * `network` = `on` | `off` (default off): share the host's network, if the worker allows it;
  * `unixUID` / `unixGID` (BuildStream's `build-uid` / `build-gid`): the ids it runs as inside
    its user namespace (default 0, i.e. root there and nothing on the host).
The worker offers `OSFamily`, `ISA` and `confinement` with its own values (`own_platform`).
"""

from __future__ import annotations

import os
import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reexec.errors import InvalidArgument
from reexec.sandbox.confine import ConfineMode, ConfineSpec
from reexec.sandbox.confine_setup import HostUser

__all__ = ["Confinement", "outermost", "own_platform", "parse_ro_binds"]

# Python's machine names -> the REAPI / BuildStream ISA names.
_ISA = {
    "x86_64": "x86-64",
    "amd64": "x86-64",
    "i386": "x86-32",
    "i686": "x86-32",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv7l": "aarch32",
    "armv8l": "aarch32",
    "ppc64le": "power-isa-le",
    "ppc64": "power-isa-be",
    "riscv64": "riscv64",
}
# Largest id a user namespace maps (2^32 - 2; -1 is "no id").
_MAX_ID = 2**32 - 2


def own_platform(mode: ConfineMode) -> dict[str, str]:
    """The platform properties a worker offers unless its config sets them."""
    machine = _platform.machine().lower()
    return {
        "OSFamily": _platform.system().lower() or "linux",
        "ISA": _ISA.get(machine, machine),
        "confinement": mode.value,
    }


def parse_ro_binds(entries: list[str]) -> tuple[tuple[str, str], ...]:
    """`SRC` or `SRC:DEST` (absolute paths) -> (src, dest) pairs; ValueError names a bad one."""
    out: list[tuple[str, str]] = []
    for entry in entries:
        src, sep, dest = entry.partition(":")
        dest = dest if sep else src
        if not src.startswith("/") or not dest.startswith("/"):
            raise ValueError(f"read-only bind {entry!r}: both paths must be absolute")
        out.append((src, dest))
    return tuple(out)


@dataclass(frozen=True)
class Confinement:
    mode: ConfineMode
    bwrap: str
    user: HostUser | None
    """The unprivileged host user bwrap runs as; None: the worker's own (unprivileged) user."""
    ro_binds: tuple[tuple[str, str], ...] = ()
    allow_network: bool = True
    """False: actions asking for `network=on` still get a private network namespace."""
    hidden: tuple[str, ...] = ()
    """`host` mode: the worker's directories (data, cache, work) hidden from actions."""

    def spec(
        self, props: Mapping[str, str], exec_root: Path, cwd: Path, tmp_dir: Path
    ) -> ConfineSpec:
        """The bwrap spec for one action; InvalidArgument for a malformed property value."""
        network = props.get("network", "off")
        if network not in ("on", "off"):
            raise InvalidArgument(f"platform property network must be on or off, not {network!r}")
        return ConfineSpec(
            mode=self.mode,
            exec_root=os.path.abspath(exec_root),
            cwd=os.path.abspath(cwd),
            network=network == "on" and self.allow_network,
            uid=_id(props, "unixUID"),
            gid=_id(props, "unixGID"),
            tmp_dir=os.path.abspath(tmp_dir),
            ro_binds=self.ro_binds if self.mode is ConfineMode.INPUT_ROOT else (),
            hidden=self.hidden if self.mode is ConfineMode.HOST else (),
        )


def _id(props: Mapping[str, str], name: str) -> int:
    value = props.get(name)
    if value is None:
        return 0
    if not value.isdigit() or int(value) > _MAX_ID:
        raise InvalidArgument(f"platform property {name} must be a number from 0 to {_MAX_ID}")
    return int(value)


def outermost(paths: list[str]) -> tuple[str, ...]:
    """The absolute, normalised `paths` without those inside another one of them."""
    norm = sorted({os.path.abspath(p) for p in paths})
    out: list[str] = []
    for p in norm:
        if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in out):
            out.append(p)
    return tuple(out)
