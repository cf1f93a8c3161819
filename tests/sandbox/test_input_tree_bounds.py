"""Issue 9 item 1, worker side: a Directory DAG bomb is refused from its DAG, before expansion,
and large trees are sized and planned off the Trio thread."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from grpclib.const import Status

from reexec import fastpb
from reexec.cas.digest import Digest, digest_of
from reexec.cas.tree_size import TreeTooLarge
from reexec.sandbox import materialize
from reexec.sandbox.materialize import plan_input_tree
from tests.sandbox.fakes import make_dir
from tests.sandbox.test_executor import make_env


def bomb(levels: int = 40) -> tuple[Digest, dict[Digest, fastpb.Message]]:
    """`levels` + 1 directories; each names the one below twice: 2^levels leaves."""
    leaf = make_dir(files=[("f", digest_of(b"x"))])
    dirs = {leaf[0]: leaf[2]}
    below = leaf
    for _ in range(levels):
        below = make_dir(dirs=[("a", below[0]), ("b", below[0])])
        dirs[below[0]] = below[2]
    return below[0], dirs


def _not_on_trio_thread() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return True
    return False


async def test_dag_bomb_is_refused_without_expanding(monkeypatch: pytest.MonkeyPatch) -> None:
    def expand(*args: object) -> None:
        raise AssertionError("plan_tree expanded a tree over the limit")

    monkeypatch.setattr(materialize, "plan_tree", expand)
    root, dirs = bomb()
    t0 = time.monotonic()
    with pytest.raises(TreeTooLarge, match="more than 2,000,000 entries"):
        await plan_input_tree(root, dirs)
    assert time.monotonic() - t0 < 0.5


async def test_too_deep_is_refused_before_expanding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(materialize, "plan_tree", None)
    below = make_dir()
    dirs = {below[0]: below[2]}
    for _ in range(300):
        below = make_dir(dirs=[("d", below[0])])
        dirs[below[0]] = below[2]
    with pytest.raises(TreeTooLarge, match="deeper than 256"):
        await plan_input_tree(below[0], dirs)


async def test_large_trees_are_sized_and_planned_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[tuple[str, bool]] = []
    real_plan, real_sizes = materialize.plan_tree, materialize.subtree_sizes

    def plan(*args: object) -> object:
        threads.append(("plan", _not_on_trio_thread()))
        return real_plan(*args)  # type: ignore[arg-type]

    def sizes(*args: object, **kw: object) -> object:
        threads.append(("size", _not_on_trio_thread()))
        return real_sizes(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(materialize, "plan_tree", plan)
    monkeypatch.setattr(materialize, "subtree_sizes", sizes)
    root, dirs = bomb(levels=13)  # 14 directories, 8,192 files, ~16k directories expanded
    tree = await plan_input_tree(root, dirs)
    assert len(tree.files) == 2**13
    assert threads == [("size", False), ("plan", True)]

    many = [make_dir(files=[(f"f{i}", digest_of(b"%d" % i))]) for i in range(1_100)]
    top = make_dir(dirs=[(f"d{i}", d[0]) for i, d in enumerate(many)])
    threads.clear()
    await plan_input_tree(top[0], {top[0]: top[2]} | {d[0]: d[2] for d in many})
    assert threads == [("size", True), ("plan", False)]


async def test_executor_refuses_a_dag_bomb_quickly(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    root, dirs = bomb()
    for d in dirs.values():
        await env.put(d.SerializeToString(deterministic=True))
    t0 = trio.current_time()
    f = await env.run(await env.start(root))
    assert trio.current_time() - t0 < 2
    assert f.status.code == Status.INVALID_ARGUMENT.value and not f.retryable
    assert "2,000,000 entries" in f.status.message
    assert env.work_is_clean()
