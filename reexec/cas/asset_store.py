"""The Remote Asset index: (instance, kind, URI, qualifiers) -> an asset record.

Pure bookkeeping, like `lru.py`: it never reads the CAS. Whether the blobs an asset names are
still present is the service's question (`asset_service.py`), answered on every fetch, because
the CAS evicts without telling this index.

Keys. An asset pushed under several URIs is stored once per URI. Qualifiers are matched as an
exact set (the spec allows a server to require that), so a fetch with fewer or more qualifiers
than the push misses. Blobs and directories live in separate namespaces: FetchBlob never returns
what PushDirectory stored, and the other way round.

Lifetime. An entry ends when its `expire_at` passes (a fetch then misses and drops it), when a
push replaces it, when the service finds its content incomplete, or when the index is full and
it is the least recently used. The index is in memory: a restarted server has no assets, and
clients (BuildStream) then rebuild or re-push; the CAS and the action cache are unaffected.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from reexec.cas.digest import Digest

# Entries kept before the least recently used is dropped. An entry is a few hundred bytes plus
# its reference lists; BuildStream pushes one per artifact and one per source.
DEFAULT_MAX_ENTRIES = 200_000


class AssetKind(enum.Enum):
    BLOB = "blob"
    DIRECTORY = "directory"


Qualifiers = frozenset[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class AssetKey:
    instance: str
    kind: AssetKind
    uri: str
    qualifiers: Qualifiers


@dataclass(frozen=True, slots=True)
class Asset:
    """What a push stored. Times are seconds since the epoch; `expire_at` None never expires."""

    digest: Digest
    references_blobs: tuple[Digest, ...]
    references_directories: tuple[Digest, ...]
    pushed_at: float
    expire_at: float | None

    def expired(self, now: float) -> bool:
        return self.expire_at is not None and now >= self.expire_at


class AssetIndex:
    """An LRU-bounded map of asset keys. Every method is synchronous and runs on the Trio
    thread, so no lock is needed."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.expired = 0
        self.dropped_incomplete = 0
        self.evicted = 0
        self._entries: OrderedDict[AssetKey, Asset] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, keys: Iterable[AssetKey], asset: Asset) -> None:
        """Store `asset` under every key, replacing what was there."""
        for key in keys:
            self._entries[key] = asset
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1

    def get(self, key: AssetKey, now: float, oldest_accepted: float | None = None) -> Asset | None:
        """The live entry for `key`, or None.

        An expired entry is dropped. An entry pushed before `oldest_accepted` is a miss but
        stays: another client may accept older content.
        """
        asset = self._entries.get(key)
        if asset is None:
            return None
        if asset.expired(now):
            del self._entries[key]
            self.expired += 1
            return None
        if oldest_accepted is not None and asset.pushed_at < oldest_accepted:
            return None
        self._entries.move_to_end(key)
        return asset

    def drop_incomplete(self, key: AssetKey, asset: Asset) -> None:
        """Forget `key` because blobs it needs left the CAS (only if it still maps to `asset`:
        a push may have replaced it while the service was checking)."""
        if self._entries.get(key) is asset:
            del self._entries[key]
            self.dropped_incomplete += 1
