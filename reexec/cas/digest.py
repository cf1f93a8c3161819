"""Digests and digest functions.

`Digest` is the internal record for a blob's identity. It carries the digest function, so blobs
of different functions never collide in any store even when their hashes have the same length
(SHA256 and BLAKE3 both use 64 hex digits).
"""

from __future__ import annotations

import enum
import hashlib
import re
from itertools import repeat
from typing import NamedTuple, Protocol

import blake3

from reexec.errors import InvalidArgument


class DigestFunction(enum.IntEnum):
    """Values of build.bazel.remote.execution.v2.DigestFunction.Value."""

    UNKNOWN = 0
    SHA256 = 1
    SHA1 = 2
    MD5 = 3
    VSO = 4
    SHA384 = 5
    SHA512 = 6
    MURMUR3 = 7
    SHA256TREE = 8
    BLAKE3 = 9


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


_HEX_LENGTH: dict[DigestFunction, int] = {
    DigestFunction.SHA256: 64,
    DigestFunction.SHA1: 40,
    DigestFunction.SHA384: 96,
    DigestFunction.SHA512: 128,
    DigestFunction.BLAKE3: 64,
}

SUPPORTED_FUNCTIONS: tuple[DigestFunction, ...] = tuple(_HEX_LENGTH)

# Functions a client may leave implicit: the hash length identifies them. BLAKE3 has the same
# length as SHA256, so REAPI requires it to be named explicitly.
_INFERRED_BY_LENGTH: dict[int, DigestFunction] = {
    40: DigestFunction.SHA1,
    64: DigestFunction.SHA256,
    96: DigestFunction.SHA384,
    128: DigestFunction.SHA512,
}

# Functions that must appear in resource names as a path segment (REAPI: every function
# except MD5, MURMUR3, SHA1, SHA256, SHA384, SHA512 and VSO).
EXPLICIT_IN_RESOURCE_NAMES: frozenset[DigestFunction] = frozenset({DigestFunction.BLAKE3})

_HEX = re.compile(r"[0-9a-f]+")


def new_hasher(function: DigestFunction) -> Hasher:
    if function is DigestFunction.BLAKE3:
        return blake3.blake3(max_threads=1)
    if function is DigestFunction.SHA256:
        return hashlib.sha256()
    if function is DigestFunction.SHA1:
        return hashlib.sha1()
    if function is DigestFunction.SHA384:
        return hashlib.sha384()
    if function is DigestFunction.SHA512:
        return hashlib.sha512()
    raise InvalidArgument(f"digest function {function.name} is not supported")


class Digest(NamedTuple):
    """A blob's identity: hash (lowercase hex), size in bytes, and the function that made it."""

    hash: str
    size: int
    function: DigestFunction = DigestFunction.SHA256

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"

    @property
    def blob_path(self) -> str:
        """`blobs/{function/}{hash}/{size}` as used in resource names and MISSING subjects."""
        if self.function in EXPLICIT_IN_RESOURCE_NAMES:
            return f"blobs/{self.function.name.lower()}/{self.hash}/{self.size}"
        return f"blobs/{self.hash}/{self.size}"


def digest_of(data: bytes | memoryview, function: DigestFunction = DigestFunction.SHA256) -> Digest:
    h = new_hasher(function)
    h.update(data)
    return Digest(h.hexdigest(), len(data), function)


_EMPTY: dict[DigestFunction, Digest] = {f: digest_of(b"", f) for f in SUPPORTED_FUNCTIONS}


def empty_digest(function: DigestFunction) -> Digest:
    return _EMPTY[function]


def is_empty(digest: Digest) -> bool:
    return digest.size == 0 and _EMPTY[digest.function].hash == digest.hash


def resolve_function(requested: int, hash_hex: str) -> DigestFunction:
    """The digest function for a request: its explicit field, else inferred from the hash length."""
    if requested:
        try:
            function = DigestFunction(requested)
        except ValueError:
            raise InvalidArgument(f"unknown digest function value {requested}") from None
        if function not in _HEX_LENGTH:
            raise InvalidArgument(
                f"digest function {function.name} is not supported; supported: "
                + ", ".join(f.name for f in SUPPORTED_FUNCTIONS)
            )
        return function
    function = _INFERRED_BY_LENGTH.get(len(hash_hex))
    if function is None:
        raise InvalidArgument(
            f"cannot infer the digest function of hash {hash_hex[:140]!r}: its length "
            f"{len(hash_hex)} matches none of SHA1 (40), SHA256 (64), SHA384 (96), SHA512 (128)"
        )
    return function


def parse_function_name(name: str) -> DigestFunction:
    """A digest function from its lowercase resource-name form (e.g. `blake3`)."""
    try:
        function = DigestFunction[name.upper()]
    except KeyError:
        raise InvalidArgument(f"unknown digest function {name!r} in resource name") from None
    if function not in _HEX_LENGTH or function is DigestFunction.UNKNOWN:
        raise InvalidArgument(f"digest function {name!r} is not supported")
    return function


def make_digest(hash_hex: str, size: int, requested_function: int = 0) -> Digest:
    """Validate a wire digest and return the internal record.

    Raises InvalidArgument for a malformed hash, a length that does not fit the function, or a
    negative size.
    """
    function = resolve_function(requested_function, hash_hex)
    expected = _HEX_LENGTH[function]
    if len(hash_hex) != expected or not _HEX.fullmatch(hash_hex):
        raise InvalidArgument(
            f"invalid {function.name} hash {hash_hex[:140]!r}: expected {expected} lowercase hex digits"
        )
    if size < 0:
        raise InvalidArgument(f"invalid digest {hash_hex}/{size}: size_bytes must not be negative")
    return Digest(hash_hex, size, function)


def hex_length(function: DigestFunction) -> int:
    return _HEX_LENGTH[function]


def _all_lower_hex(text: str) -> bool:
    # bytes.fromhex is C-fast but accepts upper case and skips whitespace; rule both out.
    try:
        return len(bytes.fromhex(text)) * 2 == len(text) and text == text.lower()
    except ValueError:
        return False


def make_digests(hashes: list[str], sizes: list[int], requested_function: int = 0) -> list[Digest]:
    """Validate many wire digests at once (FindMissingBlobs with thousands of entries).

    The common case - one function, all well formed - is checked with a handful of C-level
    passes; anything unusual falls back to `make_digest` per entry for its precise error.
    """
    if not hashes:
        return []
    lengths = set(map(len, hashes))
    function: DigestFunction | None = None
    if len(lengths) == 1:
        (length,) = lengths
        function = resolve_function(requested_function, hashes[0])
        if _HEX_LENGTH[function] != length:
            function = None
    if function is not None and min(sizes) >= 0 and _all_lower_hex("".join(hashes)):
        # tuple.__new__ builds each NamedTuple in C (Digest._make is a Python call per item).
        return list(map(tuple.__new__, repeat(Digest), zip(hashes, sizes, repeat(function))))
    return [make_digest(h, s, requested_function) for h, s in zip(hashes, sizes, strict=True)]
