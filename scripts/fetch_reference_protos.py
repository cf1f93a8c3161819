#!/usr/bin/env python3
"""Fetch the reference REAPI protos used by tests/test_proto_wire.py.

Downloads the buildstream==2.8.1 wheel from PyPI (``pip download``) into
``.cache/ref/`` and unpacks its ``buildstream/_protos/**`` tree into
``.cache/ref/protos/`` (so ``.cache/ref/protos/build/bazel/remote/execution/v2/
remote_execution.proto`` etc.). Idempotent: does nothing when the protos are
already there. Exits non-zero with a message if the download fails.

These files are only ever read by tests as an independent reference; they are
never copied into the project's own proto/ tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "ref"
DEST = CACHE / "protos"
REQUIREMENT = "buildstream==2.8.1"
WHEEL_PREFIX = "buildstream/_protos/"
# Marker file: present once a complete extraction has been moved into place.
SENTINEL = DEST / "build" / "bazel" / "remote" / "execution" / "v2" / "remote_execution.proto"

# Every buildstream wheel carries the same protos; pin one platform so the
# download works (and is the same file) wherever the tests run.
PIP_PLATFORM_ARGS = [
    "--only-binary=:all:",
    "--platform=manylinux_2_28_x86_64",
    "--python-version=3.11",
    "--implementation=cp",
    "--abi=cp311",
]


def _find_wheel() -> Path | None:
    wheels = sorted(CACHE.glob("buildstream-2.8.1-*.whl"))
    return wheels[0] if wheels else None


def fetch() -> Path:
    if SENTINEL.is_file():
        return DEST
    CACHE.mkdir(parents=True, exist_ok=True)

    wheel = _find_wheel()
    if wheel is None:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            *PIP_PLATFORM_ARGS,
            REQUIREMENT,
            "-d",
            str(CACHE),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = _find_wheel()
        if proc.returncode != 0 or wheel is None:
            raise SystemExit(
                f"could not download {REQUIREMENT} with: {' '.join(cmd)}\n"
                f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )

    with tempfile.TemporaryDirectory(prefix="protos-", dir=CACHE) as tmp:
        staging = Path(tmp) / "protos"
        count = 0
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                name = info.filename
                if info.is_dir() or not name.startswith(WHEEL_PREFIX):
                    continue
                rel = Path(name[len(WHEEL_PREFIX) :])
                if rel.is_absolute() or ".." in rel.parts:
                    continue
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(info))
                count += 1
        if not (staging / SENTINEL.relative_to(DEST)).is_file():
            raise SystemExit(f"{wheel.name} has no {WHEEL_PREFIX}{SENTINEL.relative_to(DEST)}")
        if DEST.exists():
            shutil.rmtree(DEST)
        staging.rename(DEST)
    print(f"extracted {count} files from {wheel.name} into {DEST.relative_to(ROOT)}")
    return DEST


def main() -> int:
    fetch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
