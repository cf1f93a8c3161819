"""Builds an action's input root on disk: directories, then a hardlink per file from the
worker cache, then symlinks. File-system work only, in one worker thread; it reads cache paths
and never changes the cache's index (the caller leases the entries for the action)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reexec.sandbox.cache_index import Entry
from reexec.sandbox.materialize import InputTree


@dataclass
class BuildStats:
    links: int = 0
    copies: int = 0


def build_input_root_sync(
    tree: InputTree, dest: Path, cache_path: Callable[[Entry], str]
) -> BuildStats:
    """Create the tree under `dest` (which must exist and be empty) from the cache files that
    `cache_path` names."""
    stats = BuildStats()
    base = str(dest) + "/"
    mkdir = os.mkdir
    link = os.link
    for d in tree.dirs:
        mkdir(base + d)
    for rel, entry in tree.files:
        src = cache_path(entry)
        try:
            link(src, base + rel)
            stats.links += 1
        except OSError as e:
            if e.errno not in (errno.EMLINK, errno.EXDEV, errno.EPERM):
                raise
            # Too many links on the cache inode, or another file system: copy this one.
            shutil.copyfile(src, base + rel)
            os.chmod(base + rel, entry.mode)
            stats.copies += 1
    for rel, target in tree.symlinks:
        os.symlink(target, base + rel)
    return stats
