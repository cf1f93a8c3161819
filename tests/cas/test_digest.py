"""Digest validation, inference and hashing (reexec.cas.digest)."""

from __future__ import annotations

import hashlib

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reexec.cas.digest import (
    EXPLICIT_IN_RESOURCE_NAMES,
    SUPPORTED_FUNCTIONS,
    Digest,
    DigestFunction,
    digest_of,
    empty_digest,
    hex_length,
    is_empty,
    make_digest,
    make_digests,
    new_hasher,
    parse_function_name,
    resolve_function,
)
from reexec.errors import InvalidArgument

HEX = "0123456789abcdef"
LENGTHS = {
    DigestFunction.SHA256: 64,
    DigestFunction.SHA1: 40,
    DigestFunction.SHA384: 96,
    DigestFunction.SHA512: 128,
    DigestFunction.BLAKE3: 64,
}
INFERRED = {40: DigestFunction.SHA1, 64: DigestFunction.SHA256, 96: DigestFunction.SHA384}
INFERRED[128] = DigestFunction.SHA512

functions = st.sampled_from(sorted(LENGTHS))


def reference_hash(data: bytes, function: DigestFunction) -> str:
    if function is DigestFunction.BLAKE3:
        return blake3.blake3(data).hexdigest()
    return hashlib.new(function.name.lower(), data).hexdigest()


@st.composite
def valid_hashes(draw: st.DrawFn, function: DigestFunction | None = None) -> tuple[str, int]:
    fn = function if function is not None else draw(functions)
    return draw(st.text(HEX, min_size=LENGTHS[fn], max_size=LENGTHS[fn])), int(fn)


def test_supported_functions_and_lengths() -> None:
    assert set(SUPPORTED_FUNCTIONS) == set(LENGTHS)
    for fn, n in LENGTHS.items():
        assert hex_length(fn) == n
    assert frozenset({DigestFunction.BLAKE3}) == EXPLICIT_IN_RESOURCE_NAMES


@settings(max_examples=60)
@given(data=st.data(), size=st.integers(0, 2**63 - 1))
def test_make_digest_explicit_function_round_trip(data: st.DataObject, size: int) -> None:
    fn = data.draw(functions)
    h, _ = data.draw(valid_hashes(fn))
    d = make_digest(h, size, int(fn))
    assert d == Digest(h, size, fn)
    assert d.function is fn
    assert str(d) == f"{h}/{size}"


@settings(max_examples=60)
@given(length=st.sampled_from(sorted(INFERRED)), data=st.data(), size=st.integers(0, 10**12))
def test_make_digest_infers_function_from_length(
    length: int, data: st.DataObject, size: int
) -> None:
    h = data.draw(st.text(HEX, min_size=length, max_size=length))
    d = make_digest(h, size)
    assert d.function is INFERRED[length]
    assert resolve_function(0, h) is INFERRED[length]


def test_64_hex_digits_without_function_is_sha256_never_blake3() -> None:
    h = "ab" * 32
    assert make_digest(h, 1).function is DigestFunction.SHA256
    assert make_digest(h, 1, int(DigestFunction.BLAKE3)).function is DigestFunction.BLAKE3
    # Same hash, different function: different identities.
    assert make_digest(h, 1) != make_digest(h, 1, int(DigestFunction.BLAKE3))


