"""RedisActionCache against a real redis-server: layout, TTLs, limits, Redis down and back.

The interface contract (get/put, instances, digest functions, empty results) runs for every
action cache, this one included, in tests/cas/test_action_cache.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import msgspec
import pytest
import trio
from grpclib.const import Status

from reexec import fastpb
from reexec.cas.action_cache import ActionKey
from reexec.cas.completeness import CompletenessCheckingActionCache
from reexec.cas.config import (
    ActionCacheConfig,
    CompletenessCheckingActionCacheConfig,
    RedisActionCacheConfig,
)
from reexec.cas.digest import DigestFunction, digest_of
from reexec.cas.factory import build_action_cache
from reexec.cas.memory import MemoryStore
from reexec.cas.redis_action_cache import RedisActionCache
from reexec.daemon.config import ConfigError, load_config
from reexec.errors import ResourceExhausted
from reexec.redis_client import RedisUnavailable, connect
from tests.redis_server import RedisServer

KEY = ActionKey("main", digest_of(b"an action"))


async def test_key_layout_and_prefixes_keep_deployments_apart(redis_server: RedisServer) -> None:
    a = await RedisActionCache.open(redis_server.url, key_prefix="a:", timeout_s=2)
    b = await RedisActionCache.open(redis_server.url, key_prefix="b:", timeout_s=2)
    try:
        await a.put(KEY, b"result")
        assert await a.get(KEY) == b"result"
        assert await b.get(KEY) is None
        k = ActionKey("x/y with space", digest_of(b"z", DigestFunction.BLAKE3))
        assert a.redis_key(k) == f"a:ac/blake3/{k.digest.hash}/1/x/y with space".encode()
        assert a.stats() == {"hits": 1, "misses": 0, "puts": 1, "unavailable": 0, "too_large": 0}
    finally:
        await a.aclose()
        await b.aclose()


async def test_ttl_is_set_and_renewed_by_hits(redis_server: RedisServer) -> None:
    ac = await RedisActionCache.open(redis_server.url, ttl_s=100, timeout_s=2)
    async with connect(redis_server.url, timeout_s=2) as raw:
        try:
            await ac.put(KEY, b"r")
            pttl = await raw.pttl(ac.redis_key(KEY))
            assert 90_000 < pttl <= 100_000
            await raw.pexpire(ac.redis_key(KEY), 5_000)
            assert await ac.get(KEY) == b"r"
            assert await raw.pttl(ac.redis_key(KEY)) > 90_000  # the hit renewed it
        finally:
            await ac.aclose()


async def test_ttl_zero_never_expires(redis_server: RedisServer) -> None:
    ac = await RedisActionCache.open(redis_server.url, ttl_s=0, timeout_s=2)
    async with connect(redis_server.url, timeout_s=2) as raw:
        try:
            await ac.put(KEY, b"r")
            assert await ac.get(KEY) == b"r"
            assert await raw.pttl(ac.redis_key(KEY)) == -1
        finally:
            await ac.aclose()


async def test_entries_over_the_limit_are_refused(redis_server: RedisServer) -> None:
    ac = await RedisActionCache.open(redis_server.url, max_entry_bytes=100, timeout_s=2)
    try:
        await ac.put(KEY, b"x" * 100)
        with pytest.raises(ResourceExhausted, match=r"101 bytes is over .* limit of 100 bytes"):
            await ac.put(KEY, b"x" * 101)
        assert await ac.get(KEY) == b"x" * 100
        assert ac.stats()["too_large"] == 1
    finally:
        await ac.aclose()


async def test_redis_stopped_is_unavailable_then_serves_again(redis_server: RedisServer) -> None:
    ac = await RedisActionCache.open(redis_server.url, timeout_s=1)
    try:
        await ac.put(KEY, b"before")
        redis_server.stop()
        for call in (ac.get(KEY), ac.put(KEY, b"during")):
            with pytest.raises(RedisUnavailable) as e:
                await call
            assert e.value.status is Status.UNAVAILABLE
            assert "action cache" in e.value.message and redis_server.url in e.value.message
        assert ac.stats()["unavailable"] == 2
        redis_server.start()  # no persistence: a restarted Redis is an empty cache
        assert await ac.get(KEY) is None
        await ac.put(KEY, b"after")
        assert await ac.get(KEY) == b"after"
    finally:
        await ac.aclose()


async def test_hung_redis_is_unavailable_within_the_timeout(redis_server: RedisServer) -> None:
    ac = await RedisActionCache.open(redis_server.url, timeout_s=0.5)
    try:
        await ac.put(KEY, b"r")
        redis_server.pause()
        try:
            start = trio.current_time()
            with pytest.raises(RedisUnavailable, match="timed out"):
                await ac.get(KEY)
            assert trio.current_time() - start < 2.0
        finally:
            redis_server.resume()
        assert await ac.get(KEY) == b"r"
    finally:
        await ac.aclose()


async def test_opens_while_redis_is_down_and_recovers() -> None:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="reexec-redis-")))
    ac = await RedisActionCache.open(server.url, timeout_s=0.5)
    try:
        with pytest.raises(RedisUnavailable):
            await ac.get(KEY)
        server.start()
        assert await ac.get(KEY) is None
        await ac.put(KEY, b"r")
        assert await ac.get(KEY) == b"r"
    finally:
        await ac.aclose()
        server.close()


async def test_foreign_value_at_our_key_is_unavailable_not_internal(
    redis_server: RedisServer,
) -> None:
    ac = await RedisActionCache.open(redis_server.url, timeout_s=1)
    async with connect(redis_server.url, timeout_s=1) as raw:
        try:
            await raw.lpush(ac.redis_key(KEY), [b"not a string"])
            with pytest.raises(RedisUnavailable, match=r"refused: .*wrong kind of value"):
                await ac.get(KEY)
        finally:
            await ac.aclose()


async def test_factory_builds_it_under_the_completeness_check(redis_server: RedisServer) -> None:
    spec = msgspec.convert(
        {
            "type": "completeness_checking",
            "inner": {"type": "redis", "url": redis_server.url, "ttl_s": 60},
        },
        ActionCacheConfig,
    )
    assert isinstance(spec, CompletenessCheckingActionCacheConfig)
    cas = MemoryStore(1 << 20)
    ac = await build_action_cache(spec, Path("/nonexistent"), cas)
    try:
        assert isinstance(ac, CompletenessCheckingActionCache)
        assert isinstance(ac.inner, RedisActionCache)
        stdout = b"hello"
        await cas.put_bytes(digest_of(stdout), stdout)
        result = fastpb.ActionResult(exit_code=0)
        result.stdout_digest.hash, result.stdout_digest.size_bytes = (
            digest_of(stdout).hash,
            len(stdout),
        )
        await ac.put(KEY, result.SerializeToString())
        assert await ac.get(KEY) == result.SerializeToString()
        # The blob goes from this frontend's CAS: the shared entry is hidden here.
        other = await build_action_cache(spec, Path("/nonexistent"), MemoryStore(1 << 20))
        try:
            assert await other.get(KEY) is None
        finally:
            await other.aclose()
    finally:
        await ac.aclose()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "http://h"}, "scheme must be redis://, rediss:// or unix://"),
        ({"url": "redis://h/x"}, "database 'x' is not a number"),
        ({"url": "redis://h", "timeout_s": 0}, "timeout_s must be a positive number"),
        ({"url": "redis://h", "ttl_s": -1}, "ttl_s must be 0"),
        ({"url": "redis://h", "max_entry_bytes": "lots"}, "is not a number of bytes"),
        ({"url": "redis://h", "max_connections": 0}, "max_connections must be at least 1"),
        ({"url": "redis://h", "ttl": 1}, "unknown field `ttl`"),
    ],
)
def test_config_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert({"type": "redis", **fields}, ActionCacheConfig)


def test_config_defaults() -> None:
    spec = msgspec.convert({"type": "redis", "url": "unix:///r.sock"}, ActionCacheConfig)
    assert spec == RedisActionCacheConfig(url="unix:///r.sock")
    assert (spec.key_prefix, spec.ttl_s, spec.max_entry_bytes, spec.timeout_s) == (
        "reexec:",
        7 * 24 * 3600.0,
        "1MiB",
        5.0,
    )


def test_config_file_error_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[action_cache]\ntype = "completeness_checking"\n'
        '[action_cache.inner]\ntype = "redis"\nurl = "redis://h/x"\n'
    )
    with pytest.raises(ConfigError, match=r"action_cache\.inner: bad Redis URL 'redis://h/x'"):
        load_config(path)


async def test_concurrent_callers_through_restarts_and_a_hang(redis_server: RedisServer) -> None:
    """50 tasks hammer get/put while Redis is stopped, restarted, killed, paused: every failure
    is RedisUnavailable within the bound, nothing hangs, and all succeed once Redis is back."""
    ac = await RedisActionCache.open(redis_server.url, timeout_s=0.5, max_connections=8)
    errors: list[BaseException] = []
    counts = {"ok": 0, "unavailable": 0}
    stop = trio.Event()

    async def hammer(i: int) -> None:
        k = ActionKey("", digest_of(f"action {i}".encode()))
        while not stop.is_set():
            start = trio.current_time()
            try:
                await ac.put(k, b"result %d" % i)
                got = await ac.get(k)
                assert got in (None, b"result %d" % i)  # None: Redis restarted in between
                counts["ok"] += 1
            except RedisUnavailable:
                counts["unavailable"] += 1
                await trio.sleep(0.01)
            except BaseException as e:
                errors.append(e)
                raise
            assert trio.current_time() - start < 2 * (3 * 0.5 + 1)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(hammer, i)
                for fault in ("stop", "kill", "pause"):
                    await trio.sleep(0.3)
                    ok_before = counts["ok"]
                    if fault == "pause":
                        redis_server.pause()
                        await trio.sleep(1.0)
                        redis_server.resume()
                    else:
                        getattr(redis_server, fault)()
                        await trio.sleep(0.3)
                        redis_server.start()
                    with trio.fail_after(10):
                        while counts["ok"] <= ok_before + 100:
                            await trio.sleep(0.05)
                stop.set()
        assert not errors
        assert counts["unavailable"] > 0 and counts["ok"] > 300
        # Every task succeeds again at once.
        for i in range(50):
            k = ActionKey("", digest_of(f"action {i}".encode()))
            await ac.put(k, b"x")
            assert await ac.get(k) == b"x"
    finally:
        await ac.aclose()
