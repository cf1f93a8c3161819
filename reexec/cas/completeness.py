"""Which CAS blobs an ActionResult names, and an action cache that hides incomplete entries.

An AC entry whose outputs were evicted from the CAS is worse than a miss: the client would take
the hit and then fail to download. `CompletenessCheckingActionCache` reports such entries as
misses; the same check makes UpdateActionResult refuse entries that name missing blobs.
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.action_cache import ActionCache, ActionKey
from reexec.cas.digest import Digest, DigestFunction, make_digest
from reexec.cas.store import BlobNotFound, Store
from reexec.errors import InvalidArgument

log = logging.getLogger(__name__)


def wire_digest(d: fastpb.Message, function: DigestFunction) -> Digest:
    """Validate a wire Digest (fastpb) and return the internal record."""
    return make_digest(d.hash, d.size_bytes, int(function))  # type: ignore[attr-defined]


def _collect_files(tree: fastpb.Message, function: DigestFunction, out: list[Digest]) -> None:
    for directory in (tree.root, *tree.children):  # type: ignore[attr-defined]
        for f in directory.files:
            out.append(wire_digest(f.digest, function))


def direct_references(result: fastpb.Message, function: DigestFunction) -> list[Digest]:
    """Digests named directly by an ActionResult (files, trees, logs), not inside trees."""
    out: list[Digest] = []
    for f in result.output_files:  # type: ignore[attr-defined]
        out.append(wire_digest(f.digest, function))
    for d in result.output_directories:  # type: ignore[attr-defined]
        out.append(wire_digest(d.tree_digest, function))
        if d.HasField("root_directory_digest") and d.root_directory_digest.hash:
            out.append(wire_digest(d.root_directory_digest, function))
    for field in ("stdout_digest", "stderr_digest"):
        if result.HasField(field):  # type: ignore[attr-defined]
            d = getattr(result, field)
            if d.hash:
                out.append(wire_digest(d, function))
    return out


async def missing_references(
    result: fastpb.Message, function: DigestFunction, cas: Store
) -> list[Digest]:
    """Every blob the ActionResult needs that the CAS lacks, including files inside its trees."""
    direct = direct_references(result, function)
    missing = await cas.find_missing(direct)
    missing_set = set(missing)
    nested: list[Digest] = []
    for d in result.output_directories:  # type: ignore[attr-defined]
        tree_digest = wire_digest(d.tree_digest, function)
        if tree_digest in missing_set:
            continue
        try:
            tree = fastpb.Tree.FromString(await cas.get_bytes(tree_digest))
        except BlobNotFound:
            missing.append(tree_digest)
            continue
        except DecodeError:
            raise InvalidArgument(
                f"output directory {d.path!r}: tree {tree_digest.blob_path} is not a valid Tree"
            ) from None
        _collect_files(tree, function, nested)
    if nested:
        missing.extend(await cas.find_missing(nested))
    return list(dict.fromkeys(missing))


class CompletenessCheckingActionCache(ActionCache):
    def __init__(self, inner: ActionCache, cas: Store) -> None:
        self.inner = inner
        self.cas = cas
        self.incomplete = 0

    async def get(self, key: ActionKey) -> bytes | None:
        data = await self.inner.get(key)
        if data is None:
            return None
        try:
            result = fastpb.ActionResult.FromString(data)
            missing = await missing_references(result, key.digest.function, self.cas)
        except (DecodeError, InvalidArgument) as e:
            log.warning("ignoring unreadable action cache entry %s: %s", key.digest, e)
            return None
        if missing:
            self.incomplete += 1
            log.debug(
                "action cache entry %s hidden: %d referenced blob(s) gone, e.g. %s",
                key.digest,
                len(missing),
                missing[0],
            )
            return None
        return data

    async def put(self, key: ActionKey, result: bytes) -> None:
        await self.inner.put(key, result)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def stats(self) -> dict[str, int]:
        return self.inner.stats() | {"incomplete": self.incomplete}
