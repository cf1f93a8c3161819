"""Shared helpers for the worker-side tests: a fake CasAccess and Directory builders."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import trio

from reexec import fastpb
from reexec.cas.digest import Digest, DigestFunction, digest_of, is_empty
from reexec.cas.store import BlobNotFound
from reexec.sandbox.cas_access import CasAccess


class FakeAccess(CasAccess):
    """An in-memory CAS that counts every call; optionally slow (trio.sleep per fetch)."""

    def __init__(self, delay: float = 0.0, prefers_batches: bool = False) -> None:
        self.blobs: dict[Digest, bytes] = {}
        self.delay = delay
        self.prefers_batches = prefers_batches
        self.find_missing_calls: list[list[Digest]] = []
        self.read_small_calls: list[list[Digest]] = []
        self.fetches: Counter[Digest] = Counter()
        self.uploaded: dict[Digest, bytes] = {}

    def put(self, data: bytes, function: DigestFunction = DigestFunction.SHA256) -> Digest:
        d = digest_of(data, function)
        self.blobs[d] = data
        return d

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        self.find_missing_calls.append(list(digests))
        return [d for d in dict.fromkeys(digests) if d not in self.blobs and not is_empty(d)]

    async def read_small(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        self.read_small_calls.append(list(digests))
        if self.delay:
            await trio.sleep(self.delay)
        out = {}
        for d in digests:
            if is_empty(d):
                out[d] = b""
            elif d not in self.blobs:
                raise BlobNotFound(d)
            else:
                out[d] = self.blobs[d]
        return out

    async def fetch_to(self, digest: Digest, path: Path) -> None:
        self.fetches[digest] += 1
        if self.delay:
            await trio.sleep(self.delay)
        if not is_empty(digest) and digest not in self.blobs:
            raise BlobNotFound(digest)
        _create(path, self.blobs.get(digest, b""))

    async def upload(self, blobs: dict[Digest, Path | bytes]) -> None:
        for d, src in blobs.items():
            self.uploaded[d] = src if isinstance(src, bytes) else _read(src)


def _create(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def _read(path: Path) -> bytes:
    return path.read_bytes()


def append(path: Path, data: bytes) -> None:
    """Append to a file (as root, whatever its mode)."""
    with open(path, "ab") as f:
        f.write(data)


def overwrite(path: Path, data: bytes) -> None:
    """Overwrite the start of a file in place (same inode)."""
    with open(path, "r+b") as f:
        f.write(data)


def file_node(parent: fastpb.Message, name: str, digest: Digest, executable: bool = False) -> None:
    node = parent.files.add(name=name, is_executable=executable)
    node.digest.hash, node.digest.size_bytes = digest.hash, digest.size


def dir_node(parent: fastpb.Message, name: str, digest: Digest) -> None:
    node = parent.directories.add(name=name)
    node.digest.hash, node.digest.size_bytes = digest.hash, digest.size


def make_dir(
    files: Sequence[tuple[str, Digest] | tuple[str, Digest, bool]] = (),
    dirs: Sequence[tuple[str, Digest]] = (),
    symlinks: Sequence[tuple[str, str]] = (),
) -> tuple[Digest, bytes, fastpb.Message]:
    """A Directory message (entries in the order given, no validation) and its digest."""
    d = fastpb.Directory()
    for f in files:
        file_node(d, f[0], f[1], bool(f[2]) if len(f) > 2 else False)  # type: ignore[misc]
    for name, digest in dirs:
        dir_node(d, name, digest)
    for name, target in symlinks:
        d.symlinks.add(name=name, target=target)
    raw = d.SerializeToString(deterministic=True)
    return digest_of(raw), raw, d


def inode(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino
