"""Builds stores from configuration: the one place config turns into store objects."""

from __future__ import annotations

from pathlib import Path

from reexec.cas import config as c
from reexec.cas.action_cache import ActionCache, FilesystemActionCache, MemoryActionCache
from reexec.cas.completeness import CompletenessCheckingActionCache
from reexec.cas.fast_slow import FastSlowStore
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.fs_shared import ProcessShare
from reexec.cas.grpc_action_cache import GrpcActionCache
from reexec.cas.grpc_store import GrpcStore, channel_factory
from reexec.cas.memory import MemoryStore
from reexec.cas.shard import ShardStore
from reexec.cas.size_partition import SizePartitionStore
from reexec.cas.store import Store, blob_limit
from reexec.cas.verify import VerifyingStore
from reexec.configtypes import parse_size


def _path(data_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else data_dir / p


async def build_store(spec: c.StoreConfig, data_dir: Path) -> Store:
    """Construct and start the store tree described by `spec`."""
    if isinstance(spec, c.MemoryStoreConfig):
        size = parse_size(spec.max_bytes)
        return MemoryStore(size, max_blob_bytes=blob_limit(size, spec.max_blob_fraction))
    if isinstance(spec, c.FilesystemStoreConfig):
        size = parse_size(spec.max_bytes)
        fs = FilesystemStore(
            _path(data_dir, spec.path),
            size,
            fsync=spec.fsync,
            max_blob_bytes=blob_limit(size, spec.max_blob_fraction),
            # Set by the supervisor of `[server] processes = N` (reexec/daemon/supervisor.py).
            shared=ProcessShare.from_environment(),
        )
        await fs.start()
        return fs
    if isinstance(spec, c.VerifyStoreConfig):
        return VerifyingStore(await build_store(spec.inner, data_dir))
    if isinstance(spec, c.FastSlowStoreConfig):
        return FastSlowStore(
            await build_store(spec.fast, data_dir), await build_store(spec.slow, data_dir)
        )
    if isinstance(spec, c.GrpcStoreConfig):
        return GrpcStore(
            channel_factory(spec.url, tls_ca=spec.tls_ca),
            instance=spec.instance_name,
            timeout_s=spec.timeout_s,
            endpoint=spec.url,
        )
    if isinstance(spec, c.ShardStoreConfig):
        return ShardStore(
            [(s.name, s.weight, await build_store(s.store, data_dir)) for s in spec.shards]
        )
    if isinstance(spec, c.SizePartitioningStoreConfig):
        return SizePartitionStore(
            parse_size(spec.threshold),
            await build_store(spec.small, data_dir),
            await build_store(spec.large, data_dir),
        )
    raise TypeError(f"unknown store config {spec!r}")


async def build_action_cache(spec: c.ActionCacheConfig, data_dir: Path, cas: Store) -> ActionCache:
    if isinstance(spec, c.MemoryActionCacheConfig):
        return MemoryActionCache(parse_size(spec.max_bytes))
    if isinstance(spec, c.FilesystemActionCacheConfig):
        ac = FilesystemActionCache(_path(data_dir, spec.path), parse_size(spec.max_bytes))
        await ac.start()
        return ac
    if isinstance(spec, c.GrpcActionCacheConfig):
        return GrpcActionCache(
            channel_factory(spec.url, tls_ca=spec.tls_ca),
            timeout_s=spec.timeout_s,
            endpoint=spec.url,
        )
    if isinstance(spec, c.RedisActionCacheConfig):
        # Imported only when configured: importing coredis takes ~0.3 s.
        from reexec.cas.redis_action_cache import RedisActionCache

        return await RedisActionCache.open(
            spec.url,
            key_prefix=spec.key_prefix,
            ttl_s=spec.ttl_s,
            max_entry_bytes=parse_size(spec.max_entry_bytes),
            timeout_s=spec.timeout_s,
            tls_ca=spec.tls_ca,
            max_connections=spec.max_connections,
        )
    if isinstance(spec, c.CompletenessCheckingActionCacheConfig):
        return CompletenessCheckingActionCache(
            await build_action_cache(spec.inner, data_dir, cas), cas
        )
    raise TypeError(f"unknown action cache config {spec!r}")
