"""The expanded size of a Directory tree, computed from its DAG before anything is expanded.

A Directory names its subdirectories by digest, so an input tree is a DAG: a subtree that many
parents name is stored once but appears (and must be created) at every place it is named.
Forty directories, each naming the previous one twice, expand to 2^40 entries. The functions
here give the expanded size of every subtree from the DAG alone, computing each distinct
directory once (memoised by its key), so a caller can refuse a tree that is too large or too
deep before walking it.

Pure: parsed `Directory` messages in, numbers out. No I/O, no Trio; safe to run in a worker
thread (`trio.to_thread`) on data no other thread mutates. Keys are whatever identifies a
directory to the caller (usually a `Digest`), produced from a DirectoryNode by `child_key`.

    sizes = subtree_sizes(root, directories, child_key)  # raises TreeTooLarge early
    sizes[root].entries  # files + symlinks + directories of the expanded tree

`SizeCache` keeps sizes across requests, so a tree seen before costs one lookup and a tree that
shares most subtrees with earlier ones costs only its new directories.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from reexec.errors import InvalidArgument

# The most entries (files, symlinks, directories) an input tree may expand to.
MAX_TREE_ENTRIES = 2_000_000
# The most levels of subdirectories below an input root.
MAX_TREE_DEPTH = 256

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class TreeSize:
    """What the tree under one directory expands to (the directory itself not counted).

    `entries` counts files, symlinks and subdirectories at every place they appear; `file_bytes`
    sums the declared sizes of those files likewise; `depth` is the number of subdirectory
    levels below (0: no subdirectories).
    """

    entries: int
    file_bytes: int
    depth: int


class TreeTooLarge(InvalidArgument):
    """The tree expands to more entries, or more levels, than allowed."""


def directory_size(directory: Any, children: Sequence[TreeSize]) -> TreeSize:
    """The size of `directory` from the sizes of its subdirectories (one per entry of
    `directory.directories`, in order; a subtree named twice is listed twice)."""
    return TreeSize(
        entries=len(directory.files)
        + len(directory.symlinks)
        + len(directory.directories)
        + sum(c.entries for c in children),
        file_bytes=sum(max(f.digest.size_bytes, 0) for f in directory.files)
        + sum(c.file_bytes for c in children),
        depth=1 + max(c.depth for c in children) if children else 0,
    )


def subtree_sizes(
    root: K,
    directories: Mapping[K, Any],
    child_key: Callable[[Any], K],
    *,
    known: Mapping[K, TreeSize] | None = None,
    max_entries: int | None = MAX_TREE_ENTRIES,
    max_depth: int | None = MAX_TREE_DEPTH,
) -> dict[K, TreeSize]:
    """Sizes of `root` and of every directory below it that `known` does not already give.

    `directories` maps keys to parsed Directory messages and must hold every directory reachable
    from `root` except those in `known` (a KeyError names a missing one). Each distinct key is
    visited once, so the cost is linear in the DAG, never in the expanded tree. Raises
    TreeTooLarge as soon as any subtree (hence the root) exceeds `max_entries` or `max_depth`,
    and InvalidArgument for a cycle (impossible with content-addressed keys, but a caller's
    mapping is not trusted). Iterative: no recursion limit on deep trees.
    """
    known = known if known is not None else {}
    sizes: dict[K, TreeSize] = {}
    on_path: set[K] = set()
    # (key, None) means "visit"; (key, child keys) means "its children are done: combine".
    stack: list[tuple[K, list[K] | None]] = [(root, None)]
    while stack:
        key, child_keys = stack.pop()
        if child_keys is None:
            if key in sizes or key in known:
                continue
            if key in on_path:
                raise InvalidArgument(f"the directory tree contains a cycle through {key}")
            directory = directories[key]
            child_keys = [child_key(node) for node in directory.directories]
            on_path.add(key)
            stack.append((key, child_keys))
            for ck in child_keys:
                if ck not in sizes and ck not in known:
                    stack.append((ck, None))
            continue
        on_path.discard(key)
        children = [sizes[ck] if ck in sizes else known[ck] for ck in child_keys]
        size = directory_size(directories[key], children)
        if max_entries is not None and size.entries > max_entries:
            raise TreeTooLarge(f"the tree expands to more than {max_entries:,} entries")
        if max_depth is not None and size.depth > max_depth:
            raise TreeTooLarge(f"the tree is deeper than {max_depth} levels")
        sizes[key] = size
    return sizes


class SizeCache:
    """Sizes by directory key, least recently used evicted. Content-addressed keys never change
    meaning, so an entry is valid for as long as it is kept. Not thread-safe: use it from one
    thread (the Trio thread) and hand `subtree_sizes` a plain dict of what it needs.

    An entry (a Digest key and its TreeSize) costs about 400 bytes: 100,000 entries ~40 MB."""

    def __init__(self, max_items: int = 100_000) -> None:
        self._sizes: OrderedDict[Hashable, TreeSize] = OrderedDict()
        self.max_items = max_items

    def __len__(self) -> int:
        return len(self._sizes)

    def get(self, key: Hashable) -> TreeSize | None:
        size = self._sizes.get(key)
        if size is not None:
            self._sizes.move_to_end(key)
        return size

    def update(self, sizes: Iterable[tuple[Hashable, TreeSize]]) -> None:
        for key, size in sizes:
            self._sizes[key] = size
            self._sizes.move_to_end(key)
        while len(self._sizes) > self.max_items:
            self._sizes.popitem(last=False)
