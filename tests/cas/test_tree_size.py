"""reexec.cas.tree_size: expanded tree sizes from the DAG, checked against naive expansion."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reexec import fastpb
from reexec.cas.tree_size import (
    SizeCache,
    TreeSize,
    TreeTooLarge,
    directory_size,
    subtree_sizes,
)
from reexec.errors import InvalidArgument


def key(node) -> str:
    return node.digest.hash


def make_dag(spec: list[tuple[list[int], list[int], int]]) -> dict[str, fastpb.Message]:
    """Directory i names directories `children` (all < i, repeats allowed), holds files of the
    given sizes and `symlinks` symlinks. Keys are "d{i}"."""
    out = {}
    for i, (children, files, symlinks) in enumerate(spec):
        d = fastpb.Directory()
        for j, size in enumerate(files):
            f = d.files.add(name=f"f{j}")
            f.digest.hash, f.digest.size_bytes = f"file{j}", size
        for j, c in enumerate(children):
            n = d.directories.add(name=f"c{j}")
            n.digest.hash, n.digest.size_bytes = f"d{c}", 1
        for j in range(symlinks):
            d.symlinks.add(name=f"s{j}", target="x")
        out[f"d{i}"] = d
    return out


def naive(root: str, dag: dict[str, fastpb.Message]) -> TreeSize:
    """Expand the tree for real (recursively): the reference the memoised version must match."""
    d = dag[root]
    subs = [naive(key(n), dag) for n in d.directories]
    return TreeSize(
        entries=len(d.files) + len(d.symlinks) + len(d.directories) + sum(s.entries for s in subs),
        file_bytes=sum(f.digest.size_bytes for f in d.files) + sum(s.file_bytes for s in subs),
        depth=1 + max(s.depth for s in subs) if subs else 0,
    )


@st.composite
def dags(draw):
    n = draw(st.integers(1, 9))
    spec = []
    for i in range(n):
        children = draw(st.lists(st.integers(0, i - 1), max_size=3)) if i else []
        files = draw(st.lists(st.integers(0, 1000), max_size=3))
        spec.append((children, files, draw(st.integers(0, 2))))
    return make_dag(spec), f"d{n - 1}"


@settings(max_examples=60, deadline=None)
@given(dags())
def test_sizes_match_naive_expansion(case):
    dag, root = case
    sizes = subtree_sizes(root, dag, key, max_entries=None, max_depth=None)
    for k, size in sizes.items():
        assert size == naive(k, dag)


@settings(max_examples=40, deadline=None)
@given(dags(), st.data())
def test_known_sizes_are_reused_not_recomputed(case, data):
    dag, root = case
    full = subtree_sizes(root, dag, key, max_entries=None, max_depth=None)
    below_root = sorted(k for k in full if k != root)
    known_keys = data.draw(st.lists(st.sampled_from(below_root), unique=True)) if below_root else []
    known = {k: full[k] for k in known_keys}
    # Directories whose size is known are never looked at: drop them from the mapping.
    partial = {k: v for k, v in dag.items() if k not in known}
    sizes = subtree_sizes(root, partial, key, known=known, max_entries=None, max_depth=None)
    assert sizes[root] == full[root]
    assert not set(sizes) & set(known)


@settings(max_examples=40, deadline=None)
@given(dags())
def test_limits_are_exact(case):
    dag, root = case
    want = naive(root, dag)
    assert (
        subtree_sizes(root, dag, key, max_entries=want.entries, max_depth=want.depth)[root] == want
    )
    if want.entries:
        with pytest.raises(TreeTooLarge, match="more than"):
            subtree_sizes(root, dag, key, max_entries=want.entries - 1, max_depth=None)
    if want.depth:
        with pytest.raises(TreeTooLarge, match="deeper than"):
            subtree_sizes(root, dag, key, max_entries=None, max_depth=want.depth - 1)


def bomb(levels: int) -> dict[str, fastpb.Message]:
    """Each level names the previous one twice: `levels` directories, ~2^levels entries."""
    return make_dag([([], [7], 0)] + [([i, i], [], 0) for i in range(levels - 1)])


def test_directory_bomb_is_sized_without_expanding():
    dag = bomb(41)
    started = time.monotonic()
    size = subtree_sizes("d40", dag, key, max_entries=None, max_depth=None)["d40"]
    assert time.monotonic() - started < 0.5
    assert size.entries == 2**41 - 2 + 2**40  # 2^41-2 directories + 2^40 files
    assert size.file_bytes == 7 * 2**40
    assert size.depth == 40
    with pytest.raises(TreeTooLarge, match="more than 2,000,000 entries"):
        subtree_sizes("d40", dag, key)


def test_deep_chain_is_refused_without_recursion():
    chain = make_dag([([], [], 0)] + [([i], [], 0) for i in range(5000)])
    with pytest.raises(TreeTooLarge, match="deeper than 256 levels"):
        subtree_sizes("d5000", chain, key)
    assert subtree_sizes("d5000", chain, key, max_depth=None)["d5000"].depth == 5000


def test_cycle_is_invalid_argument():
    dag = make_dag([([1], [], 0), ([0], [], 0)])
    with pytest.raises(InvalidArgument, match="cycle"):
        subtree_sizes("d0", dag, key)


def test_missing_directory_is_a_key_error():
    dag = make_dag([([], [], 0), ([0], [], 0)])
    del dag["d0"]
    with pytest.raises(KeyError):
        subtree_sizes("d1", dag, key)


def test_directory_size_counts_repeated_children_each_time():
    d = make_dag([([], [1, 2], 1), ([0, 0], [10], 0)])["d1"]
    child = TreeSize(entries=3, file_bytes=3, depth=0)
    assert directory_size(d, [child, child]) == TreeSize(entries=9, file_bytes=16, depth=1)


def test_size_cache_evicts_least_recently_used():
    cache = SizeCache(max_items=2)
    a, b, c = (TreeSize(i, i, 0) for i in range(3))
    cache.update([("a", a), ("b", b)])
    assert cache.get("a") == a  # a is now the most recent
    cache.update([("c", c)])
    assert cache.get("b") is None and cache.get("a") == a and cache.get("c") == c
    assert len(cache) == 2
