"""Input trees: fetch and parse Directory messages, validate them, and build the input root.

`load_directories` fetches a tree's Directory messages (parsed ones are cached by digest, so a
repeated subtree is never fetched or parsed twice). `plan_tree` validates them into an
`InputTree` (pure; plans are cached by root digest). `plan_input_tree` bounds the expanded size
first, from the DAG alone (memoised subtree sizes, `reexec.cas.tree_size`), so a small Directory
DAG that names one subtree many times (41 blobs can expand to 2^40 entries) is refused before
anything is expanded; sizing and planning of large trees run in a worker thread, never on the
Trio thread. `reexec/sandbox/input_root.py` then builds the input root on disk from the cache.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import trio
from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.digest import Digest, make_digest
from reexec.cas.tree_size import MAX_TREE_DEPTH, MAX_TREE_ENTRIES, subtree_sizes
from reexec.errors import InvalidArgument
from reexec.sandbox.cache_index import Entry
from reexec.sandbox.cas_access import CasAccess
from reexec.sandbox.input_fetcher import MissingInputs

# Above these, sizing a DAG / planning a tree moves to a worker thread (a few ms of work).
SIZE_INLINE_DIRECTORIES = 1_000
PLAN_INLINE_ENTRIES = 5_000


class InvalidInputTree(InvalidArgument):
    pass


@dataclass
class InputTree:
    """A validated input root: what to create, parents before children."""

    dirs: list[str] = field(default_factory=list)
    files: list[tuple[str, Entry]] = field(default_factory=list)
    symlinks: list[tuple[str, str]] = field(default_factory=list)

    def entries(self) -> list[Entry]:
        return list(dict.fromkeys(e for _, e in self.files))


class DirectoryCache:
    """Parsed Directory messages and validated plans, least recently used evicted."""

    def __init__(self, max_directories: int = 100_000, max_plans: int = 64) -> None:
        self._dirs: OrderedDict[Digest, fastpb.Message] = OrderedDict()
        self._plans: OrderedDict[tuple[Digest, bool], InputTree] = OrderedDict()
        self.max_directories = max_directories
        self.max_plans = max_plans
        self.hits = 0
        self.misses = 0

    def get(self, digest: Digest) -> fastpb.Message | None:
        d = self._dirs.get(digest)
        if d is not None:
            self._dirs.move_to_end(digest)
            self.hits += 1
        return d

    def put(self, digest: Digest, directory: fastpb.Message) -> None:
        self.misses += 1
        self._dirs[digest] = directory
        while len(self._dirs) > self.max_directories:
            self._dirs.popitem(last=False)

    def plan(self, key: tuple[Digest, bool]) -> InputTree | None:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put_plan(self, key: tuple[Digest, bool], plan: InputTree) -> None:
        self._plans[key] = plan
        while len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)


def _child_digest(node: fastpb.Message, parent: Digest) -> Digest:
    try:
        return make_digest(node.digest.hash, node.digest.size_bytes, int(parent.function))
    except InvalidArgument as e:
        raise InvalidInputTree(
            f"{node.name!r} in directory {parent.blob_path}: {e.message}"
        ) from None


async def load_directories(
    root: Digest, access: CasAccess, cache: DirectoryCache
) -> dict[Digest, fastpb.Message]:
    """Every Directory of the tree under `root`, fetched level by level in batches."""
    out: dict[Digest, fastpb.Message] = {}
    level = [root]
    while level:
        # Kept here too: the cache may evict part of a level larger than itself.
        found: dict[Digest, fastpb.Message] = {}
        need = []
        for d in dict.fromkeys(level):
            if d in out:
                continue
            directory = cache.get(d)
            if directory is None:
                need.append(d)
            else:
                found[d] = directory
        if need:
            absent = set(await access.find_missing(need))
            if absent:
                raise MissingInputs(sorted(absent))
            raw = await access.read_small(need)
            for d, data in raw.items():
                try:
                    found[d] = fastpb.Directory.FromString(data)
                except DecodeError:
                    raise InvalidInputTree(
                        f"{d.blob_path} is not a valid Directory message"
                    ) from None
                cache.put(d, found[d])
        next_level: list[Digest] = []
        for d in level:
            if d in out:
                continue
            directory = found[d]
            out[d] = directory
            next_level.extend(_child_digest(c, d) for c in directory.directories)
        level = next_level
    return out


async def plan_input_tree(
    root: Digest, directories: dict[Digest, fastpb.Message], allow_absolute_symlinks: bool = False
) -> InputTree:
    """`plan_tree`, once the tree's expanded size is known to be within the limits.

    Raises TreeTooLarge (INVALID_ARGUMENT) for a tree over MAX_TREE_ENTRIES entries or
    MAX_TREE_DEPTH levels, at a cost linear in the distinct directories; the expansion itself
    runs only for trees within the limits, in a worker thread when large. The messages are not
    mutated by anyone meanwhile (parsed, then only read), so the threads may read them.
    """
    fn = int(root.function)

    def sizes() -> int:
        return subtree_sizes(
            root,
            directories,
            lambda node: make_digest(node.digest.hash, node.digest.size_bytes, fn),
            max_entries=MAX_TREE_ENTRIES,
            max_depth=MAX_TREE_DEPTH,
        )[root].entries

    if len(directories) > SIZE_INLINE_DIRECTORIES:
        entries = await trio.to_thread.run_sync(sizes)
    else:
        entries = sizes()
    if entries > PLAN_INLINE_ENTRIES:
        return await trio.to_thread.run_sync(plan_tree, root, directories, allow_absolute_symlinks)
    return plan_tree(root, directories, allow_absolute_symlinks)


def _check_name(name: str, where: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidInputTree(f"invalid name {name!r} in {where}")


def plan_tree(
    root: Digest, directories: dict[Digest, fastpb.Message], allow_absolute_symlinks: bool = False
) -> InputTree:
    """Validate the tree and list what to create. Raises InvalidInputTree."""
    tree = InputTree()
    stack: list[tuple[str, Digest, int]] = [("", root, 0)]
    entries = 0
    while stack:
        prefix, digest, depth = stack.pop()
        if depth > 256:
            raise InvalidInputTree(f"input tree is deeper than 256 levels at {prefix!r}")
        directory = directories[digest]
        # Shared subtrees expand at every place they appear: plan_input_tree refuses trees over
        # the limit before expanding; this stays as the bound for direct callers.
        entries += len(directory.files) + len(directory.directories) + len(directory.symlinks)
        if entries > MAX_TREE_ENTRIES:
            raise InvalidInputTree(f"the input tree has more than {MAX_TREE_ENTRIES:,} entries")
        where = f"directory {prefix or '(input root)'!r}"
        seen: set[str] = set()
        for kind in (directory.files, directory.directories, directory.symlinks):
            for node in kind:
                _check_name(node.name, where)
                if node.name in seen:
                    raise InvalidInputTree(f"{node.name!r} appears twice in {where}")
                seen.add(node.name)
        for f in directory.files:
            entry = Entry(_child_digest(f, digest), f.is_executable)
            tree.files.append((prefix + f.name, entry))
        for s in directory.symlinks:
            target = s.target
            if not target:
                raise InvalidInputTree(f"symlink {prefix + s.name!r} has an empty target")
            if target.startswith("/"):
                if not allow_absolute_symlinks:
                    raise InvalidInputTree(
                        f"symlink {prefix + s.name!r} has the absolute target {target!r}, "
                        "which this server does not allow"
                    )
            else:
                resolved = posixpath.normpath(posixpath.join(prefix, target))
                if resolved == ".." or resolved.startswith("../"):
                    raise InvalidInputTree(
                        f"symlink {prefix + s.name!r} -> {target!r} points outside the input root"
                    )
            tree.symlinks.append((prefix + s.name, target))
        for d in reversed(directory.directories):
            path = prefix + d.name
            tree.dirs.append(path)
            stack.append((path + "/", _child_digest(d, digest), depth + 1))
    tree.dirs.sort(key=lambda p: p.count("/"))
    return tree


def output_paths(command: fastpb.Message) -> list[str]:
    """Every declared output path, relative to the input root."""
    paths = list(command.output_paths) or [*command.output_files, *command.output_directories]
    return [
        posixpath.join(command.working_directory, p) if command.working_directory else p
        for p in paths
    ]


def check_relative(path: str, what: str) -> str:
    norm = posixpath.normpath(path)
    if path.startswith("/") or norm == ".." or norm.startswith("../"):
        raise InvalidArgument(f"{what} {path!r} is not a relative path inside the input root")
    return norm


def prepare_outputs_sync(exec_root: Path, command: fastpb.Message) -> None:
    """Create the parent directories of every declared output (genrules rely on it)."""
    if command.working_directory:
        wd = check_relative(command.working_directory, "working_directory")
        _make_dirs(exec_root, wd, "working_directory", command.working_directory)
    for p in output_paths(command):
        rel = check_relative(p, "output path")
        parent = posixpath.dirname(rel)
        if parent:
            _make_dirs(exec_root, parent, "output path", p)


def _make_dirs(exec_root: Path, rel: str, what: str, declared: str) -> None:
    """mkdir -p of `rel` under `exec_root`, never through a symlink of the input tree (which
    could point anywhere: the worker must not create directories outside the input root)."""
    path = str(exec_root)
    for part in rel.split("/"):
        if part == ".":
            continue
        path += "/" + part
        try:
            os.mkdir(path)
            continue
        except FileExistsError:
            pass
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            continue
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a directory"
        shown = posixpath.relpath(path, str(exec_root))
        raise InvalidArgument(f"{what} {declared!r}: {shown!r} in the input root is {kind}")
