"""The table of validated Actions and Commands: bounds, and takes that empty it."""

from __future__ import annotations

from reexec.cas.digest import DigestFunction, make_digest
from reexec.sched.action_blobs import ActionBlobs


def _d(i: int):  # type: ignore[no-untyped-def]
    return make_digest(f"{i:064x}", 10, int(DigestFunction.SHA256))


def test_take_returns_what_was_put_once() -> None:
    t = ActionBlobs()
    t.put(_d(1), b"action", b"command")
    assert t.take(_d(1)) == (b"action", b"command")
    assert t.take(_d(1)) is None
    assert (t.hits, t.misses, len(t), t.bytes) == (1, 1, 0, 0)


def test_bounded_by_entries_and_bytes_oldest_first() -> None:
    t = ActionBlobs(max_entries=3, max_bytes=100, max_entry_bytes=70)
    for i in range(5):
        t.put(_d(i), b"a" * 10, b"c" * 10)
    assert len(t) == 3 and t.take(_d(1)) is None and t.take(_d(2)) is not None
    t.put(_d(9), b"a" * 35, b"c" * 30)  # 20 + 20 + 65 > 100: the oldest goes
    assert t.bytes <= 100 and t.take(_d(3)) is None and t.take(_d(9)) is not None
    t.put(_d(10), b"a" * 40, b"c" * 40)  # larger than one entry may be: not kept
    assert t.take(_d(10)) is None


def test_putting_again_replaces_and_counts_once() -> None:
    t = ActionBlobs()
    t.put(_d(1), b"a", b"c")
    t.put(_d(1), b"a", b"c")
    assert len(t) == 1 and t.bytes == 2
