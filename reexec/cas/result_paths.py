"""Path checks for ActionResults that clients write into the action cache.

Every client that gets a cache hit creates the result's outputs on its own disk, so a result
naming `../../etc/passwd` would make it write outside its output tree. A result written by a
client is therefore held to the rules our worker keeps for the results it produces and for the
input trees it creates (`reexec/sandbox/materialize.py`, `outputs.py`):

- an output path is relative, free of NUL, and stays inside the working directory once
  normalised (`a/../b` is fine, `../b` and `/b` are not); only an output directory may be ""
  (REAPI: the whole working directory);
- a symlink target is non-empty and free of NUL; an absolute target is refused unless the server
  allows absolute symlinks (it advertises that in Capabilities); a relative target must resolve
  inside the working directory from the symlink's own directory;
- names inside an output directory's Tree are single path components (not "", ".", "..", no "/"
  or NUL), unique within their directory.

The working directory itself is not known here (it is in the Command, which the cache does not
need), so paths are checked against it as if it were the input root: stricter than the worker for
an action whose outputs reach above a working directory below the root, which Bazel never does.
Pure: raises InvalidArgument naming the offending field.
"""

from __future__ import annotations

import posixpath
from typing import Any

from reexec.errors import InvalidArgument


def _escapes(norm: str) -> bool:
    return norm == ".." or norm.startswith("../")


def check_output_path(path: str, field: str, *, allow_empty: bool = False) -> None:
    """`path` (the value of `field`) is a relative path that stays inside the working dir."""
    if not path:
        if allow_empty:
            return
        raise InvalidArgument(f"{field} is empty")
    if "\0" in path:
        raise InvalidArgument(f"{field} {path!r} contains a NUL character")
    if path.startswith("/") or _escapes(posixpath.normpath(path)):
        raise InvalidArgument(
            f"{field} {path!r} is not a relative path inside the working directory"
        )


def check_symlink_target(
    path: str, target: str, field: str, *, allow_absolute: bool = False
) -> None:
    """`target` of a symlink at `path` (relative to the working directory) is safe to create."""
    if not target:
        raise InvalidArgument(f"{field} of {path!r} is empty")
    if "\0" in target:
        raise InvalidArgument(f"{field} of {path!r} contains a NUL character")
    if target.startswith("/"):
        if not allow_absolute:
            raise InvalidArgument(
                f"{field} of {path!r} is the absolute path {target!r}, which this server does "
                "not allow (symlink_absolute_path_strategy DISALLOWED)"
            )
        return
    if _escapes(posixpath.normpath(posixpath.join(posixpath.dirname(path), target))):
        raise InvalidArgument(
            f"{field} of {path!r} is {target!r}, which points outside the working directory"
        )


def check_name(name: str, where: str) -> None:
    """A single path component, as every entry of a Directory must be."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidArgument(f"invalid name {name!r} in {where}")


def check_action_result(result: Any, *, allow_absolute_symlinks: bool = False) -> None:
    """Every path and symlink target named directly by an ActionResult (not inside its Trees)."""
    for i, f in enumerate(result.output_files):
        check_output_path(f.path, f"action_result.output_files[{i}].path")
    for i, d in enumerate(result.output_directories):
        check_output_path(d.path, f"action_result.output_directories[{i}].path", allow_empty=True)
    for kind in ("output_symlinks", "output_file_symlinks", "output_directory_symlinks"):
        for i, s in enumerate(getattr(result, kind)):
            field = f"action_result.{kind}[{i}]"
            check_output_path(s.path, f"{field}.path")
            check_symlink_target(
                s.path, s.target, f"{field}.target", allow_absolute=allow_absolute_symlinks
            )


def check_tree(tree: Any, path: str, field: str, *, allow_absolute_symlinks: bool = False) -> None:
    """The names and symlink targets of an output directory's Tree, rooted at `path`.

    Relative symlink targets are resolved for the Tree's root directory only: a child's place
    in the tree is known only through the digests of its parents' DirectoryNodes.
    """
    for j, directory in enumerate([tree.root, *tree.children]):
        where = f"{field} (directory {j} of the Tree of {path or '.'!r})"
        seen: set[str] = set()
        for kind in (directory.files, directory.directories, directory.symlinks):
            for node in kind:
                check_name(node.name, where)
                if node.name in seen:
                    raise InvalidArgument(f"{node.name!r} appears twice in {where}")
                seen.add(node.name)
        for s in directory.symlinks:
            if j == 0:
                link = posixpath.join(path, s.name)
                check_symlink_target(
                    link,
                    s.target,
                    f"{field} symlink target",
                    allow_absolute=allow_absolute_symlinks,
                )
            elif (
                not s.target
                or "\0" in s.target
                or (s.target.startswith("/") and not allow_absolute_symlinks)
            ):
                raise InvalidArgument(f"{where}: symlink {s.name!r} has the target {s.target!r}")
