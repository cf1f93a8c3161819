"""ByteStream resource names (reexec.cas.resource)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reexec.cas.digest import Digest, DigestFunction
from reexec.cas.resource import (
    RESERVED_SEGMENTS,
    Compressor,
    ResourceName,
    parse_read_name,
    parse_write_name,
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
SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~"

segment = st.text(SAFE, min_size=1, max_size=12).filter(lambda s: s not in RESERVED_SEGMENTS)
instances = st.lists(segment, max_size=3).map("/".join)


@st.composite
def digests(draw: st.DrawFn) -> Digest:
    fn = draw(st.sampled_from(sorted(LENGTHS)))
    h = draw(st.text(HEX, min_size=LENGTHS[fn], max_size=LENGTHS[fn]))
    return Digest(h, draw(st.integers(0, 2**63 - 1)), fn)


compressors = st.sampled_from([Compressor.IDENTITY, Compressor.ZSTD])
metadata = st.lists(st.text(SAFE + "/", max_size=10), max_size=3).map(
    lambda segs: "".join("/" + s for s in segs)
)

H = "0" * 64
B3 = "b" * 64


@settings(max_examples=150)
@given(instance=instances, digest=digests(), compressor=compressors, meta=metadata)
def test_read_name_round_trip(
    instance: str, digest: Digest, compressor: Compressor, meta: str
) -> None:
    r = ResourceName(instance, digest, compressor)
    assert parse_read_name(r.format()) == r
    assert parse_read_name(r.format() + meta) == r


@settings(max_examples=150)
@given(
    instance=instances,
    digest=digests(),
    compressor=compressors,
    upload=segment,
    meta=metadata,
)
def test_write_name_round_trip(
    instance: str, digest: Digest, compressor: Compressor, upload: str, meta: str
) -> None:
    r = ResourceName(instance, digest, compressor, upload)
    assert parse_write_name(r.format()) == r
    assert parse_write_name(r.format() + meta) == r


@settings(max_examples=50)
@given(instance=instances, digest=digests(), compressor=compressors, upload=segment)
def test_write_names_are_not_read_names_and_vice_versa(
    instance: str, digest: Digest, compressor: Compressor, upload: str
) -> None:
    write = ResourceName(instance, digest, compressor, upload).format()
    read = ResourceName(instance, digest, compressor).format()
    with pytest.raises(InvalidArgument, match="unexpected 'uploads'"):
        parse_read_name(write)
    with pytest.raises(InvalidArgument, match="writes need"):
        parse_write_name(read)


def test_format_examples() -> None:
    d = Digest(H, 12)
    assert ResourceName("", d).format() == f"blobs/{H}/12"
    assert ResourceName("a/b", d).format() == f"a/b/blobs/{H}/12"
    assert (
        ResourceName("i", d, Compressor.ZSTD, "u-1").format()
        == f"i/uploads/u-1/compressed-blobs/zstd/{H}/12"
    )
    b3 = Digest(B3, 7, DigestFunction.BLAKE3)
    assert ResourceName("", b3).format() == f"blobs/blake3/{B3}/7"
    assert ResourceName("", b3, Compressor.ZSTD).format() == f"compressed-blobs/zstd/blake3/{B3}/7"


def test_parse_examples() -> None:
    assert parse_read_name(f"my/inst/blobs/{H}/5") == ResourceName("my/inst", Digest(H, 5))
    assert parse_read_name(f"blobs/{'1' * 40}/5").digest.function is DigestFunction.SHA1
    # 64 hex digits with no function segment are SHA256, never BLAKE3.
    assert parse_read_name(f"blobs/{B3}/5").digest.function is DigestFunction.SHA256
    assert parse_read_name(f"blobs/blake3/{B3}/5").digest.function is DigestFunction.BLAKE3
    # Functions that may stay implicit may also be named.
    assert parse_read_name(f"blobs/sha256/{H}/5") == ResourceName("", Digest(H, 5))
    w = parse_write_name(f"inst/uploads/abc/compressed-blobs/zstd/blake3/{B3}/9/meta/data")
    assert w == ResourceName("inst", Digest(B3, 9, DigestFunction.BLAKE3), Compressor.ZSTD, "abc")


def bad_read(name: str, *needles: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_read_name(name)
    msg = e.value.message
    assert msg.startswith(f"invalid resource name {name[:300]!r}: "), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def bad_write(name: str, *needles: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_write_name(name)
    msg = e.value.message
    assert msg.startswith(f"invalid resource name {name[:300]!r}: "), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_malformed_read_names() -> None:
    bad_read(f"blobs/{H}", "expected .../{hash}/{size}")
    bad_read("blobs", "expected .../{hash}/{size}")
    bad_read(f"blobs/{H}/-5", "size '-5' is not a non-negative integer")
    bad_read(f"blobs/{H}/5x", "size '5x'")
    bad_read(f"blobs/{H}/\u0665", "size '\u0665'")  # a non-ASCII digit
    bad_read(f"blobs/{H}/", "size ''")
    bad_read(f"blobs/{'0' * 63}/5", "cannot infer the digest function", "its length 63")
    bad_read(f"blobs/{'A' * 64}/5", "invalid SHA256 hash", "lowercase hex")
    bad_read(f"blobs/blake3/{'0' * 40}/5", "invalid BLAKE3 hash", "expected 64")
    bad_read(f"blobs/sha3/{H}/5", "unknown digest function 'sha3'")
    bad_read(f"blobs/md5/{'0' * 32}/5", "digest function 'md5' is not supported")
    bad_read(f"compressed-blobs/lz4/{H}/5", "unknown compressor 'lz4'")
    bad_read(f"compressed-blobs/identity/{H}/5", "'identity' is not a valid compressor")
    bad_read(f"compressed-blobs/deflate/{H}/5", "compressor 'deflate' is not supported")
    bad_read("compressed-blobs", "missing compressor after 'compressed-blobs'")
    bad_read(f"inst/actions/blobs/{H}/5", "unexpected 'actions'")
    bad_read(f"uploads/u/blobs/{H}/5", "unexpected 'uploads'")
    bad_read(f"a//b/blobs/{H}/5", "empty path segment in instance name")
    bad_read(f"/blobs/{H}/5", "empty path segment in instance name")
    bad_read(f"a/{H}/5", "expected '{instance}/blobs/{hash}/{size}'")
    bad_read("", "expected '{instance}/blobs/{hash}/{size}'")


def test_upper_case_hash_with_metadata_names_the_hash() -> None:
    # With trailing metadata the parser must still blame the hash, not invent a function name.
    bad_read(f"blobs/{'A' * 64}/5/meta", "invalid SHA256 hash", "lowercase hex")
    bad_read(f"blobs/blake3/{'A' * 64}/5/meta", "invalid BLAKE3 hash", "lowercase hex")


def test_malformed_write_names() -> None:
    bad_write(f"blobs/{H}/5", "writes need '{instance}/uploads/{uuid}/blobs/{hash}/{size}'")
    bad_write(f"uploads/blobs/{H}/5", "missing upload uuid")
    bad_write(f"uploads//blobs/{H}/5", "missing upload uuid")
    bad_write("uploads/u", "expected 'uploads/{uuid}/blobs/{hash}/{size}'")
    bad_write("uploads", "expected 'uploads/{uuid}/blobs/{hash}/{size}'")
    bad_write(f"uploads/u/{H}/5", "expected 'blobs' or 'compressed-blobs' after the uuid")
    bad_write(f"uploads/u/blobs/{H}", "expected .../{hash}/{size}")
    bad_write(f"uploads/u/blobs/{H}/-1", "size '-1' is not a non-negative integer")
    bad_write(f"uploads/u/compressed-blobs/identity/{H}/5", "'identity' is not a valid")
    bad_write(f"uploads/u/compressed-blobs/brotli/{H}/5", "'brotli' is not supported")
    bad_write(f"a//uploads/u/blobs/{H}/5", "empty path segment in instance name")
    bad_write(f"inst/operations/uploads/u/blobs/{H}/5", "writes need")
    bad_write("inst/nothing/here", "expected '{instance}/uploads/{uuid}/blobs/{hash}/{size}'")


@settings(max_examples=100)
@given(instance=instances, digest=digests(), reserved=st.sampled_from(sorted(RESERVED_SEGMENTS)))
def test_reserved_word_in_instance_rejected(instance: str, digest: Digest, reserved: str) -> None:
    assume(reserved not in ("blobs", "compressed-blobs"))
    name = ResourceName(f"{instance}/{reserved}" if instance else reserved, digest).format()
    with pytest.raises(InvalidArgument, match=f"unexpected '{reserved}'"):
        parse_read_name(name)


@settings(max_examples=100)
@given(instance=instances, digest=digests(), size=st.integers(-(2**40), -1))
def test_negative_size_rejected_everywhere(instance: str, digest: Digest, size: int) -> None:
    name = ResourceName(instance, digest._replace(size=0)).format()
    name = name[: name.rfind("/")] + f"/{size}"
    bad_read(name, f"size '{size}' is not a non-negative integer")
