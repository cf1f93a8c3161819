"""Collecting an action's outputs into an ActionResult.

Runs in a worker thread: walks the declared outputs, hashes files, moves them (rename, never
copy) into the local cache, and builds Tree messages for output directories. Returns the
ActionResult and the blobs the CAS must receive. Declared outputs that do not exist are simply
left out (REAPI).

Limits are checked from each file's size before it is hashed, so a huge (even sparse) output
fails the action at once with a precise, final error (`OutputTooLarge`) instead of being read,
and one action can never push a blob into the CAS that it would refuse or that would empty it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from reexec import fastpb
from reexec.cas.digest import Digest, DigestFunction, digest_of, new_hasher
from reexec.errors import InvalidArgument, ResourceExhausted
from reexec.sandbox.cache_index import Entry, Installed
from reexec.sandbox.materialize import check_relative
from reexec.sandbox.output_adopter import OutputAdopter

_CHUNK = 1 << 20


class OutputTooLarge(ResourceExhausted):
    """An output (or all of them) is over a configured limit: the action fails, finally."""


@dataclass(frozen=True)
class OutputLimits:
    max_total_bytes: int = 0
    """Output files, stdout and stderr together (worker.max_output_bytes); 0: no limit."""
    max_stdio_bytes: int = 0
    """stdout and stderr each (worker.max_stdio_bytes); 0: no limit."""
    max_blob_bytes: int | None = None
    """The largest blob the CAS accepts (Store.max_blob_bytes), if known."""


@dataclass
class CollectedOutputs:
    result: fastpb.Message  # ActionResult with outputs filled in
    uploads: dict[Digest, Path | bytes] = field(default_factory=dict)
    adopted: list[Installed] = field(default_factory=list)  # to record in the cache index
    bytes_total: int = 0

    @property
    def entries(self) -> list[Entry]:
        return [a.entry for a in self.adopted]


def hash_file(path: str | os.PathLike[str], function: DigestFunction) -> Digest:
    h = new_hasher(function)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return Digest(h.hexdigest(), size, function)


class _Collector:
    def __init__(
        self,
        adopter: OutputAdopter,
        function: DigestFunction,
        out: CollectedOutputs,
        limits: OutputLimits,
        root: Path,
    ) -> None:
        self.adopter = adopter
        self.function = function
        self.out = out
        self.limits = limits
        self.root = root

    def _check_size(self, size: int, what: str) -> None:
        limits = self.limits
        if limits.max_blob_bytes is not None and size > limits.max_blob_bytes:
            raise OutputTooLarge(
                f"{what} is {size} bytes, larger than the {limits.max_blob_bytes} bytes the CAS "
                "accepts for one blob"
            )
        total = self.out.bytes_total + size
        if limits.max_total_bytes and total > limits.max_total_bytes:
            raise OutputTooLarge(
                f"the action's outputs exceed the worker's limit of {limits.max_total_bytes} "
                f"bytes (worker.max_output_bytes) at {what} ({size} bytes)"
            )

    def file(self, path: Path, what: str | None = None) -> tuple[Digest, bool]:
        """Hash a regular file, move it into the cache, and note it for upload."""
        what = what or f"output file {os.path.relpath(path, self.root)!r}"
        st = os.lstat(path)
        executable = bool(st.st_mode & stat.S_IXUSR)
        self._check_size(st.st_size, what)  # before reading a byte of it
        digest = hash_file(path, self.function)
        self._check_size(digest.size, what)  # it may have grown meanwhile
        adopted = self.adopter.adopt_sync(path, Entry(digest, executable))
        self.out.adopted.append(adopted)
        self.out.uploads.setdefault(digest, self.adopter.index.path(adopted.entry))
        self.out.bytes_total += digest.size
        return digest, executable

    def blob(self, data: bytes) -> Digest:
        digest = digest_of(data, self.function)
        if self.limits.max_blob_bytes is not None and digest.size > self.limits.max_blob_bytes:
            raise OutputTooLarge(
                f"a Directory or Tree message of the outputs is {digest.size} bytes, larger "
                f"than the {self.limits.max_blob_bytes} bytes the CAS accepts for one blob"
            )
        self.out.uploads.setdefault(digest, data)
        return digest

    def _utf8(self, name: str, path: str) -> str:
        """REAPI names and symlink targets are UTF-8; a file system name need not be."""
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(
                f"output directory {os.path.relpath(path, self.root)!r} holds "
                f"{os.fsencode(name)!r}, a file name or symlink target that is not valid UTF-8"
            ) from None
        return name

    def directory(self, path: Path, children: dict[Digest, bytes]) -> tuple[bytes, fastpb.Message]:
        """The Directory message for `path` (sorted entries); children collected into `children`."""
        d = fastpb.Directory()
        with os.scandir(path) as it:
            items = sorted(it, key=lambda e: e.name)
        for item in items:
            full = Path(item.path)
            self._utf8(item.name, str(path))
            if item.is_symlink():
                target = self._utf8(os.readlink(full), str(path))
                d.symlinks.add(name=item.name, target=target)
            elif item.is_dir(follow_symlinks=False):
                raw, _ = self.directory(full, children)
                digest = self.blob(raw)
                children[digest] = raw
                node = d.directories.add(name=item.name)
                node.digest.hash, node.digest.size_bytes = digest.hash, digest.size
            elif item.is_file(follow_symlinks=False):
                digest, executable = self.file(full)
                node = d.files.add(name=item.name, is_executable=executable)
                node.digest.hash, node.digest.size_bytes = digest.hash, digest.size
            # Sockets, FIFOs and devices cannot be represented in a Directory: skipped.
        return d.SerializeToString(deterministic=True), d


def collect_outputs_sync(
    exec_root: Path,
    command: fastpb.Message,
    function: DigestFunction,
    adopter: OutputAdopter,
    limits: OutputLimits | None = None,
) -> CollectedOutputs:
    result = fastpb.ActionResult()
    out = CollectedOutputs(result)
    c = _Collector(adopter, function, out, limits or OutputLimits(), exec_root)
    wd = command.working_directory
    v21 = len(command.output_paths) > 0
    declared: list[tuple[str, str]] = (
        [(p, "path") for p in command.output_paths]
        if v21
        else [(p, "file") for p in command.output_files]
        + [(p, "dir") for p in command.output_directories]
    )
    for rel, kind in declared:
        full_rel = check_relative(f"{wd}/{rel}" if wd else rel, "output path")
        if not _parents_are_directories(exec_root, full_rel):
            # Through a symlink (the action may point it anywhere) or a file: not an output.
            # Following it would move or upload files from outside the input root.
            continue
        full = exec_root / full_rel
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            target = c._utf8(os.readlink(full), str(full.parent))
            result.output_symlinks.add(path=rel, target=target)
            if not v21:
                # Clients of v2.0 read the older fields, chosen by the declared kind.
                legacy = (
                    result.output_directory_symlinks
                    if kind == "dir"
                    else result.output_file_symlinks
                )
                legacy.add(path=rel, target=target)
        elif stat.S_ISDIR(st.st_mode):
            if kind == "file":
                continue  # declared as a file but a directory was produced: not an output
            children: dict[Digest, bytes] = {}
            root_raw, root = c.directory(full, children)
            tree = fastpb.Tree()
            tree.root.CopyFrom(root)
            for raw in children.values():
                tree.children.add().MergeFromString(raw)
            tree_digest = c.blob(tree.SerializeToString(deterministic=True))
            root_digest = c.blob(root_raw)
            od = result.output_directories.add(path=rel)
            od.tree_digest.hash, od.tree_digest.size_bytes = tree_digest.hash, tree_digest.size
            od.root_directory_digest.hash = root_digest.hash
            od.root_directory_digest.size_bytes = root_digest.size
            # Directory blobs too, so root_directory_digest is resolvable in the CAS.
            for digest, raw in children.items():
                out.uploads.setdefault(digest, raw)
        elif stat.S_ISREG(st.st_mode):
            if kind == "dir":
                continue
            digest, executable = c.file(full)
            f = result.output_files.add(path=rel, is_executable=executable)
            f.digest.hash, f.digest.size_bytes = digest.hash, digest.size
    return out


def _parents_are_directories(exec_root: Path, rel: str) -> bool:
    path = str(exec_root)
    for part in rel.split("/")[:-1]:
        if part == ".":
            continue
        path += "/" + part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        except (FileNotFoundError, NotADirectoryError):
            return False
    return True


def check_stdio_size(path: Path, limits: OutputLimits) -> None:
    size = os.lstat(path).st_size
    if limits.max_stdio_bytes and size > limits.max_stdio_bytes:
        raise OutputTooLarge(
            f"the action's {path.name} is {size} bytes, over the worker's limit of "
            f"{limits.max_stdio_bytes} bytes (worker.max_stdio_bytes)"
        )


def log_blob_sync(
    path: Path,
    function: DigestFunction,
    adopter: OutputAdopter,
    out: CollectedOutputs,
    limits: OutputLimits | None = None,
) -> Digest:
    """stdout/stderr: hashed and adopted into the cache like any output file, within
    `limits.max_stdio_bytes` and the total."""
    limits = limits or OutputLimits()
    check_stdio_size(path, limits)
    return _Collector(adopter, function, out, limits, path.parent).file(
        path, f"the action's {path.name}"
    )[0]
