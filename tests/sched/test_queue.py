"""PlatformQueues: per-key priority queues with lazy removal."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from reexec.sched.queue import PlatformQueues

A = (("os", "linux"),)
B = (("os", "mac"),)


def drain(q: PlatformQueues, key: tuple[tuple[str, str], ...]) -> list[str]:
    out = []
    while (name := q.pop(key)) is not None:
        out.append(name)
    return out


def test_empty() -> None:
    q = PlatformQueues()
    assert len(q) == 0 and "x" not in q
    assert q.head(A) is None and q.pop(A) is None
    assert list(q.keys()) == [] and q.depths() == {}
    assert q.discard("x") is False


def test_lower_priority_value_first() -> None:
    q = PlatformQueues()
    q.push(A, 5, 1, "five")
    q.push(A, -3, 2, "minus-three")
    q.push(A, 0, 3, "zero")
    q.push(A, 100, 4, "hundred")
    assert q.head(A) == (-3, 2, "minus-three")
    assert drain(q, A) == ["minus-three", "zero", "five", "hundred"]
    assert len(q) == 0


def test_fifo_within_a_priority() -> None:
    q = PlatformQueues()
    for seq, name in enumerate(["c", "a", "d", "b"], start=10):
        q.push(A, 1, seq, name)
    q.push(A, 0, 99, "urgent")
    assert drain(q, A) == ["urgent", "c", "a", "d", "b"]


def test_keys_are_independent() -> None:
    q = PlatformQueues()
    q.push(A, 1, 1, "a1")
    q.push(B, 0, 2, "b1")
    q.push(A, 0, 3, "a2")
    assert set(q.keys()) == {A, B}
    assert q.depths() == {A: 2, B: 1}
    assert len(q) == 3
    assert drain(q, B) == ["b1"]
    assert set(q.keys()) == {A}
    assert drain(q, A) == ["a2", "a1"]
    assert q.depths() == {}


def test_lazy_discard() -> None:
    q = PlatformQueues()
    for seq, name in enumerate("abcde", start=1):
        q.push(A, 0, seq, name)
    assert q.discard("a") is True
    assert q.discard("a") is False
    assert q.discard("c") is True
    assert "a" not in q and "c" not in q and "b" in q
    assert len(q) == 3 and q.depths() == {A: 3}
    assert q.head(A) == (0, 2, "b")
    assert drain(q, A) == ["b", "d", "e"]


def test_discarding_the_last_member_drops_the_key() -> None:
    q = PlatformQueues()
    q.push(A, 0, 1, "a")
    q.push(B, 0, 2, "b")
    q.discard("a")
    assert list(q.keys()) == [B]
    assert q.head(A) is None and q.pop(A) is None


def test_repush_moves_the_entry() -> None:
    q = PlatformQueues()
    q.push(A, 0, 1, "x")
    q.push(A, 0, 2, "y")
    q.push(A, 0, 3, "x")  # requeued: now behind y
    assert len(q) == 2 and q.depths() == {A: 2}
    assert drain(q, A) == ["y", "x"]
    assert len(q) == 0


def test_repush_to_another_key() -> None:
    q = PlatformQueues()
    q.push(A, 0, 1, "x")
    q.push(B, 0, 2, "x")
    assert q.depths() == {B: 1}
    assert q.pop(A) is None
    assert q.pop(B) == "x"


def test_repush_with_another_priority_and_the_same_seq() -> None:
    q = PlatformQueues()
    q.push(A, 1, 1, "x")
    q.push(A, 5, 2, "y")
    q.push(A, 9, 1, "x")  # same seq, lower urgency: must now come after y
    assert q.head(A) == (5, 2, "y")
    assert drain(q, A) == ["y", "x"]


def test_repush_after_pop_reuses_nothing_stale() -> None:
    q = PlatformQueues()
    q.push(A, 0, 1, "x")
    q.push(A, 0, 2, "y")
    q.push(A, 0, 3, "x")
    assert q.pop(A) == "y"
    q.push(A, 0, 4, "y")
    assert drain(q, A) == ["x", "y"]


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"),
            st.sampled_from([A, B]),
            st.integers(-2, 2),
            st.integers(0, 3),
            st.sampled_from("abcdef"),
        ),
        st.tuples(st.just("discard"), st.sampled_from("abcdef")),
        st.tuples(st.just("pop"), st.sampled_from([A, B])),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_against_a_model(operations: list[tuple]) -> None:
    q = PlatformQueues()
    model: dict[str, tuple[tuple, int, int]] = {}  # name -> (key, priority, seq)
    for op in operations:
        if op[0] == "push":
            _, key, prio, seq, name = op
            q.push(key, prio, seq, name)
            model[name] = (key, prio, seq)
        elif op[0] == "discard":
            assert q.discard(op[1]) == (op[1] in model)
            model.pop(op[1], None)
        else:
            key = op[1]
            members = [(p, s, n) for n, (k, p, s) in model.items() if k == key]
            expected = min(members) if members else None
            assert q.head(key) == expected
            got = q.pop(key)
            assert got == (expected[2] if expected else None)
            if got is not None:
                del model[got]
        assert len(q) == len(model)
        for name in "abcdef":
            assert (name in q) == (name in model)
        depths: dict[tuple, int] = {}
        for k, _, _ in model.values():
            depths[k] = depths.get(k, 0) + 1
        assert q.depths() == depths
        assert set(q.keys()) == set(depths)
