"""ByteStream resource names.

Read:  `{instance}/blobs/{function/}{hash}/{size}{/metadata}`
       `{instance}/compressed-blobs/{compressor}/{function/}{hash}/{size}{/metadata}`
Write: `{instance}/uploads/{uuid}/` followed by either of the above (without the instance).
The instance may span several segments and is empty when the name starts with a keyword.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from reexec.cas.digest import (
    EXPLICIT_IN_RESOURCE_NAMES,
    Digest,
    make_digest,
    parse_function_name,
)
from reexec.errors import InvalidArgument

RESERVED_SEGMENTS = frozenset(
    {
        "blobs",
        "uploads",
        "actions",
        "actionResults",
        "operations",
        "capabilities",
        "compressed-blobs",
    }
)


class Compressor(enum.IntEnum):
    """Values of build.bazel.remote.execution.v2.Compressor.Value."""

    IDENTITY = 0
    ZSTD = 1
    DEFLATE = 2
    BROTLI = 3


SUPPORTED_COMPRESSORS: frozenset[Compressor] = frozenset({Compressor.IDENTITY, Compressor.ZSTD})


@dataclass(frozen=True, slots=True)
class ResourceName:
    instance: str
    digest: Digest
    compressor: Compressor = Compressor.IDENTITY
    upload_id: str | None = None

    def format(self) -> str:
        """The canonical name (no metadata); `parse_*` of it gives back an equal record."""
        parts: list[str] = [self.instance] if self.instance else []
        if self.upload_id is not None:
            parts += ["uploads", self.upload_id]
        if self.compressor is Compressor.IDENTITY:
            parts.append("blobs")
        else:
            parts += ["compressed-blobs", self.compressor.name.lower()]
        if self.digest.function in EXPLICIT_IN_RESOURCE_NAMES:
            parts.append(self.digest.function.name.lower())
        parts += [self.digest.hash, str(self.digest.size)]
        return "/".join(parts)


def _bad(name: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"invalid resource name {name[:300]!r}: {why}")


def _parse_blob_part(name: str, segs: list[str], i: int) -> tuple[Digest, Compressor]:
    """Parse from the `blobs` / `compressed-blobs` keyword at segs[i] to the size."""
    compressor = Compressor.IDENTITY
    if segs[i] == "compressed-blobs":
        i += 1
        if i >= len(segs):
            raise _bad(name, "missing compressor after 'compressed-blobs'")
        try:
            compressor = Compressor[segs[i].upper()]
        except KeyError:
            raise _bad(name, f"unknown compressor {segs[i]!r}") from None
        if compressor is Compressor.IDENTITY:
            raise _bad(name, "'identity' is not a valid compressor for compressed-blobs")
        if compressor not in SUPPORTED_COMPRESSORS:
            raise _bad(name, f"compressor {segs[i]!r} is not supported (supported: zstd)")
    i += 1
    rest = segs[i:]
    function = 0
    if len(rest) >= 3 and _names_function(rest[0]):
        try:
            function = int(parse_function_name(rest[0]))
        except InvalidArgument as e:
            raise _bad(name, e.message) from None
        rest = rest[1:]
    if len(rest) < 2:
        raise _bad(name, "expected .../{hash}/{size}")
    hash_hex, size_text = rest[0], rest[1]
    if not size_text.isdigit() or not size_text.isascii():
        raise _bad(name, f"size {size_text!r} is not a non-negative integer")
    try:
        return make_digest(hash_hex, int(size_text), function), compressor
    except InvalidArgument as e:
        raise _bad(name, e.message) from None


def _names_function(segment: str) -> bool:
    # Every function name has a non-hex letter (sha256, blake3, md5, ...). A segment of hex
    # digits, even upper-case ones, is a (possibly malformed) hash: make_digest names its fault.
    return not segment or not all(c in "0123456789abcdefABCDEF" for c in segment)


def _instance(name: str, segs: list[str], end: int) -> str:
    instance_segs = segs[:end]
    for s in instance_segs:
        if s == "":
            raise _bad(name, "empty path segment in instance name")
    return "/".join(instance_segs)


def parse_read_name(name: str) -> ResourceName:
    segs = name.split("/")
    for i, s in enumerate(segs):
        if s in ("blobs", "compressed-blobs"):
            digest, compressor = _parse_blob_part(name, segs, i)
            return ResourceName(_instance(name, segs, i), digest, compressor)
        if s in RESERVED_SEGMENTS:
            raise _bad(name, f"unexpected {s!r}; expected '{{instance}}/blobs/{{hash}}/{{size}}'")
    raise _bad(name, "expected '{instance}/blobs/{hash}/{size}' or '.../compressed-blobs/zstd/...'")


def parse_write_name(name: str) -> ResourceName:
    segs = name.split("/")
    for i, s in enumerate(segs):
        if s == "uploads":
            if i + 2 >= len(segs):
                raise _bad(name, "expected 'uploads/{uuid}/blobs/{hash}/{size}'")
            upload_id = segs[i + 1]
            if not upload_id or upload_id in RESERVED_SEGMENTS:
                raise _bad(name, "missing upload uuid after 'uploads'")
            if segs[i + 2] not in ("blobs", "compressed-blobs"):
                raise _bad(
                    name,
                    f"expected 'blobs' or 'compressed-blobs' after the uuid, got {segs[i + 2]!r}",
                )
            digest, compressor = _parse_blob_part(name, segs, i + 2)
            return ResourceName(_instance(name, segs, i), digest, compressor, upload_id)
        if s in RESERVED_SEGMENTS:
            raise _bad(name, "writes need '{instance}/uploads/{uuid}/blobs/{hash}/{size}'")
    raise _bad(name, "expected '{instance}/uploads/{uuid}/blobs/{hash}/{size}'")
