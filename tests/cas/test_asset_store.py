"""The Remote Asset index: exact keys, expiry, oldest-accepted, LRU bound, guarded drops."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from reexec.cas.asset_store import Asset, AssetIndex, AssetKey, AssetKind
from reexec.cas.digest import Digest, DigestFunction


def digest(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data), DigestFunction.SHA256)


def key(uri: str, kind: AssetKind = AssetKind.BLOB, **qualifiers: str) -> AssetKey:
    return AssetKey("", kind, uri, frozenset(qualifiers.items()))


def asset(data: bytes = b"x", pushed_at: float = 100.0, expire_at: float | None = None) -> Asset:
    return Asset(digest(data), (), (), pushed_at, expire_at)


def test_put_under_every_uri_then_get() -> None:
    index = AssetIndex()
    a = asset()
    index.put([key("urn:a"), key("urn:b")], a)
    assert index.get(key("urn:a"), now=101) is a
    assert index.get(key("urn:b"), now=101) is a
    assert index.get(key("urn:c"), now=101) is None


def test_qualifiers_match_as_an_exact_set_and_kinds_are_separate() -> None:
    index = AssetIndex()
    index.put([key("urn:a", commit="1")], asset())
    assert index.get(key("urn:a"), now=0) is None
    assert index.get(key("urn:a", commit="2"), now=0) is None
    assert index.get(key("urn:a", commit="1", extra="x"), now=0) is None
    assert index.get(key("urn:a", AssetKind.DIRECTORY, commit="1"), now=0) is None
    assert index.get(key("urn:a", commit="1"), now=0) is not None


def test_expired_entry_is_dropped() -> None:
    index = AssetIndex()
    index.put([key("urn:a")], asset(expire_at=200.0))
    assert index.get(key("urn:a"), now=199.9) is not None
    assert index.get(key("urn:a"), now=200.0) is None
    assert len(index) == 0 and index.expired == 1


def test_too_old_for_one_client_stays_for_others() -> None:
    index = AssetIndex()
    index.put([key("urn:a")], asset(pushed_at=100.0))
    assert index.get(key("urn:a"), now=150, oldest_accepted=120.0) is None
    assert index.get(key("urn:a"), now=150, oldest_accepted=90.0) is not None
    assert index.get(key("urn:a"), now=150) is not None


def test_push_replaces_and_drop_only_removes_the_checked_asset() -> None:
    index = AssetIndex()
    old, new = asset(b"old"), asset(b"new")
    index.put([key("urn:a")], old)
    index.put([key("urn:a")], new)
    index.drop_incomplete(key("urn:a"), old)  # a check of the old asset finishing late
    assert index.get(key("urn:a"), now=0) is new
    index.drop_incomplete(key("urn:a"), new)
    assert index.get(key("urn:a"), now=0) is None


@given(st.lists(st.integers(0, 30), max_size=200), st.integers(1, 10))
def test_lru_bound_holds_and_keeps_most_recent(uris: list[int], bound: int) -> None:
    index = AssetIndex(max_entries=bound)
    for u in uris:
        index.put([key(f"urn:{u}")], asset())
        assert len(index) <= bound
    recent = list(dict.fromkeys(reversed(uris)))[:bound]
    for u in recent:
        assert index.get(key(f"urn:{u}"), now=0) is not None
