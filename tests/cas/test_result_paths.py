"""reexec.cas.result_paths: client-written ActionResults are as safe as the worker's outputs."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reexec import fastpb
from reexec.cas.result_paths import (
    check_action_result,
    check_output_path,
    check_symlink_target,
    check_tree,
)
from reexec.errors import InvalidArgument


@pytest.mark.parametrize(
    "path", ["out", "a/b/c", "a/../b", "./a", "bazel-out/k8-fastbuild/bin/x.o", "a b/ü"]
)
def test_relative_paths_inside_are_accepted(path):
    check_output_path(path, "f")


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("../../etc/passwd", "not a relative path inside"),
        ("..", "not a relative path inside"),
        ("a/../../b", "not a relative path inside"),
        ("/etc/passwd", "not a relative path inside"),
        ("", "is empty"),
        ("a\0b", "NUL"),
    ],
)
def test_unsafe_paths_are_refused(path, why):
    with pytest.raises(InvalidArgument, match=why):
        check_output_path(path, "action_result.output_files[0].path")


def test_only_output_directories_may_be_empty():
    check_output_path("", "f", allow_empty=True)
    with pytest.raises(InvalidArgument):
        check_output_path("", "f")


@pytest.mark.parametrize(
    ("path", "target", "ok"),
    [
        ("a/link", "b", True),
        ("a/link", "../b", True),
        ("a/link", "../../b", False),
        ("link", "../x", False),
        ("link", "/etc/passwd", False),
        ("link", "", False),
        ("link", "a\0", False),
    ],
)
def test_symlink_targets(path, target, ok):
    if ok:
        check_symlink_target(path, target, "t")
    else:
        with pytest.raises(InvalidArgument):
            check_symlink_target(path, target, "t")


def test_absolute_targets_when_allowed():
    check_symlink_target("link", "/usr/bin/python3", "t", allow_absolute=True)


segments = st.sampled_from(["a", "b", "..", ".", "", "c d"])


@settings(max_examples=200, deadline=None)
@given(st.lists(segments, min_size=1, max_size=6), st.booleans())
def test_accepted_paths_never_leave_the_root(parts, absolute):
    """Whatever is accepted, joined under a root and normalised, stays under that root."""
    path = ("/" if absolute else "") + "/".join(parts)
    try:
        check_output_path(path, "f")
    except InvalidArgument:
        return
    root = "/work/root"
    assert posixpath.normpath(posixpath.join(root, path)).startswith(root)


@settings(max_examples=200, deadline=None)
@given(st.lists(segments, min_size=1, max_size=4), st.lists(segments, min_size=1, max_size=5))
def test_accepted_symlinks_never_point_outside(link_parts, target_parts):
    link = "/".join(p for p in link_parts if p not in ("", ".", "..")) or "l"
    target = "/".join(target_parts)
    try:
        check_symlink_target(link, target, "t")
    except InvalidArgument:
        return
    root = "/work/root"
    resolved = posixpath.normpath(posixpath.join(root, posixpath.dirname(link), target))
    assert resolved == root or resolved.startswith(root + "/")


def test_action_result_names_the_field():
    r = fastpb.ActionResult()
    r.output_files.add(path="ok")
    r.output_files.add(path="../../etc/passwd")
    with pytest.raises(InvalidArgument, match=r"action_result\.output_files\[1\]\.path"):
        check_action_result(r)
    r = fastpb.ActionResult()
    r.output_directory_symlinks.add(path="d", target="/etc")
    with pytest.raises(InvalidArgument, match=r"output_directory_symlinks\[0\]\.target"):
        check_action_result(r)
    check_action_result(r, allow_absolute_symlinks=True)
    r = fastpb.ActionResult()
    r.output_directories.add(path="")
    r.output_symlinks.add(path="x/y", target="../z")
    check_action_result(r)


def test_tree_names_and_targets():
    tree = fastpb.Tree()
    tree.root.files.add(name="ok")
    check_tree(tree, "out", "f")
    for bad in ("..", ".", "", "a/b", "x\0"):
        t = fastpb.Tree()
        t.children.add().files.add(name=bad)
        with pytest.raises(InvalidArgument, match="invalid name"):
            check_tree(t, "out", "f")
    t = fastpb.Tree()
    t.root.files.add(name="x")
    t.root.symlinks.add(name="x", target="y")
    with pytest.raises(InvalidArgument, match="appears twice"):
        check_tree(t, "out", "f")
    t = fastpb.Tree()
    t.root.symlinks.add(name="l", target="../../etc")
    with pytest.raises(InvalidArgument, match="outside the working directory"):
        check_tree(t, "out", "f")
    t = fastpb.Tree()
    t.children.add().symlinks.add(name="l", target="/etc/shadow")
    with pytest.raises(InvalidArgument, match="target"):
        check_tree(t, "out", "f")
