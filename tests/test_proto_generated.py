"""reexec/gen must be exactly what scripts/gen_protos.py produces from proto/."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GEN_DIR = ROOT / "reexec" / "gen"
GEN_SCRIPT = ROOT / "scripts" / "gen_protos.py"

PROTO_FILES = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
_PACKAGE_RE = re.compile(r"^\s*package\s+([\w.]+)\s*;", re.MULTILINE)


def _package_of(proto: str) -> str:
    match = _PACKAGE_RE.search((PROTO_DIR / proto).read_text(encoding="utf-8"))
    assert match, f"{proto} has no package statement"
    return match.group(1)


def test_there_are_protos() -> None:
    assert "build/bazel/remote/execution/v2/remote_execution.proto" in PROTO_FILES


def test_generated_code_is_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        pytest.fail(
            "reexec/gen is stale; regenerate with `.venv/bin/python scripts/gen_protos.py`\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )


@pytest.mark.parametrize("proto", PROTO_FILES)
def test_proto_has_generated_module(proto: str) -> None:
    package = _package_of(proto)
    init = GEN_DIR.joinpath(*package.split("."), "__init__.py")
    assert init.is_file(), f"no generated module for {proto} (expected {init})"
    header = init.read_text(encoding="utf-8").splitlines()[:5]
    sources = next((line for line in header if line.startswith("# sources:")), "")
    assert proto in sources.split(":", 1)[1].replace(",", " ").split(), (
        f"{init} does not list {proto} in its sources header: {sources!r}"
    )
    module = importlib.import_module(f"reexec.gen.{package}")
    assert module.__file__ is not None


def test_descriptor_set_covers_every_proto() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString((GEN_DIR / "descriptors.binpb").read_bytes())
    names = [f.name for f in fds.file]
    assert len(names) == len(set(names))
    missing = set(PROTO_FILES) - set(names)
    assert not missing, f"descriptors.binpb lacks {sorted(missing)}"
    for fd in fds.file:
        assert not fd.HasField("source_code_info"), f"{fd.name} carries source info"
    # Dependencies come before their users, as DescriptorPool.Add needs.
    seen: set[str] = set()
    for fd in fds.file:
        assert set(fd.dependency) <= seen, f"{fd.name} listed before its imports"
        seen.add(fd.name)


def test_generated_readme_warns_against_hand_edits() -> None:
    text = (GEN_DIR / "README.md").read_text(encoding="utf-8")
    assert "scripts/gen_protos.py" in text
    assert "DO NOT EDIT" in text
