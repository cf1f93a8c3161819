"""Input trees: validation (plan_tree), the input root on disk (build_input_root_sync), Directory
loading with its cache, and the parents of declared outputs (prepare_outputs_sync)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from reexec import fastpb
from reexec.cas.digest import Digest, digest_of
from reexec.errors import InvalidArgument
from reexec.sandbox.input_root import build_input_root_sync
from reexec.sandbox.local_cas import Entry, LocalCas, MissingInputs
from reexec.sandbox.materialize import (
    DirectoryCache,
    InputTree,
    InvalidInputTree,
    load_directories,
    plan_tree,
    prepare_outputs_sync,
)
from tests.sandbox.fakes import FakeAccess, inode, make_dir

A = digest_of(b"a")
B = digest_of(b"bb")


def tree_of(*dirs: tuple[Digest, bytes, fastpb.Message]) -> dict[Digest, fastpb.Message]:
    return {d: msg for d, _, msg in dirs}


def plan(root: tuple[Digest, bytes, fastpb.Message], *others, allow_abs: bool = False):  # type: ignore[no-untyped-def]
    return plan_tree(root[0], tree_of(root, *others), allow_abs)


# -- plan_tree: names -------------------------------------------------------------------------

BAD_NAMES = ["", ".", "..", "a/b", "/", "nul\0byte"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_invalid_names_are_rejected_naming_name_and_directory(name: str, kind: str) -> None:
    empty = make_dir()
    if kind == "file":
        sub = make_dir(files=[(name, A)])
    elif kind == "dir":
        sub = make_dir(dirs=[(name, empty[0])])
    else:
        sub = make_dir(symlinks=[(name, "target")])
    root = make_dir(dirs=[("subdir", sub[0])])
    with pytest.raises(InvalidInputTree) as info:
        plan(root, sub, empty)
    assert repr(name) in info.value.message
    assert "subdir" in info.value.message


def test_invalid_name_at_the_root_names_the_input_root() -> None:
    root = make_dir(files=[("..", A)])
    with pytest.raises(InvalidInputTree) as info:
        plan(root)
    assert "'..'" in info.value.message and "input root" in info.value.message


@pytest.mark.parametrize(
    "layout",
    [
        {"files": [("x", A), ("x", B)]},
        {"files": [("x", A)], "dirs": [("x", None)]},
        {"files": [("x", A)], "symlinks": [("x", "t")]},
        {"dirs": [("x", None)], "symlinks": [("x", "t")]},
        {"dirs": [("x", None), ("x", None)]},
        {"symlinks": [("x", "t"), ("x", "u")]},
    ],
    ids=["file+file", "file+dir", "file+symlink", "dir+symlink", "dir+dir", "symlink+symlink"],
)
def test_duplicate_names_across_kinds_are_rejected(layout: dict) -> None:  # type: ignore[type-arg]
    empty = make_dir()
    dirs = [(n, empty[0]) for n, _ in layout.get("dirs", [])]
    sub = make_dir(files=layout.get("files", ()), dirs=dirs, symlinks=layout.get("symlinks", ()))
    root = make_dir(dirs=[("pkg", sub[0])])
    with pytest.raises(InvalidInputTree) as info:
        plan(root, sub, empty)
    assert "'x'" in info.value.message and "twice" in info.value.message
    assert "pkg" in info.value.message


def test_invalid_child_digest_names_the_node() -> None:
    d = fastpb.Directory()
    node = d.files.add(name="broken")
    node.digest.hash, node.digest.size_bytes = "XYZ", 3
    raw = d.SerializeToString()
    root = (digest_of(raw), raw, d)
    with pytest.raises(InvalidInputTree) as info:
        plan(root)
    assert "'broken'" in info.value.message


# -- plan_tree: symlinks ----------------------------------------------------------------------


def test_absolute_symlinks_rejected_unless_allowed() -> None:
    root = make_dir(symlinks=[("abs", "/etc/passwd")])
    with pytest.raises(InvalidInputTree) as info:
        plan(root)
    assert "'abs'" in info.value.message and "/etc/passwd" in info.value.message
    tree = plan(root, allow_abs=True)
    assert tree.symlinks == [("abs", "/etc/passwd")]


def test_empty_symlink_target_rejected() -> None:
    with pytest.raises(InvalidInputTree, match="empty target"):
        plan(make_dir(symlinks=[("s", "")]))


@pytest.mark.parametrize("target", ["../x", "..", "a/../../x", "./../x", "a/b/../../../x"])
def test_relative_symlink_escaping_the_root_is_rejected(target: str) -> None:
    with pytest.raises(InvalidInputTree, match="outside the input root"):
        plan(make_dir(symlinks=[("s", target)]))


@pytest.mark.parametrize("target", ["../../x", "../../../x", "../a/../../x"])
def test_nested_relative_symlink_escaping_the_root_is_rejected(target: str) -> None:
    sub = make_dir(symlinks=[("s", target)])
    root = make_dir(dirs=[("sub", sub[0])])
    with pytest.raises(InvalidInputTree) as info:
        plan(root, sub)
    assert "'sub/s'" in info.value.message


@pytest.mark.parametrize("target", ["../x", "..", "../sub/y", ".", "y", "z/../y", "../../root/x"])
def test_relative_symlinks_inside_the_root_are_accepted(target: str) -> None:
    # The symlink lives in a/sub/: "../../root/x" resolves to root/x, still inside.
    deep = make_dir(symlinks=[("s", target)])
    mid = make_dir(dirs=[("sub", deep[0])])
    root = make_dir(dirs=[("a", mid[0])])
    tree = plan(root, mid, deep)
    assert tree.symlinks == [("a/sub/s", target)]


# -- plan_tree: structure ---------------------------------------------------------------------


def test_shared_subtree_appears_at_every_path() -> None:
    leaf = make_dir(files=[("f", A), ("x", B, True)], symlinks=[("l", "f")])
    shared = make_dir(files=[("g", A)], dirs=[("leaf", leaf[0])])
    root = make_dir(files=[("top", B)], dirs=[("one", shared[0]), ("two", shared[0])])
    tree = plan(root, shared, leaf)
    assert sorted(tree.dirs) == ["one", "one/leaf", "two", "two/leaf"]
    assert sorted(p for p, _ in tree.files) == [
        "one/g",
        "one/leaf/f",
        "one/leaf/x",
        "top",
        "two/g",
        "two/leaf/f",
        "two/leaf/x",
    ]
    assert sorted(tree.symlinks) == [("one/leaf/l", "f"), ("two/leaf/l", "f")]
    files = dict(tree.files)
    assert files["one/leaf/x"] == Entry(B, True)
    assert files["two/leaf/f"] == Entry(A, False)
    # Every entry once, exec and non-exec of one blob separately.
    assert sorted(tree.entries()) == sorted({Entry(A, False), Entry(B, True), Entry(B, False)})
    # Parents before children.
    for i, d in enumerate(tree.dirs):
        parent = d.rpartition("/")[0]
        assert not parent or parent in tree.dirs[:i]


def chain(depth: int) -> tuple[Digest, dict[Digest, fastpb.Message]]:
    """A tree nested `depth` directories deep."""
    current = make_dir(files=[("bottom", A)])
    dirs = tree_of(current)
    for _ in range(depth):
        current = make_dir(dirs=[("d", current[0])])
        dirs.update(tree_of(current))
    return current[0], dirs


def test_depth_limit() -> None:
    root, dirs = chain(256)
    tree = plan_tree(root, dirs)
    assert len(tree.dirs) == 256
    root, dirs = chain(257)
    with pytest.raises(InvalidInputTree, match="deeper than 256"):
        plan_tree(root, dirs)


# -- build_input_root_sync ---------------------------------------------------------------------


async def cache_with(tmp_path: Path, tree: InputTree, access: FakeAccess) -> LocalCas:
    cache = LocalCas(tmp_path / "cache", 0, access)
    await cache.start()
    await cache.ensure(tree.entries())
    return cache


def sample_tree(access: FakeAccess) -> tuple[Digest, dict[Digest, fastpb.Message]]:
    a, b = access.put(b"alpha\n"), access.put(b"#!/bin/sh\necho hi\n")
    empty = access.put(b"")
    leaf = make_dir(files=[("data", a)], symlinks=[("up", "../script"), ("self", ".")])
    sub = make_dir(files=[("tool", b, True), ("data", a)], dirs=[("leaf", leaf[0])])
    root = make_dir(
        files=[("script", b, True), ("empty", empty), ("plain", b)],
        dirs=[("sub", sub[0]), ("other", leaf[0])],
        symlinks=[("abs", "/nonexistent/target"), ("link", "sub/tool")],
    )
    return root[0], tree_of(root, sub, leaf)


async def test_materialize_creates_dirs_files_and_symlinks_as_hardlinks(tmp_path: Path) -> None:
    access = FakeAccess()
    root, dirs = sample_tree(access)
    tree = plan_tree(root, dirs, allow_absolute_symlinks=True)
    cache = await cache_with(tmp_path, tree, access)
    dest = tmp_path / "out" / "root"
    dest.mkdir(parents=True)
    stats = build_input_root_sync(tree, dest, cache.path_str)

    assert stats.links == len(tree.files) and stats.copies == 0
    for rel in ("sub", "sub/leaf", "other"):
        assert stat.S_ISDIR(os.lstat(dest / rel).st_mode)
    for rel, entry in tree.files:
        path = dest / rel
        assert inode(path) == inode(cache.path(entry)), rel
        mode = os.lstat(path).st_mode & 0o7777
        assert mode == (0o555 if entry.executable else 0o444), rel
        assert path.read_bytes() == access.blobs.get(entry.digest, b"")
    assert (dest / "script").read_bytes() == (dest / "plain").read_bytes()
    assert inode(dest / "script") != inode(dest / "plain")  # exec and non-exec entries differ
    assert os.readlink(dest / "abs") == "/nonexistent/target"
    assert os.readlink(dest / "sub/leaf/up") == "../script"
    assert (dest / "link").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "other/up").resolve() == (dest / "script").resolve()
    # Nothing was written next to dest.
    assert sorted(os.listdir(dest.parent)) == ["root"]


async def test_materialize_copies_when_the_cache_inode_has_too_many_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    access = FakeAccess()
    root, dirs = sample_tree(access)
    tree = plan_tree(root, dirs, allow_absolute_symlinks=True)
    cache = await cache_with(tmp_path, tree, access)
    real_link = os.link
    calls = []

    def flaky_link(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(dst)
        if len(calls) % 2 == 0:
            raise OSError(errno.EMLINK, "Too many links")
        if len(calls) == 3:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", flaky_link)
    dest = tmp_path / "root"
    dest.mkdir()
    stats = build_input_root_sync(tree, dest, cache.path_str)
    monkeypatch.undo()

    n = len(tree.files)
    expected_copies = sum(1 for i in range(1, n + 1) if i % 2 == 0 or i == 3)
    assert stats.copies == expected_copies and stats.links == n - expected_copies
    copied = 0
    for rel, entry in tree.files:
        path = dest / rel
        assert path.read_bytes() == access.blobs.get(entry.digest, b"")
        assert os.lstat(path).st_mode & 0o7777 == (0o555 if entry.executable else 0o444)
        if inode(path) != inode(cache.path(entry)):
            copied += 1
    assert copied == expected_copies
    # The cache entries themselves are untouched.
    for entry in tree.entries():
        assert os.lstat(cache.path(entry)).st_mode & 0o7777 == (
            0o555 if entry.executable else 0o444
        )


async def test_materialize_other_link_errors_propagate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    access = FakeAccess()
    root, dirs = sample_tree(access)
    tree = plan_tree(root, dirs, allow_absolute_symlinks=True)
    cache = await cache_with(tmp_path, tree, access)

    def failing_link(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", failing_link)
    dest = tmp_path / "root"
    dest.mkdir()
    with pytest.raises(OSError) as info:
        build_input_root_sync(tree, dest, cache.path_str)
    assert info.value.errno == errno.ENOSPC


async def test_materialize_never_writes_outside_dest(tmp_path: Path) -> None:
    access = FakeAccess()
    a = access.put(b"inside")
    # Symlinks pointing up and out exist before the files: creating files never follows them.
    leaf = make_dir(files=[("f", a)], symlinks=[("up", ".."), ("to_root", "../..")])
    sub = make_dir(dirs=[("leaf", leaf[0])], files=[("g", a)], symlinks=[("abs", str(tmp_path))])
    root = make_dir(dirs=[("sub", sub[0])], files=[("h", a)], symlinks=[("dot", ".")])
    tree = plan_tree(root[0], tree_of(root, sub, leaf), allow_absolute_symlinks=True)
    cache = await cache_with(tmp_path, tree, access)
    dest = tmp_path / "box" / "root"
    dest.mkdir(parents=True)

    def snapshot() -> set[str]:
        return {
            str(p.relative_to(tmp_path))
            for p in tmp_path.rglob("*")
            if "box/root" not in str(p) and not str(p).startswith(str(tmp_path / "cache"))
        }

    before = snapshot()
    build_input_root_sync(tree, dest, cache.path_str)
    assert snapshot() == before
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    expected = ["dot", "h", "sub", "sub/abs", "sub/g", "sub/leaf", "sub/leaf/f"]
    assert found == sorted([*expected, "sub/leaf/up", "sub/leaf/to_root"])


# -- load_directories -------------------------------------------------------------------------


async def test_repeated_subtree_is_fetched_and_parsed_once() -> None:
    access = FakeAccess()
    a = access.put(b"a")
    deepest = make_dir(files=[("f", a)])
    shared = make_dir(dirs=[("deepest", deepest[0])], files=[("g", a)])
    middle = make_dir(dirs=[("x", shared[0]), ("y", shared[0])])
    root = make_dir(dirs=[("one", shared[0]), ("two", shared[0]), ("mid", middle[0])])
    for d, raw, _ in (deepest, shared, middle, root):
        access.blobs[d] = raw

    cache = DirectoryCache()
    dirs = await load_directories(root[0], access, cache)
    assert set(dirs) == {root[0], middle[0], shared[0], deepest[0]}
    read = [d for call in access.read_small_calls for d in call]
    assert sorted(read) == sorted([root[0], middle[0], shared[0], deepest[0]])
    assert cache.misses == 4
    tree = plan_tree(root[0], dirs)
    assert len([p for p, _ in tree.files if p.endswith("/g")]) == 4

    # A second tree sharing the subtree: only its new root is fetched.
    root2 = make_dir(dirs=[("again", shared[0])])
    access.blobs[root2[0]] = root2[1]
    access.read_small_calls.clear()
    dirs2 = await load_directories(root2[0], access, cache)
    assert set(dirs2) == {root2[0], shared[0], deepest[0]}
    assert [d for call in access.read_small_calls for d in call] == [root2[0]]
    assert cache.misses == 5 and cache.hits > 0

    # The whole tree again: nothing fetched at all.
    access.read_small_calls.clear()
    access.find_missing_calls.clear()
    assert set(await load_directories(root[0], access, cache)) == set(dirs)
    assert access.read_small_calls == [] and access.find_missing_calls == []


async def test_missing_directory_raises_missing_inputs() -> None:
    access = FakeAccess()
    gone1 = make_dir(files=[("f", A)])
    gone2 = make_dir(files=[("g", A)])
    present = make_dir()
    root = make_dir(dirs=[("a", gone1[0]), ("b", gone2[0]), ("c", present[0])])
    access.blobs[root[0]] = root[1]
    access.blobs[present[0]] = present[1]
    with pytest.raises(MissingInputs) as info:
        await load_directories(root[0], access, DirectoryCache())
    assert sorted(info.value.missing) == sorted([gone1[0], gone2[0]])
    assert info.value.status.name == "NOT_FOUND"

    with pytest.raises(MissingInputs) as info:
        await load_directories(digest_of(b"no such root"), access, DirectoryCache())
    assert info.value.missing == [digest_of(b"no such root")]


async def test_undecodable_directory_is_an_invalid_tree() -> None:
    access = FakeAccess()
    bad = access.put(b"\xff\xff\xff garbage")
    with pytest.raises(InvalidInputTree, match=bad.hash):
        await load_directories(bad, access, DirectoryCache())


async def test_directory_cache_smaller_than_one_level() -> None:
    access = FakeAccess()
    kids = [make_dir(files=[(f"f{i}", A)]) for i in range(5)]
    root = make_dir(dirs=[(f"d{i}", k[0]) for i, k in enumerate(kids)])
    for d, raw, _ in (root, *kids):
        access.blobs[d] = raw
    dirs = await load_directories(root[0], access, DirectoryCache(max_directories=2))
    assert set(dirs) == {root[0], *(k[0] for k in kids)}


# -- prepare_outputs_sync ---------------------------------------------------------------------


def command(**fields) -> fastpb.Message:  # type: ignore[no-untyped-def]
    return fastpb.Command(arguments=["true"], **fields)


def test_prepare_creates_output_parents_relative_to_working_directory(tmp_path: Path) -> None:
    cmd = command(
        working_directory="wd",
        output_files=["out/f.txt", "top.txt", "../sibling/up.txt"],
        output_directories=["gen/dir", "d2"],
    )
    prepare_outputs_sync(tmp_path, cmd)
    assert (tmp_path / "wd/out").is_dir()
    assert (tmp_path / "wd/gen").is_dir()
    assert (tmp_path / "sibling").is_dir()
    assert not (tmp_path / "wd/out/f.txt").exists()
    assert not (tmp_path / "wd/gen/dir").exists()
    assert not (tmp_path / "wd/d2").exists()
    assert not (tmp_path / "wd/top.txt").exists()


def test_prepare_output_paths_v21(tmp_path: Path) -> None:
    cmd = command(output_paths=["p/q/r", "x"], output_files=["ignored/f"])
    prepare_outputs_sync(tmp_path, cmd)
    assert (tmp_path / "p/q").is_dir()
    assert not (tmp_path / "p/q/r").exists()
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "ignored").exists()  # output_paths supersede output_files


def test_prepare_keeps_existing_input_directories(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/input.txt").write_text("x")
    prepare_outputs_sync(tmp_path, command(output_files=["out/deeper/f"]))
    assert (tmp_path / "out/input.txt").read_text() == "x"
    assert (tmp_path / "out/deeper").is_dir()


@pytest.mark.parametrize(
    "fields",
    [
        {"output_files": ["/abs/f"]},
        {"output_directories": ["/abs"]},
        {"output_paths": ["/abs"]},
        {"output_files": ["../escape"]},
        {"output_paths": ["a/../../escape"]},
        {"working_directory": "wd", "output_files": ["../../escape"]},
        {"working_directory": "/abs", "output_files": ["f"]},
        {"working_directory": "../up", "output_files": ["f"]},
    ],
)
def test_prepare_rejects_absolute_or_escaping_paths(tmp_path: Path, fields: dict) -> None:  # type: ignore[type-arg]
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(InvalidArgument):
        prepare_outputs_sync(root, command(**fields))
    assert os.listdir(tmp_path) == ["root"]


def test_prepare_does_not_create_directories_through_input_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "rel").symlink_to("..")
    for out in ("link/made/f", "rel/made/f", "link/f"):
        with pytest.raises(InvalidArgument, match=r"symlink|not a directory"):
            prepare_outputs_sync(root, command(output_files=[out]))
    assert os.listdir(outside) == []
    assert sorted(os.listdir(tmp_path)) == ["outside", "root"]


def test_prepare_output_under_an_input_file_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgument, match="not a directory"):
        prepare_outputs_sync(tmp_path, command(output_files=["file/out"]))