@pytest.mark.parametrize("fn", sorted(LENGTHS))
def test_upper_case_hash_rejected(fn: DigestFunction) -> None:
    h = "AB" * (LENGTHS[fn] // 2)
    with pytest.raises(InvalidArgument) as e:
        make_digest(h, 3, int(fn))
    assert f"invalid {fn.name} hash" in e.value.message
    assert "lowercase hex" in e.value.message


@pytest.mark.parametrize("fn", sorted(LENGTHS))
def test_non_hex_hash_rejected(fn: DigestFunction) -> None:
    h = "g" + "0" * (LENGTHS[fn] - 1)
    with pytest.raises(InvalidArgument, match=f"invalid {fn.name} hash .*expected {LENGTHS[fn]}"):
        make_digest(h, 3, int(fn))


@pytest.mark.parametrize("fn", sorted(LENGTHS))
@pytest.mark.parametrize("delta", [-2, -1, 1, 2])
def test_wrong_length_for_explicit_function_rejected(fn: DigestFunction, delta: int) -> None:
    h = "0" * (LENGTHS[fn] + delta)
    with pytest.raises(InvalidArgument) as e:
        make_digest(h, 3, int(fn))
    assert f"expected {LENGTHS[fn]} lowercase hex digits" in e.value.message


@pytest.mark.parametrize("length", [0, 1, 39, 41, 63, 65, 100, 127, 129])
def test_uninferable_length_rejected(length: int) -> None:
    with pytest.raises(InvalidArgument) as e:
        make_digest("a" * length, 1)
    assert "cannot infer the digest function" in e.value.message
    assert f"its length {length} matches none" in e.value.message


def test_negative_size_rejected() -> None:
    h = "0" * 64
    with pytest.raises(InvalidArgument, match="size_bytes must not be negative"):
        make_digest(h, -1)


@pytest.mark.parametrize(
    "value", [DigestFunction.MD5, DigestFunction.VSO, DigestFunction.MURMUR3, 8, 42]
)
def test_unsupported_or_unknown_function_rejected(value: int) -> None:
    with pytest.raises(InvalidArgument) as e:
        make_digest("0" * 32, 1, int(value))
    msg = e.value.message
    if value == 42:
        assert "unknown digest function value 42" in msg
    else:
        assert f"digest function {DigestFunction(value).name} is not supported" in msg
        assert "SHA256" in msg  # lists what is supported


def test_parse_function_name() -> None:
    for fn in LENGTHS:
        assert parse_function_name(fn.name.lower()) is fn
    with pytest.raises(InvalidArgument, match="unknown digest function 'sha3'"):
        parse_function_name("sha3")
    with pytest.raises(InvalidArgument, match="'md5' is not supported"):
        parse_function_name("md5")
    with pytest.raises(InvalidArgument, match="'unknown' is not supported"):
        parse_function_name("unknown")


@settings(max_examples=60)
@given(data=st.binary(max_size=300), fn=functions)
def test_digest_of_matches_reference(data: bytes, fn: DigestFunction) -> None:
    d = digest_of(data, fn)
    assert d == Digest(reference_hash(data, fn), len(data), fn)
    # The result is itself a valid wire digest.
    assert make_digest(d.hash, d.size, int(fn)) == d
    # Incremental hashing agrees with one-shot hashing.
    h = new_hasher(fn)
    for i in range(0, len(data), 7):
        h.update(memoryview(data)[i : i + 7])
    assert h.hexdigest() == d.hash


def test_new_hasher_unsupported() -> None:
    with pytest.raises(InvalidArgument, match="MD5 is not supported"):
        new_hasher(DigestFunction.MD5)


@pytest.mark.parametrize("fn", sorted(LENGTHS))
def test_empty_digests(fn: DigestFunction) -> None:
    e = empty_digest(fn)
    assert e == Digest(reference_hash(b"", fn), 0, fn)
    assert is_empty(e)
    assert is_empty(digest_of(b"", fn))
    assert not is_empty(digest_of(b"x", fn))
    # Size 0 with a different hash is not the empty blob.
    assert not is_empty(Digest("0" * LENGTHS[fn], 0, fn))
    # The SHA256 empty hash under BLAKE3 is not BLAKE3's empty blob.
    if fn is DigestFunction.BLAKE3:
        assert not is_empty(Digest(empty_digest(DigestFunction.SHA256).hash, 0, fn))


def test_blob_path() -> None:
    h = "ab" * 32
    assert Digest(h, 5).blob_path == f"blobs/{h}/5"
    assert Digest(h, 5, DigestFunction.BLAKE3).blob_path == f"blobs/blake3/{h}/5"
    assert Digest("ab" * 20, 0, DigestFunction.SHA1).blob_path == f"blobs/{'ab' * 20}/0"


# -- make_digests agrees with make_digest -----------------------------------------------------


def _per_item(hashes: list[str], sizes: list[int], fn: int) -> list[Digest] | str:
    try:
        return [make_digest(h, s, fn) for h, s in zip(hashes, sizes, strict=True)]
    except InvalidArgument as e:
        return e.message


def _batch(hashes: list[str], sizes: list[int], fn: int) -> list[Digest] | str:
    try:
        return make_digests(hashes, sizes, fn)
    except InvalidArgument as e:
        return e.message


any_hash = st.one_of(
    st.sampled_from(sorted(LENGTHS)).flatmap(
        lambda f: st.text(HEX, min_size=LENGTHS[f], max_size=LENGTHS[f])
    ),
    # Nearly valid: one odd character, or a wrong length.
    st.sampled_from([40, 64, 96, 128]).flatmap(
        lambda n: st.tuples(
            st.text(HEX, min_size=n - 1, max_size=n - 1),
            st.sampled_from("A Fg-\u0660 "),
            st.integers(0, n - 1),
        ).map(lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :])
    ),
    st.text(HEX, max_size=130),
)


