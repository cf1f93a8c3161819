"""RedisActionCache: action cache entries in Redis, so several frontends and schedulers share
one action cache (`[action_cache] type = "redis"`).

One string per entry, the serialized ActionResult, at
`{key_prefix}ac/{function}/{hash}/{size}/{instance name}` (the instance name last, so any name is
unambiguous). Every write sets a TTL and every hit renews it (GETEX), so entries used at least
once per `ttl_s` stay and forgotten ones expire; with `ttl_s = 0` entries never expire and
Redis's own `maxmemory-policy` (e.g. allkeys-lru) bounds them. Entries over `max_entry_bytes`
are refused (RESOURCE_EXHAUSTED), since one oversized value slows every Redis client.

Redis that cannot answer (down, restarting, hung, loading, out of memory) makes `get` and `put`
raise `RedisUnavailable` (UNAVAILABLE, with what failed and where) within about 2 x
`timeout_s`; no state is kept about it, so the first call after Redis returns succeeds. The
completeness check stays a decorator on top (`CompletenessCheckingActionCache`): a shared cache
still never hands out a result whose blobs this frontend's CAS lacks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import coredis
import coredis.exceptions
import trio

from reexec.cas.action_cache import ActionCache, ActionKey
from reexec.errors import ResourceExhausted
from reexec.redis_client import ClientHost, RedisUnavailable, connect, parse_url, redis_errors

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 7 * 24 * 3600.0
DEFAULT_MAX_ENTRY_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 5.0


class RedisActionCache(ActionCache):
    """Built with `open()` (which starts the client) and closed with `aclose()`."""

    def __init__(
        self,
        client: coredis.Redis[bytes],
        *,
        key_prefix: str = "reexec:",
        ttl_s: float = DEFAULT_TTL_S,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        where: str = "",
    ) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must not be negative, not {ttl_s}")
        self._client = client
        self._host: ClientHost | None = None
        self._prefix = key_prefix.encode() + b"ac/"
        # Redis counts expiry in whole milliseconds; 0 means no expiry.
        self._ttl_ms = max(1, round(ttl_s * 1000)) if ttl_s else 0
        self.max_entry_bytes = max_entry_bytes
        # Past both of coredis's bounds (reply wait, one reconnect): a last resort only.
        self._deadline_s = 3 * timeout_s + 1
        self.where = where
        self._counts = {"hits": 0, "misses": 0, "puts": 0, "unavailable": 0, "too_large": 0}

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        key_prefix: str = "reexec:",
        ttl_s: float = DEFAULT_TTL_S,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls_ca: str | None = None,
        max_connections: int | None = None,
    ) -> RedisActionCache:
        """Start a client for `url`. Redis need not be up: calls fail UNAVAILABLE until it is."""
        where = parse_url(url).where
        client = connect(
            url,
            timeout_s=timeout_s,
            tls_ca=tls_ca,
            max_connections=max_connections,
            client_name="reexec-ac",
        )
        ac = cls(
            client,
            key_prefix=key_prefix,
            ttl_s=ttl_s,
            max_entry_bytes=max_entry_bytes,
            timeout_s=timeout_s,
            where=where,
        )
        ac._host = ClientHost(client, what="action cache")
        await ac._host.start()
        try:
            with trio.fail_after(timeout_s):
                await client.ping()
            log.info("action cache on Redis at %s", where)
        except Exception as e:
            log.warning(
                "action cache: Redis at %s does not answer yet (%r); calls answer UNAVAILABLE "
                "until it does",
                where,
                e,
            )
        return ac

    def redis_key(self, key: ActionKey) -> bytes:
        d = key.digest
        return b"%s%s/%s/%d/%s" % (
            self._prefix,
            d.function.name.lower().encode(),
            d.hash.encode(),
            d.size,
            key.instance.encode(),
        )

    async def get(self, key: ActionKey) -> bytes | None:
        with self._errors("GetActionResult"):
            if self._ttl_ms:
                data = await self._client.getex(self.redis_key(key), px=self._ttl_ms)
            else:
                data = await self._client.get(self.redis_key(key))
        self._counts["hits" if data is not None else "misses"] += 1
        return data

    async def put(self, key: ActionKey, result: bytes) -> None:
        if len(result) > self.max_entry_bytes:
            self._counts["too_large"] += 1
            raise ResourceExhausted(
                f"ActionResult of {len(result)} bytes is over the action cache's limit of "
                f"{self.max_entry_bytes} bytes (action_cache.max_entry_bytes)"
            )
        with self._errors("UpdateActionResult"):
            await self._client.set(self.redis_key(key), result, px=self._ttl_ms or None)
        self._counts["puts"] += 1

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Bound one call; "Redis cannot answer" becomes RedisUnavailable (and is counted)."""
        try:
            with (
                redis_errors(f"action cache {what}", self.where),
                trio.fail_after(self._deadline_s),
            ):
                yield
        except RedisUnavailable:
            self._counts["unavailable"] += 1
            raise
        except coredis.exceptions.RedisError as e:
            # Not a bug of ours either: wrong password, missing ACL permission, a Redis too old
            # for GETEX, a foreign value at our key. The operator must act; clients may retry.
            self._counts["unavailable"] += 1
            raise RedisUnavailable(
                f"action cache {what}: Redis at {self.where} refused: {e}"
            ) from e

    async def aclose(self) -> None:
        if self._host is not None:
            host, self._host = self._host, None
            await host.aclose()

    def stats(self) -> dict[str, int]:
        return dict(self._counts)
