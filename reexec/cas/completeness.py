"""Which CAS blobs an ActionResult names, and an action cache that hides incomplete entries.

An AC entry whose outputs were evicted from the CAS is worse than a miss: the client would take
the hit and then fail to download. `CompletenessCheckingActionCache` reports such entries as
misses; the same check makes UpdateActionResult refuse entries that name missing blobs.
"""

from __future__ import annotations

import logging

import xxhash
from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.action_cache import WOULD_BLOCK, ActionCache, ActionKey, NoWait
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


# What `_missing_steps` asks its driver for: the missing subset of some digests, or a blob.
_FIND = "find"
_GET = "get"


def _missing_steps(result: fastpb.Message, function: DigestFunction):  # type: ignore[no-untyped-def]
    """The completeness check as a generator, so one body serves the async and the nowait
    driver: it yields (_FIND, digests) to be sent the missing ones, or (_GET, digest) to be
    sent the blob's bytes (None if it is not stored), and returns every missing blob."""
    direct = direct_references(result, function)
    missing: list[Digest] = yield _FIND, direct
    missing_set = set(missing)
    nested: list[Digest] = []
    for d in result.output_directories:  # type: ignore[attr-defined]
        tree_digest = wire_digest(d.tree_digest, function)
        if tree_digest in missing_set:
            continue
        data = yield _GET, tree_digest
        if data is None:
            missing.append(tree_digest)
            continue
        try:
            tree = fastpb.Tree.FromString(data)
        except DecodeError:
            raise InvalidArgument(
                f"output directory {d.path!r}: tree {tree_digest.blob_path} is not a valid Tree"
            ) from None
        _collect_files(tree, function, nested)
    if nested:
        missing.extend((yield _FIND, nested))
    return list(dict.fromkeys(missing))


async def missing_references(
    result: fastpb.Message, function: DigestFunction, cas: Store
) -> list[Digest]:
    """Every blob the ActionResult needs that the CAS lacks, including files inside its trees."""
    steps = _missing_steps(result, function)
    answer = None
    try:
        while True:
            op, arg = steps.send(answer)
            if op is _FIND:
                answer = await cas.find_missing(arg)
            else:
                try:
                    answer = await cas.get_bytes(arg)
                except BlobNotFound:
                    answer = None
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def missing_references_nowait(
    result: fastpb.Message, function: DigestFunction, cas: Store
) -> list[Digest] | None:
    """`missing_references` if the CAS answers every step without waiting, else None."""
    steps = _missing_steps(result, function)
    answer = None
    try:
        while True:
            op, arg = steps.send(answer)
            if op is _FIND:
                answer = cas.find_missing_nowait(arg)
                if answer is None:
                    return None
            else:
                try:
                    answer = cas.get_bytes_nowait(arg)
                except BlobNotFound:
                    answer = None
                else:
                    if answer is None:
                        return None
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def removal_generation(cas: Store) -> tuple[int, int] | None:
    """A value that changes whenever a blob leaves `cas`, or None if the store cannot tell.

    Only stores that count every removal (evictions, and blobs "forgotten" otherwise) qualify.
    """
    stats = cas.stats()
    evictions = stats.get("evictions")
    forgotten = stats.get("forgotten")
    if evictions is None or forgotten is None:
        return None
    return evictions, forgotten


def _fingerprint(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


class CompletenessCheckingActionCache(ActionCache):
    # Bound on remembered keys; past it the memory is simply dropped (next hits re-check).
    MAX_VERIFIED = 100_000

    def __init__(self, inner: ActionCache, cas: Store) -> None:
        self.inner = inner
        self.cas = cas
        self.incomplete = 0
        self.skipped = 0
        # Keys whose entry was complete when last checked, all checked under `_generation`, with
        # a fingerprint of the entry checked: while no blob has left the CAS since and the entry
        # read is the same, it still is, and the check is skipped. The fingerprint matters when
        # the inner cache is shared (redis, grpc): another frontend may replace the entry with
        # one naming blobs this CAS lacks, and no put of ours tells us.
        self._verified: dict[ActionKey, int] = {}
        self._generation: tuple[int, int] | None = None
        self._puts = 0

    def _current_generation(self) -> tuple[int, int] | None:
        """The CAS's removal generation; what was verified under an older one is forgotten."""
        generation = removal_generation(self.cas)
        if generation is None or generation != self._generation:
            self._verified.clear()
            self._generation = generation
        return generation

    async def get(self, key: ActionKey) -> bytes | None:
        generation = self._current_generation()
        puts = self._puts
        data = await self.inner.get(key)
        if data is None:
            return None
        fingerprint = _fingerprint(data)
        if self._verified.get(key) == fingerprint:
            self.skipped += 1
            return data
        checked = await self._check(key, data)
        self._remember(key, fingerprint if checked is not None else None, generation, puts)
        return checked

    def get_nowait(self, key: ActionKey) -> bytes | NoWait | None:
        generation = self._current_generation()
        puts = self._puts
        data = self.inner.get_nowait(key)
        if data is None or data is WOULD_BLOCK:
            return data
        assert isinstance(data, bytes)
        fingerprint = _fingerprint(data)
        if self._verified.get(key) == fingerprint:
            self.skipped += 1
            return data
        checked = self._check_nowait(key, data)
        if checked is WOULD_BLOCK:
            return WOULD_BLOCK
        self._remember(key, fingerprint if checked is not None else None, generation, puts)
        return checked

    def _remember(
        self,
        key: ActionKey,
        fingerprint: int | None,
        generation: tuple[int, int] | None,
        puts: int,
    ) -> None:
        # Remember only if no blob left and no entry was replaced (here) while checking.
        if fingerprint is None:
            self._verified.pop(key, None)
            return
        if (
            generation is not None
            and generation == self._generation == removal_generation(self.cas)
            and puts == self._puts
        ):
            if len(self._verified) >= self.MAX_VERIFIED:
                self._verified.clear()
            self._verified[key] = fingerprint

    async def _check(self, key: ActionKey, data: bytes) -> bytes | None:
        """`data` if every blob it names is in the CAS, else None (an incomplete entry)."""
        try:
            result = fastpb.ActionResult.FromString(data)
            missing = await missing_references(result, key.digest.function, self.cas)
        except (DecodeError, InvalidArgument) as e:
            log.warning("ignoring unreadable action cache entry %s: %s", key.digest, e)
            return None
        return self._verdict(key, data, missing)

    def _check_nowait(self, key: ActionKey, data: bytes) -> bytes | NoWait | None:
        """`_check`'s answer if the CAS gives it without waiting, else WOULD_BLOCK."""
        try:
            result = fastpb.ActionResult.FromString(data)
            missing = missing_references_nowait(result, key.digest.function, self.cas)
        except (DecodeError, InvalidArgument) as e:
            log.warning("ignoring unreadable action cache entry %s: %s", key.digest, e)
            return None
        if missing is None:
            return WOULD_BLOCK
        return self._verdict(key, data, missing)

    def _verdict(self, key: ActionKey, data: bytes, missing: list[Digest]) -> bytes | None:
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
        # Before and after: a check overlapping any part of the put is not remembered.
        self._verified.pop(key, None)
        self._puts += 1
        try:
            await self.inner.put(key, result)
        finally:
            self._verified.pop(key, None)
            self._puts += 1

    async def aclose(self) -> None:
        await self.inner.aclose()

    def stats(self) -> dict[str, int]:
        return self.inner.stats() | {"incomplete": self.incomplete}