@settings(max_examples=150)
@given(
    items=st.lists(st.tuples(any_hash, st.integers(-3, 10**9)), max_size=8),
    fn=st.sampled_from([0, 0, 1, 2, 3, 5, 6, 9, 77]),
)
def test_make_digests_agrees_with_make_digest_random(items: list[tuple[str, int]], fn: int) -> None:
    hashes = [h for h, _ in items]
    sizes = [s for _, s in items]
    assert _batch(hashes, sizes, fn) == _per_item(hashes, sizes, fn)


@settings(max_examples=60)
@given(data=st.data(), n=st.integers(1, 30), explicit=st.booleans())
def test_make_digests_all_valid_one_function(data: st.DataObject, n: int, explicit: bool) -> None:
    fn = data.draw(functions) if explicit else data.draw(st.sampled_from(sorted(INFERRED.values())))
    hashes = data.draw(
        st.lists(st.text(HEX, min_size=LENGTHS[fn], max_size=LENGTHS[fn]), min_size=n, max_size=n)
    )
    sizes = data.draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n))
    got = make_digests(hashes, sizes, int(fn) if explicit else 0)
    assert got == [Digest(h, s, fn) for h, s in zip(hashes, sizes, strict=True)]
    assert all(type(d) is Digest for d in got)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("A" * 64, "lowercase hex"),
        (" " + "0" * 63, "lowercase hex"),
        ("0" * 62 + " 0", "lowercase hex"),
        ("0" * 63 + "\n", "lowercase hex"),
        ("0" * 63 + "\u0660", "lowercase hex"),
    ],
)
def test_make_digests_rejects_one_bad_among_many(bad: str, needle: str) -> None:
    hashes = ["0" * 64, "1" * 64, bad, "2" * 64]
    with pytest.raises(InvalidArgument, match=needle):
        make_digests(hashes, [1, 2, 3, 4])


def test_make_digests_negative_size_among_many() -> None:
    with pytest.raises(InvalidArgument, match="must not be negative"):
        make_digests(["0" * 64, "1" * 64], [1, -1])


def test_make_digests_mixed_functions_by_length() -> None:
    got = make_digests(["0" * 40, "0" * 64, "0" * 128], [1, 2, 3])
    assert [d.function for d in got] == [
        DigestFunction.SHA1,
        DigestFunction.SHA256,
        DigestFunction.SHA512,
    ]


def test_make_digests_empty() -> None:
    assert make_digests([], []) == []
    assert make_digests([], [], int(DigestFunction.BLAKE3)) == []
