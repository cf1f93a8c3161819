"""LruIndex bookkeeping (reexec.cas.lru) against a simple list model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from reexec.cas.lru import LruIndex


def test_eviction_order_is_least_recently_used_first() -> None:
    lru: LruIndex[str] = LruIndex(30)
    for k in "abc":
        assert lru.add(k, 10)
    assert lru.touch("a")  # order now b, c, a
    assert not lru.touch("zz")
    assert lru.add("d", 10) is True
    assert lru.take_evictions() == ["b"]
    assert lru.keys_oldest_first() == ["c", "a", "d"]
    assert lru.total_bytes == 30
    assert lru.evictions == 1
    # Re-adding an existing key only refreshes it.
    assert lru.add("c", 999) is False
    assert lru.total_bytes == 30
    assert lru.keys_oldest_first() == ["a", "d", "c"]


def test_take_evictions_makes_room_for_incoming() -> None:
    lru: LruIndex[str] = LruIndex(30)
    for k in "abc":
        lru.add(k, 10)
    assert lru.take_evictions() == []
    assert lru.take_evictions(incoming=15) == ["a", "b"]
    assert lru.total_bytes == 10


def test_unbounded_when_max_bytes_is_zero() -> None:
    lru: LruIndex[int] = LruIndex(0)
    for k in range(100):
        lru.add(k, 10**9)
    assert lru.take_evictions(10**12) == []
    assert len(lru) == 100


def test_pinned_keys_are_skipped_and_keep_their_place() -> None:
    lru: LruIndex[str] = LruIndex(25)
    for k in "abcd":
        lru.add(k, 10)
    lru.pin("a")
    lru.pin("c")
    lru.pin("c")
    # Must shed 15 bytes (40 -> 25): b and d are the only candidates.
    assert lru.take_evictions() == ["b", "d"]
    assert lru.keys_oldest_first() == ["a", "c"]
    assert lru.total_bytes == 20
    # Everything left is pinned: over budget, nothing to evict.
    lru.add("e", 10)
    lru.pin("e")
    assert lru.take_evictions() == []
    assert lru.keys_oldest_first() == ["a", "c", "e"]
    lru.unpin("c")
    assert lru.is_pinned("c")  # pinned twice, unpinned once
    lru.unpin("c")
    assert not lru.is_pinned("c")
    assert lru.take_evictions() == ["c"]
    assert lru.keys_oldest_first() == ["a", "e"]


def test_remove() -> None:
    lru: LruIndex[str] = LruIndex(100)
    lru.add("a", 7)
    assert lru.remove("a") == 7
    assert lru.remove("a") is None
    assert lru.total_bytes == 0
    assert "a" not in lru


class LruMachine(RuleBasedStateMachine):
    """Random operation sequences against a plain list model of the same policy."""

    def __init__(self) -> None:
        super().__init__()
        self.max_bytes = 50
        self.lru: LruIndex[int] = LruIndex(self.max_bytes)
        self.order: list[int] = []  # oldest first
        self.sizes: dict[int, int] = {}
        self.pins: dict[int, int] = {}
        self.evicted = 0

    keys = st.integers(0, 9)

    @rule(key=keys, size=st.integers(0, 30))
    def add(self, key: int, size: int) -> None:
        new = self.lru.add(key, size)
        assert new == (key not in self.sizes)
        if key in self.sizes:
            self.order.remove(key)
        else:
            self.sizes[key] = size
        self.order.append(key)

    @rule(key=keys)
    def touch(self, key: int) -> None:
        assert self.lru.touch(key) == (key in self.sizes)
        if key in self.sizes:
            self.order.remove(key)
            self.order.append(key)

    @rule(key=keys)
    def remove(self, key: int) -> None:
        assert self.lru.remove(key) == self.sizes.pop(key, None)
        if key in self.order:
            self.order.remove(key)

    @rule(key=keys)
    def pin(self, key: int) -> None:
        self.lru.pin(key)
        self.pins[key] = self.pins.get(key, 0) + 1

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.pins)))
        self.lru.unpin(key)
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]

    @rule(incoming=st.integers(0, 40))
    def evict(self, incoming: int) -> None:
        victims = self.lru.take_evictions(incoming)
        expected: list[int] = []
        total = sum(self.sizes.values())
        for key in list(self.order):
            if total + incoming <= self.max_bytes:
                break
            if key in self.pins:
                continue
            expected.append(key)
            total -= self.sizes.pop(key)
            self.order.remove(key)
        assert victims == expected
        assert not set(victims) & set(self.pins), "a pinned key was evicted"
        self.evicted += len(victims)

    @invariant()
    def consistent(self) -> None:
        assert self.lru.keys_oldest_first() == self.order
        assert self.lru.total_bytes == sum(self.sizes.values())
        assert len(self.lru) == len(self.sizes)
        assert self.lru.evictions == self.evicted
        for k in range(10):
            assert self.lru.is_pinned(k) == (k in self.pins)


TestLruMachine = LruMachine.TestCase
TestLruMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


@settings(max_examples=100)
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=30),
    pinned=st.sets(st.integers(0, 29)),
    max_bytes=st.integers(1, 100),
)
def test_after_eviction_within_budget_unless_only_pins_remain(
    sizes: list[int], pinned: set[int], max_bytes: int
) -> None:
    lru: LruIndex[int] = LruIndex(max_bytes)
    for i, s in enumerate(sizes):
        lru.add(i, s)
        if i in pinned:
            lru.pin(i)
    victims = lru.take_evictions()
    assert not set(victims) & pinned
    if lru.total_bytes > max_bytes:
        assert all(k in pinned for k in lru.keys_oldest_first())
    assert lru.total_bytes == sum(sizes[k] for k in lru.keys_oldest_first())
    # Survivors keep their relative order.
    remaining = lru.keys_oldest_first()
    assert remaining == sorted(remaining)


@given(
    stored=st.lists(st.integers(0, 20), unique=True),
    asked=st.lists(st.integers(0, 25)),
)
def test_touch_missing_is_touch_per_key(stored: list[int], asked: list[int]) -> None:
    """The bulk form answers and reorders exactly as `touch` called key by key."""
    bulk: LruIndex[int] = LruIndex(0)
    single: LruIndex[int] = LruIndex(0)
    for k in stored:
        bulk.add(k, 1)
        single.add(k, 1)
    expected = list(dict.fromkeys(k for k in asked if not single.touch(k)))
    assert bulk.touch_missing(asked) == expected
    assert bulk.keys_oldest_first() == single.keys_oldest_first()
