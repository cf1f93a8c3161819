"""PendingResults: oldest first, bounded by count and bytes, each result removed once sent."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reexec.sandbox.pending_results import PendingResults
from reexec.worker_protocol import WorkerMessage


def finished(name: str, attempt: int = 1, size: int = 0) -> WorkerMessage:
    msg = WorkerMessage()
    msg.finished.operation_name, msg.finished.attempt = name, attempt
    msg.finished.result.stdout_raw = b"x" * size
    return msg


def test_oldest_first_and_removed_once_sent():
    p = PendingResults(10, 10**6)
    assert p.oldest() is None
    p.add(("a", 1), finished("a"))
    p.add(("b", 2), finished("b", 2))
    assert p.keys() == [("a", 1), ("b", 2)]
    key, msg = p.oldest()  # type: ignore[misc]
    assert key == ("a", 1) and msg.finished.operation_name == "a"
    assert p.remove(("a", 1))
    assert not p.remove(("a", 1))
    assert p.keys() == [("b", 2)] and ("b", 2) in p and len(p) == 1


def test_count_bound_drops_the_oldest():
    p = PendingResults(2, 10**6)
    assert p.add(("a", 1), finished("a")) == []
    assert p.add(("b", 1), finished("b")) == []
    assert p.add(("c", 1), finished("c")) == [("a", 1)]
    assert p.keys() == [("b", 1), ("c", 1)]
    assert p.dropped == 1


def test_byte_bound_drops_the_oldest_and_counts_serialized_bytes():
    one = finished("a", size=1000).ByteSize()
    p = PendingResults(100, 2 * one + 10)
    p.add(("a", 1), finished("a", size=1000))
    p.add(("b", 1), finished("b", size=1000))
    assert p.bytes == 2 * one
    assert p.add(("c", 1), finished("c", size=1000)) == [("a", 1)]
    assert p.bytes == 2 * one


def test_a_result_larger_than_the_byte_bound_is_dropped_itself():
    p = PendingResults(100, 100)
    p.add(("a", 1), finished("a"))
    assert p.add(("big", 1), finished("big", size=1000)) == [("a", 1), ("big", 1)]
    assert len(p) == 0 and p.bytes == 0


def test_the_same_attempt_is_held_once():
    p = PendingResults(10, 10**6)
    p.add(("a", 1), finished("a", size=10))
    p.add(("a", 1), finished("a", size=20))
    assert len(p) == 1 and p.bytes == finished("a", size=20).ByteSize()


def test_bounds_must_be_positive():
    with pytest.raises(ValueError):
        PendingResults(0, 1)
    with pytest.raises(ValueError):
        PendingResults(1, 0)


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 300)),
        max_size=60,
    ),
    st.integers(1, 5),
    st.integers(1, 1500),
)
def test_bounds_and_byte_count_always_hold(ops, max_count, max_bytes):
    p = PendingResults(max_count, max_bytes)
    model: dict[tuple[str, int], int] = {}
    for add, n, size in ops:
        key = (f"op{n}", 1)
        if add:
            msg = finished(key[0], size=size)
            model.pop(key, None)
            model[key] = msg.ByteSize()
            dropped = p.add(key, msg)
            for d in dropped:
                del model[d]
        else:
            assert p.remove(key) == (model.pop(key, None) is not None)
        assert p.keys() == list(model)
        assert p.bytes == sum(model.values())
        assert len(p) <= max_count and p.bytes <= max_bytes
