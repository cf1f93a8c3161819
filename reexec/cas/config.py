"""Configuration of CAS stores and action caches: a tree of decorators chosen by `type`.

`reexec/cas/factory.py` turns these into store objects; the daemon only loads them.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

from reexec.configtypes import ByteSize, TaggedConfigStruct, parse_size
from reexec.redis_client import parse_url

# -- CAS stores -------------------------------------------------------------------------------

BlobFraction = Annotated[float, msgspec.Meta(gt=0, le=1)]


class MemoryStoreConfig(TaggedConfigStruct, tag="memory"):
    max_bytes: ByteSize = "1GiB"
    max_blob_fraction: BlobFraction = 0.1
    """The largest blob accepted, as a fraction of `max_bytes` (RESOURCE_EXHAUSTED beyond it),
    so one blob can never evict more than this share of the store."""


class FilesystemStoreConfig(TaggedConfigStruct, tag="filesystem"):
    path: str = "cas"
    """Relative paths are under the data directory."""
    max_bytes: ByteSize = "10GiB"
    fsync: bool = False
    """fsync each blob and its directory when it becomes visible (survives power loss, costs
    write speed)."""
    max_blob_fraction: BlobFraction = 0.1
    """The largest blob accepted, as a fraction of `max_bytes` (RESOURCE_EXHAUSTED beyond it),
    so one blob can never evict more than this share of the store."""


class VerifyStoreConfig(TaggedConfigStruct, tag="verify"):
    inner: StoreConfig


class FastSlowStoreConfig(TaggedConfigStruct, tag="fast_slow"):
    fast: StoreConfig
    slow: StoreConfig


class GrpcStoreConfig(TaggedConfigStruct, tag="grpc"):
    """Another REAPI endpoint (a storage host) used as a store."""

    url: str
    """grpc://HOST:PORT or grpcs://HOST:PORT."""
    instance_name: str = ""
    tls_ca: str | None = None
    """CA bundle to verify a grpcs:// endpoint (default: the system's CAs)."""
    timeout_s: float = 60.0
    """Deadline of each call (of each message, for ByteStream)."""


class Shard(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    """Stable: it decides which blobs the shard owns (renaming one moves its blobs)."""
    weight: float = 1.0
    """Share of blobs, relative to the other shards' weights."""
    store: StoreConfig


class ShardStoreConfig(TaggedConfigStruct, tag="shard"):
    """Each blob in one of `shards`, chosen by weighted rendezvous hashing of its digest."""

    shards: list[Shard]


class SizePartitioningStoreConfig(TaggedConfigStruct, tag="size_partitioning"):
    """Blobs up to `threshold` bytes in `small`, larger ones in `large`."""

    small: StoreConfig
    large: StoreConfig
    threshold: ByteSize = "64KiB"


StoreConfig = Union[  # noqa: UP007
    MemoryStoreConfig,
    FilesystemStoreConfig,
    VerifyStoreConfig,
    FastSlowStoreConfig,
    GrpcStoreConfig,
    ShardStoreConfig,
    SizePartitioningStoreConfig,
]


# -- Action cache stores ----------------------------------------------------------------------


class MemoryActionCacheConfig(TaggedConfigStruct, tag="memory"):
    max_bytes: ByteSize = "256MiB"


class FilesystemActionCacheConfig(TaggedConfigStruct, tag="filesystem"):
    path: str = "ac"
    max_bytes: ByteSize = "1GiB"


class CompletenessCheckingActionCacheConfig(TaggedConfigStruct, tag="completeness_checking"):
    inner: ActionCacheConfig


class GrpcActionCacheConfig(TaggedConfigStruct, tag="grpc"):
    """The action cache of another REAPI endpoint (a storage node), shared by its clients."""

    url: str
    """grpc://HOST:PORT or grpcs://HOST:PORT."""
    tls_ca: str | None = None
    timeout_s: float = 60.0


class RedisActionCacheConfig(TaggedConfigStruct, tag="redis"):
    """Entries in Redis, shared by every frontend and scheduler that names the same Redis and
    `key_prefix`. Put `completeness_checking` on top, as for any action cache."""

    url: str
    """redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///path/redis.sock?db=N."""
    key_prefix: str = "reexec:"
    """Every key starts with it (then `ac/`), so several deployments can share one Redis."""
    ttl_s: float = 7 * 24 * 3600.0
    """Entries not read or written for this long expire (each hit renews it); 0: never, and
    Redis's maxmemory-policy alone bounds the cache."""
    max_entry_bytes: ByteSize = "1MiB"
    """Larger ActionResults are refused (RESOURCE_EXHAUSTED)."""
    timeout_s: float = 5.0
    """Bounds connecting and each reply; past it a call answers UNAVAILABLE."""
    tls_ca: str | None = None
    """CA bundle to verify a rediss:// server (default: the system's CAs)."""
    max_connections: int = 64

    def __post_init__(self) -> None:
        parse_url(self.url)
        parse_size(self.max_entry_bytes)
        if not (self.timeout_s > 0 and self.timeout_s != float("inf")):
            raise ValueError("timeout_s must be a positive number of seconds")
        if not self.ttl_s >= 0:
            raise ValueError("ttl_s must be 0 (no expiry) or a positive number of seconds")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


ActionCacheConfig = Union[  # noqa: UP007
    MemoryActionCacheConfig,
    FilesystemActionCacheConfig,
    CompletenessCheckingActionCacheConfig,
    GrpcActionCacheConfig,
    RedisActionCacheConfig,
]


def default_store() -> StoreConfig:
    """What `reexecd serve` uses with no config: a hash-checked filesystem store."""
    return VerifyStoreConfig(inner=FilesystemStoreConfig())


def default_action_cache() -> ActionCacheConfig:
    return CompletenessCheckingActionCacheConfig(inner=FilesystemActionCacheConfig())
