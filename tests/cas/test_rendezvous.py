"""Weighted rendezvous hashing: stable, weighted, and minimal movement on membership change."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reexec.cas.rendezvous import Shard, pick, rank

KEYS = [f"{i:064x}".encode() for i in range(20_000)]


def owners(shards: list[Shard]) -> list[str]:
    return [shards[pick(shards, k)].name for k in KEYS]


def test_shares_follow_weights() -> None:
    shards = [Shard("a", 1), Shard("b", 1), Shard("c", 2)]
    counts = Counter(owners(shards))
    n = len(KEYS)
    assert abs(counts["a"] / n - 0.25) < 0.02
    assert abs(counts["b"] / n - 0.25) < 0.02
    assert abs(counts["c"] / n - 0.50) < 0.02


def test_adding_a_shard_moves_only_its_share() -> None:
    before = owners([Shard("a"), Shard("b"), Shard("c")])
    after = owners([Shard("a"), Shard("b"), Shard("c"), Shard("d")])
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    # Every moved key went to the new shard, and about a quarter moved.
    assert all(y == "d" for _, y in moved)
    assert abs(len(moved) / len(KEYS) - 0.25) < 0.02


def test_removing_a_shard_moves_only_its_keys() -> None:
    before = owners([Shard("a"), Shard("b"), Shard("c")])
    after = owners([Shard("a"), Shard("c")])
    for x, y in zip(before, after, strict=True):
        if x != "b":
            assert x == y
        else:
            assert y in ("a", "c")


def test_order_of_shards_does_not_matter_and_zero_weight_owns_nothing() -> None:
    one = owners([Shard("a"), Shard("b"), Shard("z", 0)])
    two = owners([Shard("z", 0), Shard("b"), Shard("a")])
    assert one == two and "z" not in one
    with pytest.raises(ValueError):
        pick([Shard("z", 0)], b"k")


@settings(max_examples=50, deadline=None)
@given(
    names=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True),
    key=st.binary(max_size=80),
)
def test_pick_is_deterministic(names: list[str], key: bytes) -> None:
    shards = [Shard(n) for n in names]
    assert pick(shards, key) == pick(list(shards), key)
    assert 0 <= pick(shards, key) < len(shards)


def test_rank_starts_with_the_owner_and_its_tail_is_stable() -> None:
    shards = [Shard("a"), Shard("b", 2), Shard("c"), Shard("z", 0)]
    for k in KEYS[:2000]:
        order = rank(shards, k)
        assert order[0] == pick(shards, k) and sorted(order) == [0, 1, 2]
        # Without the owner, the next in rank owns the key.
        rest = [shards[i] for i in order[1:]]
        assert rest[pick(rest, k)].name == shards[order[1]].name
