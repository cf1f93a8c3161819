"""Which blobs of a Directory tree the CAS lacks: the tree must be whole to be handed out.

Used by the Remote Asset service before it answers FetchDirectory (and for a push's
`references_directories`): a directory whose files were evicted must read as NOT_FOUND, since
the client would otherwise fail half-way through downloading it.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.digest import Digest, make_digest
from reexec.cas.store import BlobNotFound, Store
from reexec.cas.tree_size import MAX_TREE_ENTRIES
from reexec.errors import InvalidArgument

# Parallel directory reads within one level.
_READ_CONCURRENCY = 16
# A level with more directories than this is parsed in a worker thread.
_THREAD_THRESHOLD = 256


async def missing_tree_blobs(cas: Store, roots: Sequence[Digest]) -> list[Digest]:
    """Every directory and file blob under `roots` (roots included) that `cas` lacks.

    Each distinct directory is read once, so a DAG costs only its distinct nodes; more than
    MAX_TREE_ENTRIES directories is INVALID_ARGUMENT (no input root could be that large).
    A directory that is not a valid Directory message is INVALID_ARGUMENT too.
    """
    missing: list[Digest] = []
    files: set[Digest] = set()
    seen: set[Digest] = set(roots)
    level = list(dict.fromkeys(roots))
    while level:
        raws = await _read_level(cas, level)
        missing.extend(d for d in level if d not in raws)
        if len(raws) > _THREAD_THRESHOLD:
            children, level_files = await trio.to_thread.run_sync(_parse_level, raws)
        else:
            children, level_files = _parse_level(raws)
        files.update(level_files)
        level = []
        for d in children:
            if d in seen:
                continue
            if len(seen) >= MAX_TREE_ENTRIES:
                raise InvalidArgument(f"a tree has more than {MAX_TREE_ENTRIES:,} directories")
            seen.add(d)
            level.append(d)
    if files:
        missing.extend(await cas.find_missing(sorted(files)))
    return missing


async def _read_level(cas: Store, level: list[Digest]) -> dict[Digest, bytes]:
    found: dict[Digest, bytes] = {}
    limiter = trio.CapacityLimiter(_READ_CONCURRENCY)

    async def one(digest: Digest) -> None:
        async with limiter:
            try:
                found[digest] = await cas.get_bytes(digest)
            except BlobNotFound:
                pass

    async with trio.open_nursery() as nursery:
        for digest in level:
            nursery.start_soon(one, digest)
    return found


def _parse_level(raws: dict[Digest, bytes]) -> tuple[list[Digest], list[Digest]]:
    """(subdirectory digests, file digests) of one level (may run in a thread)."""
    dirs: list[Digest] = []
    files: list[Digest] = []
    for digest, raw in raws.items():
        function = int(digest.function)
        try:
            directory = fastpb.Directory.FromString(raw)
        except DecodeError:
            raise InvalidArgument(f"{digest.blob_path} is not a valid Directory") from None
        for child in directory.directories:
            dirs.append(make_digest(child.digest.hash, child.digest.size_bytes, function))
        for f in directory.files:
            files.append(make_digest(f.digest.hash, f.digest.size_bytes, function))
    return dirs, files
