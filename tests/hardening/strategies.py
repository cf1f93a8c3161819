"""Hypothesis strategies for hostile REAPI messages: digests, resource names, DAGs, Commands.

Every strategy builds `reexec.fastpb` (upb) messages, so a test can serialise them to the exact
bytes a client would send and mutate those bytes further. Sizes stay small on purpose: the
known resource-exhaustion defects of issue 9 (huge DAG expansion, huge messages) have their own
tests; here each example must be cheap so that many different ones run.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import zstandard
from hypothesis import strategies as st

from reexec import fastpb

# Blobs that the tests upload before fuzzing, so that digests sometimes name real content.
KNOWN_BLOBS: list[bytes] = [b"", b"a", b"hello world", bytes(range(256)) * 4, b"x" * 5000]


def sha_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(data: bytes) -> Any:
    return fastpb.Digest(hash=sha_hex(data), size_bytes=len(data))


# -- scalars ----------------------------------------------------------------------------------

hex_lengths = st.sampled_from([0, 1, 32, 39, 40, 41, 63, 64, 65, 96, 128, 129, 200])
lower_hex = hex_lengths.flatmap(lambda n: st.text("0123456789abcdef", min_size=n, max_size=n))

hashes = st.one_of(
    lower_hex,
    lower_hex.map(str.upper),
    st.text(max_size=80),  # anything, including non-ASCII, NUL and '/'
    st.sampled_from([sha_hex(b) for b in KNOWN_BLOBS]),
    st.sampled_from(["..", ".", "/", "a" * 64 + "/1", " " + "0" * 63, "0" * 64 + "\n"]),
)

sizes = st.one_of(
    st.integers(min_value=-3, max_value=6000),
    st.sampled_from([-(2**63), -1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]),
)

# Open enums: proto3 lets a client send any int32; 0..9 are the named values.
digest_functions = st.one_of(st.integers(0, 10), st.sampled_from([-1, 2**31 - 1, 1000]))
compressors = st.one_of(st.integers(0, 4), st.sampled_from([-1, 2**31 - 1]))

instance_names = st.one_of(
    st.just(""),
    st.sampled_from(
        [
            "main",
            "a/b",
            "blobs",
            "uploads",
            "a//b",
            "/",
            "a/",
            "/a",
            "..",
            "a/../b",
            "compressed-blobs",
            "x" * 300,
            "in\x00stance",
            "é",
        ]
    ),
    st.text(max_size=40),
)

names = st.one_of(
    st.sampled_from(["", ".", "..", "a", "b", "a/b", "/abs", "a\x00b", "x" * 300, "ü", " "]),
    st.text(max_size=20),
)

simple_names = st.text("abcdefgh", min_size=1, max_size=4)

paths = st.one_of(
    names,
    st.sampled_from(["out/../../etc/passwd", "../x", "a//b", "a/./b", "/etc/passwd", "out/"]),
    st.lists(names, min_size=1, max_size=4).map("/".join),
)


@st.composite
def digests(draw: st.DrawFn) -> Any:
    """A Digest: usually a real one (known blob), often hostile."""
    if draw(st.integers(0, 3)) == 0:
        return digest_of(draw(st.sampled_from(KNOWN_BLOBS)))
    return fastpb.Digest(hash=draw(hashes), size_bytes=draw(sizes))


@st.composite
def durations(draw: st.DrawFn) -> Any:
    return fastpb.Duration(
        seconds=draw(st.one_of(st.integers(-5, 5), st.sampled_from([-(2**63), 2**63 - 1]))),
        nanos=draw(st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 2**31 - 1]))),
    )


# Page tokens: str.isdigit() is true for all but the first two odd ones, int() fails on '²'.
page_tokens = st.one_of(
    st.just(""),
    st.sampled_from(["0", "1", "99", "-1", "\u0661", "\u00b2", "9" * 5000, " 1", "1_0", "0x1"]),
    st.text(max_size=10),
)


# -- resource names ---------------------------------------------------------------------------


@st.composite
def blob_parts(draw: st.DrawFn, data: bytes | None = None) -> str:
    """`blobs/...` or `compressed-blobs/...` followed by function, hash, size, metadata."""
    parts: list[str] = []
    kind = draw(st.sampled_from(["blobs", "compressed-blobs", "blobs", "weird"]))
    if kind == "compressed-blobs":
        parts += [kind, draw(st.sampled_from(["zstd", "deflate", "identity", "ZSTD", "", "x"]))]
    elif kind == "weird":
        parts.append(draw(st.sampled_from(["blob", "uploads", "actions", ""])))
    else:
        parts.append(kind)
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from(["sha256", "blake3", "md5", "sha1", "SHA256", "x"])))
    if data is not None and draw(st.booleans()):
        parts += [sha_hex(data), str(len(data))]
    else:
        parts.append(draw(hashes))
        parts.append(
            draw(st.one_of(sizes.map(str), st.sampled_from(["", "1e3", "+1", "٣", " 1", "0x10"])))
        )
    parts += draw(st.lists(names, max_size=2))  # optional metadata
    return "/".join(parts)


@st.composite
def read_names(draw: st.DrawFn) -> str:
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return draw(st.text(max_size=120))
    instance = draw(instance_names)
    blob = draw(blob_parts(data=draw(st.sampled_from(KNOWN_BLOBS))))
    return f"{instance}/{blob}" if instance or choice == 1 else blob


@st.composite
def upload_ids(draw: st.DrawFn) -> str:
    return draw(
        st.one_of(
            st.just(str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))),
            st.sampled_from(["", "blobs", "uploads", "not-a-uuid", "..", "x" * 200]),
        )
    )


@st.composite
def write_names(draw: st.DrawFn, data: bytes | None = None) -> str:
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(st.text(max_size=120))
    instance = draw(instance_names)
    prefix = f"{instance}/" if instance else ""
    if choice == 1:
        return prefix + draw(blob_parts(data=data))  # a read name used for a write
    return f"{prefix}uploads/{draw(upload_ids())}/{draw(blob_parts(data=data))}"


# -- Directory DAGs ---------------------------------------------------------------------------


@st.composite
def node_properties(draw: st.DrawFn) -> Any:
    props = fastpb.NodeProperties()
    for _ in range(draw(st.integers(0, 2))):
        props.properties.add(name=draw(names), value=draw(names))
    if draw(st.booleans()):
        props.mtime.seconds = draw(st.integers(-(2**40), 2**40))
        props.mtime.nanos = draw(st.sampled_from([0, 5, -1, 10**9]))
    if draw(st.booleans()):
        props.unix_mode.value = draw(st.sampled_from([0, 0o755, 0o7777, 0o170000, 2**32 - 1]))
    return props


@st.composite
def directory_dags(draw: st.DrawFn) -> tuple[Any, list[bytes]]:
    """A small DAG of Directory messages built bottom-up: returns the root's digest and every
    serialised Directory (all uploadable: each is named by its true digest, but names, sizes,
    order, duplicates, links to missing children and properties are hostile)."""
    blobs: list[bytes] = []
    level: list[Any] = []  # digests of the directories made so far
    for _ in range(draw(st.integers(1, 5))):
        d = fastpb.Directory()
        for _ in range(draw(st.integers(0, 3))):
            f = d.files.add(name=draw(names), is_executable=draw(st.booleans()))
            f.digest.CopyFrom(draw(digests()))
            if draw(st.integers(0, 4)) == 0:
                f.node_properties.CopyFrom(draw(node_properties()))
        for _ in range(draw(st.integers(0, 2))):
            n = d.directories.add(name=draw(names))
            if level and draw(st.integers(0, 3)):
                n.digest.CopyFrom(draw(st.sampled_from(level)))
            else:
                n.digest.CopyFrom(draw(digests()))
        for _ in range(draw(st.integers(0, 2))):
            d.symlinks.add(name=draw(names), target=draw(paths))
        if draw(st.integers(0, 5)) == 0:
            d.node_properties.CopyFrom(draw(node_properties()))
        data = d.SerializeToString(deterministic=True)
        blobs.append(data)
        level.append(digest_of(data))
    return level[-1], blobs


@st.composite
def valid_dags(draw: st.DrawFn) -> tuple[Any, list[bytes]]:
    """A well-formed DAG (sorted unique plain names, files are known blobs)."""
    blobs: list[bytes] = []
    level: list[Any] = []
    for _ in range(draw(st.integers(1, 4))):
        d = fastpb.Directory()
        entry_names = sorted(draw(st.sets(simple_names, max_size=5)))
        for name in entry_names:
            kind = draw(st.integers(0, 2))
            if kind == 0 and level:
                d.directories.add(name=name).digest.CopyFrom(draw(st.sampled_from(level)))
            elif kind == 1:
                d.symlinks.add(name=name, target=draw(simple_names))
            else:
                f = d.files.add(name=name, is_executable=draw(st.booleans()))
                f.digest.CopyFrom(digest_of(draw(st.sampled_from(KNOWN_BLOBS))))
        # Fields must each be sorted by name; a name in two lists is a client error we may send.
        data = d.SerializeToString(deterministic=True)
        blobs.append(data)
        level.append(digest_of(data))
    return level[-1], blobs


def dags() -> st.SearchStrategy[tuple[Any, list[bytes]]]:
    return st.one_of(valid_dags(), directory_dags())


# -- Commands, Actions, ActionResults ---------------------------------------------------------


@st.composite
def platforms(draw: st.DrawFn) -> Any:
    p = fastpb.Platform()
    for _ in range(draw(st.integers(0, 3))):
        p.properties.add(
            name=draw(st.sampled_from(["os", "pool", "cores", "OSFamily", "", "container-image"])),
            value=draw(names),
        )
    return p


@st.composite
def plausible_commands(draw: st.DrawFn) -> Any:
    c = fastpb.Command(arguments=["/bin/true", *draw(st.lists(simple_names, max_size=2))])
    for name in sorted(draw(st.sets(simple_names.map(str.upper), max_size=3))):
        c.environment_variables.add(name=name, value=draw(simple_names))
    c.output_paths.extend(sorted(draw(st.sets(simple_names, max_size=2))))
    return c


@st.composite
def commands(draw: st.DrawFn) -> Any:
    c = fastpb.Command(
        arguments=draw(st.lists(st.text(max_size=30), max_size=4)),
        working_directory=draw(paths),
    )
    for _ in range(draw(st.integers(0, 3))):
        c.environment_variables.add(name=draw(names), value=draw(st.text(max_size=20)))
    kind = draw(st.integers(0, 2))
    if kind == 0:
        c.output_paths.extend(draw(st.lists(paths, max_size=3)))
    elif kind == 1:
        c.output_files.extend(draw(st.lists(paths, max_size=3)))
        c.output_directories.extend(draw(st.lists(paths, max_size=3)))
    if draw(st.booleans()):
        c.platform.CopyFrom(draw(platforms()))
    c.output_node_properties.extend(draw(st.lists(names, max_size=2)))
    return c


@st.composite
def action_results(draw: st.DrawFn) -> Any:
    r = fastpb.ActionResult(exit_code=draw(st.integers(-(2**31), 2**31 - 1)))
    for _ in range(draw(st.integers(0, 3))):
        f = r.output_files.add(path=draw(paths), is_executable=draw(st.booleans()))
        f.digest.CopyFrom(draw(digests()))
        if draw(st.booleans()):
            f.contents = draw(st.binary(max_size=20))
    for _ in range(draw(st.integers(0, 2))):
        od = r.output_directories.add(path=draw(paths))
        od.tree_digest.CopyFrom(draw(digests()))
    for _ in range(draw(st.integers(0, 2))):
        r.output_symlinks.add(path=draw(paths), target=draw(paths))
    if draw(st.booleans()):
        r.stdout_digest.CopyFrom(draw(digests()))
    if draw(st.booleans()):
        r.stderr_raw = draw(st.binary(max_size=50))
    if draw(st.booleans()):
        r.execution_metadata.worker = draw(names)
        r.execution_metadata.worker_start_timestamp.seconds = draw(sizes)
    return r


# -- byte mutation ----------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few random byte-level edits (flip, insert, delete, truncate, splice)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(buf)))
        if op == 0 and pos < len(buf):
            buf[pos] ^= draw(st.integers(1, 255))
        elif op == 1:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2 and pos < len(buf):
            del buf[pos : pos + draw(st.integers(1, 8))]
        elif op == 3:
            del buf[pos:]
        else:
            buf[pos:pos] = buf[: draw(st.integers(0, 16))]
    return bytes(buf)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)
