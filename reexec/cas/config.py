"""Configuration of CAS stores and action caches: a tree of decorators chosen by `type`.

`reexec/cas/factory.py` turns these into store objects; the daemon only loads them.
"""

from __future__ import annotations

from typing import Union

from reexec.configtypes import ByteSize, TaggedConfigStruct

# -- CAS stores -------------------------------------------------------------------------------


class MemoryStoreConfig(TaggedConfigStruct, tag="memory"):
    max_bytes: ByteSize = "1GiB"


class FilesystemStoreConfig(TaggedConfigStruct, tag="filesystem"):
    path: str = "cas"
    """Relative paths are under the data directory."""
    max_bytes: ByteSize = "10GiB"
    fsync: bool = False
    """fsync each blob before it becomes visible (survives power loss, costs write speed)."""


class VerifyStoreConfig(TaggedConfigStruct, tag="verify"):
    inner: StoreConfig


class FastSlowStoreConfig(TaggedConfigStruct, tag="fast_slow"):
    fast: StoreConfig
    slow: StoreConfig


StoreConfig = Union[  # noqa: UP007
    MemoryStoreConfig, FilesystemStoreConfig, VerifyStoreConfig, FastSlowStoreConfig
]


# -- Action cache stores ----------------------------------------------------------------------


class MemoryActionCacheConfig(TaggedConfigStruct, tag="memory"):
    max_bytes: ByteSize = "256MiB"


class FilesystemActionCacheConfig(TaggedConfigStruct, tag="filesystem"):
    path: str = "ac"
    max_bytes: ByteSize = "1GiB"


class CompletenessCheckingActionCacheConfig(TaggedConfigStruct, tag="completeness_checking"):
    inner: ActionCacheConfig


ActionCacheConfig = Union[  # noqa: UP007
    MemoryActionCacheConfig, FilesystemActionCacheConfig, CompletenessCheckingActionCacheConfig
]


def default_store() -> StoreConfig:
    """What `reexecd serve` uses with no config: a hash-checked filesystem store."""
    return VerifyStoreConfig(inner=FilesystemStoreConfig())


def default_action_cache() -> ActionCacheConfig:
    return CompletenessCheckingActionCacheConfig(inner=FilesystemActionCacheConfig())
