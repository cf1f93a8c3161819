"""Collecting an action's outputs: ActionResult fields, Trees, symlinks, moves into the cache,
and the blobs to upload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reexec import fastpb
from reexec.cas.digest import Digest, DigestFunction, digest_of
from reexec.sandbox.local_cas import Entry, LocalCas
from reexec.sandbox.outputs import CollectedOutputs, collect_outputs_sync, log_blob_sync
from tests.sandbox.fakes import FakeAccess, inode

SHA256 = DigestFunction.SHA256


@pytest.fixture
async def cache(tmp_path: Path) -> LocalCas:
    c = LocalCas(tmp_path / "cache", 0, FakeAccess())
    await c.start()
    return c


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def wire(d: fastpb.Message) -> Digest:
    return Digest(d.hash, d.size_bytes, SHA256)


def collect(root: Path, cache: LocalCas, **fields) -> CollectedOutputs:  # type: ignore[no-untyped-def]
    return collect_outputs_sync(
        root, fastpb.Command(arguments=["x"], **fields), SHA256, cache.adopter
    )


def uploaded_bytes(out: CollectedOutputs, d: Digest) -> bytes:
    src = out.uploads[d]
    return src if isinstance(src, bytes) else Path(src).read_bytes()


# -- files ------------------------------------------------------------------------------------


async def test_output_files_exec_bit_and_missing_ones(root: Path, cache: LocalCas) -> None:
    write(root / "bin/tool", b"#!/bin/sh\n", 0o755)
    write(root / "data.txt", b"data", 0o644)
    write(root / "empty", b"", 0o600)
    out = collect(root, cache, output_files=["bin/tool", "data.txt", "empty", "never/made"])
    files = {f.path: f for f in out.result.output_files}
    assert list(files) == ["bin/tool", "data.txt", "empty"]
    assert files["bin/tool"].is_executable and not files["data.txt"].is_executable
    assert wire(files["data.txt"].digest) == digest_of(b"data")
    assert wire(files["empty"].digest) == digest_of(b"")
    assert not out.result.output_directories and not out.result.output_symlinks

    for path, f in files.items():
        # Moved, not copied: the source is gone, the cache entry holds the bytes.
        assert not (root / path).exists()
        entry = Entry(wire(f.digest), f.is_executable)
        cached = cache.path(entry)
        assert cached.exists()
        assert os.lstat(cached).st_mode & 0o7777 == (0o555 if f.is_executable else 0o444)
        assert entry in out.entries
        assert uploaded_bytes(out, entry.digest) == cached.read_bytes()
    assert out.bytes_total == len(b"#!/bin/sh\n") + 4


async def test_moved_file_keeps_its_inode(root: Path, cache: LocalCas) -> None:
    before = inode(write(root / "big.bin", os.urandom(100_000)))
    out = collect(root, cache, output_files=["big.bin"])
    d = wire(out.result.output_files[0].digest)
    assert inode(cache.path(Entry(d, False))) == before
    assert out.uploads[d] == cache.path(Entry(d, False))


async def test_kind_mismatch_is_not_an_output(root: Path, cache: LocalCas) -> None:
    (root / "is_a_dir").mkdir()
    write(root / "is_a_file", b"f")
    out = collect(root, cache, output_files=["is_a_dir"], output_directories=["is_a_file"])
    assert not out.result.output_files and not out.result.output_directories
    assert out.uploads == {}


async def test_same_output_as_an_existing_entry(root: Path, cache: LocalCas) -> None:
    write(root / "a", b"same", 0o644)
    write(root / "b", b"same", 0o644)
    out = collect(root, cache, output_files=["a", "b"])
    d = digest_of(b"same")
    assert [wire(f.digest) for f in out.result.output_files] == [d, d]
    assert not (root / "a").exists() and not (root / "b").exists()
    assert cache.path(Entry(d, False)).read_bytes() == b"same"
    assert list(out.uploads) == [d]


async def test_output_through_a_symlinked_parent_is_not_collected(
    tmp_path: Path, root: Path, cache: LocalCas
) -> None:
    # The action (possibly another user) could point a parent anywhere: the worker must not
    # follow it and move or upload files from outside the input root.
    secret = write(tmp_path / "outside/secret", b"not yours")
    (root / "link").symlink_to(tmp_path / "outside")
    (root / "rel").symlink_to("../outside")
    (root / "wd").symlink_to(tmp_path / "outside")
    out = collect(root, cache, output_files=["link/secret", "rel/secret"])
    assert not out.result.output_files and out.uploads == {}
    out = collect(root, cache, working_directory="wd", output_files=["secret"])
    assert not out.result.output_files and out.uploads == {}
    out = collect(root, cache, output_paths=["link/secret", "rel"], output_directories=["link"])
    assert not out.result.output_files and not out.result.output_directories
    assert [s.path for s in out.result.output_symlinks] == ["rel"]
    assert secret.read_bytes() == b"not yours"


# -- directories ------------------------------------------------------------------------------


async def test_output_directory_tree(root: Path, cache: LocalCas) -> None:
    top = root / "out"
    # Two identical subdirectories, nested dirs, files created out of order, symlinks.
    for sub in ("a", "b"):
        write(top / sub / "z.txt", b"zzz")
        write(top / sub / "m.txt", b"mmm", 0o755)
        write(top / sub / "deeper/leaf.txt", b"leaf")
    write(top / "c/only.txt", b"c")
    (top / "empty").mkdir()
    write(top / "y_file", b"top-level")
    write(top / "a_file", b"first")
    (top / "link_rel").symlink_to("a/z.txt")
    (top / "link_abs").symlink_to("/etc/hostname")
    (top / "dangling").symlink_to("does/not/exist")
    (top / "a/up").symlink_to("..")
    os.mkfifo(top / "fifo")  # not representable: skipped

    out = collect(root, cache, output_directories=["out", "missing_dir"])
    assert len(out.result.output_directories) == 1
    od = out.result.output_directories[0]
    assert od.path == "out"
    tree = fastpb.Tree.FromString(uploaded_bytes(out, wire(od.tree_digest)))
    root_dir = tree.root
    assert root_dir.SerializeToString(deterministic=True) == uploaded_bytes(
        out, wire(od.root_directory_digest)
    )

    assert [f.name for f in root_dir.files] == ["a_file", "y_file"]
    assert [d.name for d in root_dir.directories] == ["a", "b", "c", "empty"]
    assert [(s.name, s.target) for s in root_dir.symlinks] == [
        ("dangling", "does/not/exist"),
        ("link_abs", "/etc/hostname"),
        ("link_rel", "a/z.txt"),
    ]
    by_name = {d.name: wire(d.digest) for d in root_dir.directories}
    children = {digest_of(c.SerializeToString(deterministic=True)): c for c in tree.children}
    # a and b differ by the "up" symlink; their "deeper" subdirectories are the same.
    assert by_name["a"] != by_name["b"]
    a, b = children[by_name["a"]], children[by_name["b"]]
    assert [f.name for f in a.files] == ["m.txt", "z.txt"]
    assert [f.is_executable for f in a.files] == [True, False]
    assert [(s.name, s.target) for s in a.symlinks] == [("up", "..")]
    assert wire(a.directories[0].digest) == wire(b.directories[0].digest)
    # Every child once: a, b, c, empty, deeper (shared).
    assert len(tree.children) == len(children) == 5
    referenced = set()
    for d in [root_dir, *tree.children]:
        referenced.update(wire(n.digest) for n in d.directories)
    assert referenced == set(children)

    # Uploads: every file blob, the Tree, the root and every child Directory.
    for d in [wire(od.tree_digest), wire(od.root_directory_digest), *children]:
        assert d in out.uploads
    for content in (b"zzz", b"mmm", b"leaf", b"c", b"top-level", b"first"):
        assert uploaded_bytes(out, digest_of(content)) == content
    # Files were moved into the cache; directories and symlinks stay.
    assert not (top / "a/z.txt").exists()
    assert (top / "a").is_dir() and (top / "link_rel").is_symlink()
    assert (top / "fifo").exists()


async def test_empty_output_directory(root: Path, cache: LocalCas) -> None:
    (root / "gen").mkdir()
    out = collect(root, cache, output_paths=["gen"])
    od = out.result.output_directories[0]
    tree = fastpb.Tree.FromString(uploaded_bytes(out, wire(od.tree_digest)))
    assert tree.root == fastpb.Directory() and not tree.children
    assert wire(od.root_directory_digest) == digest_of(b"")


# -- symlinks ---------------------------------------------------------------------------------


def make_symlinks(root: Path) -> None:
    write(root / "target.txt", b"t")
    (root / "target_dir").mkdir()
    (root / "to_file").symlink_to("target.txt")
    (root / "to_dir").symlink_to("target_dir")
    (root / "dangling_f").symlink_to("nowhere")
    (root / "dangling_d").symlink_to("/nowhere/at/all")


async def test_output_symlinks_v20(root: Path, cache: LocalCas) -> None:
    make_symlinks(root)
    out = collect(
        root,
        cache,
        output_files=["to_file", "dangling_f"],
        output_directories=["to_dir", "dangling_d"],
    )
    r = out.result
    pairs = lambda xs: [(s.path, s.target) for s in xs]  # noqa: E731
    assert pairs(r.output_symlinks) == [
        ("to_file", "target.txt"),
        ("dangling_f", "nowhere"),
        ("to_dir", "target_dir"),
        ("dangling_d", "/nowhere/at/all"),
    ]
    # The legacy fields follow the declared kind (REAPI v2.0), dangling or not.
    assert pairs(r.output_file_symlinks) == [("to_file", "target.txt"), ("dangling_f", "nowhere")]
    assert pairs(r.output_directory_symlinks) == [
        ("to_dir", "target_dir"),
        ("dangling_d", "/nowhere/at/all"),
    ]
    assert not r.output_files and not r.output_directories
    assert out.uploads == {}
    assert (root / "to_file").is_symlink()  # symlinks are reported, not moved


async def test_output_symlinks_v21(root: Path, cache: LocalCas) -> None:
    make_symlinks(root)
    out = collect(root, cache, output_paths=["to_file", "to_dir", "dangling_f", "dangling_d"])
    r = out.result
    assert [(s.path, s.target) for s in r.output_symlinks] == [
        ("to_file", "target.txt"),
        ("to_dir", "target_dir"),
        ("dangling_f", "nowhere"),
        ("dangling_d", "/nowhere/at/all"),
    ]
    assert not r.output_file_symlinks and not r.output_directory_symlinks


async def test_output_paths_v21_files_and_directories(root: Path, cache: LocalCas) -> None:
    write(root / "f", b"file", 0o700)
    write(root / "d/inner", b"inner")
    out = collect(root, cache, output_paths=["f", "d", "absent"], output_files=["ignored"])
    assert [(f.path, f.is_executable) for f in out.result.output_files] == [("f", True)]
    assert [d.path for d in out.result.output_directories] == ["d"]


# -- working directory ------------------------------------------------------------------------


async def test_paths_are_relative_to_the_working_directory(root: Path, cache: LocalCas) -> None:
    write(root / "wd/sub/f", b"in wd")
    write(root / "top.txt", b"above wd")
    write(root / "wd/d/x", b"x")
    (root / "wd/ln").symlink_to("sub/f")
    write(root / "f", b"decoy at the root")
    out = collect(
        root,
        cache,
        working_directory="wd",
        output_files=["sub/f", "../top.txt", "ln"],
        output_directories=["d"],
    )
    r = out.result
    assert [(f.path, wire(f.digest)) for f in r.output_files] == [
        ("sub/f", digest_of(b"in wd")),
        ("../top.txt", digest_of(b"above wd")),
    ]
    assert [d.path for d in r.output_directories] == ["d"]
    assert [(s.path, s.target) for s in r.output_symlinks] == [("ln", "sub/f")]
    assert (root / "f").read_bytes() == b"decoy at the root"


# -- stdout / stderr --------------------------------------------------------------------------


async def test_log_blob_is_adopted_and_uploaded(
    tmp_path: Path, root: Path, cache: LocalCas
) -> None:
    out = collect(root, cache)
    log = write(tmp_path / "stdout", b"hello\n")
    d = log_blob_sync(log, SHA256, cache.adopter, out)
    assert d == digest_of(b"hello\n")
    assert not log.exists()
    assert uploaded_bytes(out, d) == b"hello\n"
    assert Entry(d, False) in out.entries
