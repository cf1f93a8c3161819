"""Collecting an action's outputs into an ActionResult.

Runs in a worker thread: walks the declared outputs, hashes files, moves them (rename, never
copy) into the local cache, and builds Tree messages for output directories. Returns the
ActionResult and the blobs the CAS must receive. Declared outputs that do not exist are simply
left out (REAPI).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from reexec import fastpb
from reexec.cas.digest import Digest, DigestFunction, digest_of, new_hasher
from reexec.sandbox.local_cas import Entry, LocalCas
from reexec.sandbox.materialize import check_relative

_CHUNK = 1 << 20


@dataclass
class CollectedOutputs:
    result: fastpb.Message  # ActionResult with outputs filled in
    uploads: dict[Digest, Path | bytes] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)  # adopted into the local cache
    bytes_total: int = 0


def hash_file(path: str | os.PathLike[str], function: DigestFunction) -> Digest:
    h = new_hasher(function)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return Digest(h.hexdigest(), size, function)


class _Collector:
    def __init__(self, cache: LocalCas, function: DigestFunction, out: CollectedOutputs) -> None:
        self.cache = cache
        self.function = function
        self.out = out

    def file(self, path: Path) -> tuple[Digest, bool]:
        """Hash a regular file, move it into the cache, and note it for upload."""
        st = os.lstat(path)
        executable = bool(st.st_mode & stat.S_IXUSR)
        digest = hash_file(path, self.function)
        entry = Entry(digest, executable)
        cached = self.cache.adopt_sync(path, entry)
        self.out.entries.append(entry)
        self.out.uploads.setdefault(digest, cached)
        self.out.bytes_total += digest.size
        return digest, executable

    def blob(self, data: bytes) -> Digest:
        digest = digest_of(data, self.function)
        self.out.uploads.setdefault(digest, data)
        return digest

    def directory(self, path: Path, children: dict[Digest, bytes]) -> tuple[bytes, fastpb.Message]:
        """The Directory message for `path` (sorted entries); children collected into `children`."""
        d = fastpb.Directory()
        with os.scandir(path) as it:
            items = sorted(it, key=lambda e: e.name)
        for item in items:
            full = Path(item.path)
            if item.is_symlink():
                d.symlinks.add(name=item.name, target=os.readlink(full))
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
    exec_root: Path, command: fastpb.Message, function: DigestFunction, cache: LocalCas
) -> CollectedOutputs:
    result = fastpb.ActionResult()
    out = CollectedOutputs(result)
    c = _Collector(cache, function, out)
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
            target = os.readlink(full)
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


def log_blob_sync(
    path: Path, function: DigestFunction, cache: LocalCas, out: CollectedOutputs
) -> Digest:
    """stdout/stderr: hashed and adopted into the cache like any output file."""
    return _Collector(cache, function, out).file(path)[0]
