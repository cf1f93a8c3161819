"""reexec/redis_client.py: URL parsing, and coredis under Trio against a real redis-server."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
import trio
import trio_asyncio
from grpclib.const import Status

from reexec.redis_client import (
    ClientHost,
    RedisTarget,
    RedisUnavailable,
    connect,
    parse_url,
    redis_errors,
)
from tests.redis_server import RedisServer


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisTarget("redis", host="localhost")),
        ("redis://h:7000/3", RedisTarget("redis", host="h", port=7000, db=3)),
        ("redis://h/?db=2", RedisTarget("redis", host="h", db=2)),
        ("redis://[::1]:6380/0", RedisTarget("redis", host="::1", port=6380)),
        (
            "rediss://user:p%40ss@h:6390/1",
            RedisTarget("rediss", host="h", port=6390, db=1, username="user", password="p@ss"),
        ),
        ("redis://:secret@h", RedisTarget("redis", host="h", password="secret")),
        ("unix:///run/redis/redis.sock", RedisTarget("unix", path="/run/redis/redis.sock")),
        ("unix:///tmp/r.sock?db=5", RedisTarget("unix", path="/tmp/r.sock", db=5)),
        ("UNIX:///tmp/r.sock", RedisTarget("unix", path="/tmp/r.sock")),
        (
            "unix://:pw@/tmp/r.sock?db=1",
            RedisTarget("unix", path="/tmp/r.sock", db=1, password="pw"),
        ),
    ],
)
def test_parse_url(url: str, expected: RedisTarget) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty Redis URL"),
        ("localhost:6379", "scheme must be"),
        ("http://h:80", "scheme must be redis://, rediss:// or unix://, not 'http'"),
        ("redis://", "no host"),
        ("redis://:6379/0", "no host"),
        ("redis://h:notaport", "bad Redis URL"),
        ("redis://h:70000", "bad Redis URL"),
        ("redis://h:0", "port 0"),
        ("redis://h/x", "database 'x' is not a number"),
        ("redis://h/-1", "is not a number >= 0"),
        ("redis://h/1/2", "the path must be /DB"),
        ("redis://h/1?db=2", "both as /DB and as ?db="),
        ("redis://h?timeout=3", "unknown parameter(s) timeout"),
        ("redis://h?db=1&db=2", "more than once"),
        ("redis://h#frag", "no #fragment"),
        ("unix://relative/r.sock", "has no host"),
        ("unix://", "must be absolute"),
        ("unix:///", "must be absolute"),
        ("unix:///tmp/r.sock?db=x", "database 'x' is not a number"),
    ],
)
def test_parse_url_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" if not message else None) as e:
        parse_url(url)
    assert message in str(e.value)


def test_where_hides_password() -> None:
    assert parse_url("redis://u:secret@h:1/2").where == "redis://h:1/2"
    assert parse_url("unix://:secret@/tmp/r.sock").where == "unix:///tmp/r.sock?db=0"


def test_connect_checks_timeout_and_url() -> None:
    with pytest.raises(ValueError, match="timeout"):
        connect("redis://h", timeout_s=0)
    with pytest.raises(ValueError, match="scheme"):
        connect("tcp://h", timeout_s=1)


def test_unavailable_is_grpc_unavailable() -> None:
    assert RedisUnavailable("x").status is Status.UNAVAILABLE


async def test_commands_scripts_and_pubsub_under_trio(redis_server: RedisServer) -> None:
    async with connect(redis_server.url_for_db(2), timeout_s=2) as client:
        assert await client.set("k", b"v")
        assert await client.get("k") == b"v"
        assert (await client.client_info())["db"] == 2
        script = client.register_script("return redis.call('GET', KEYS[1]) .. ARGV[1]")
        assert await script(keys=["k"], args=["x"]) == b"vx"
        sha = await client.script_load("return ARGV[1]")
        assert await client.evalsha(sha, keys=[], args=["y"]) == b"y"

        received: list[bytes] = []
        async with trio.open_nursery() as nursery, client.pubsub(channels=["ch"]) as ps:

            async def publish() -> None:
                while not received:
                    await client.publish("ch", b"hello")
                    await trio.sleep(0.05)

            nursery.start_soon(publish)
            with trio.fail_after(5):
                async for message in ps:
                    if message["type"] == "message":
                        received.append(message["data"])
                        break
        assert received == [b"hello"]

        async def one(i: int) -> None:
            await client.set(f"c{i}", i)
            assert int(await client.get(f"c{i}")) == i

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)


async def test_from_an_asyncio_handler_through_trio_as_aio(redis_server: RedisServer) -> None:
    """How a grpclib handler reaches Redis: an asyncio task that crosses into Trio once."""
    async with trio_asyncio.open_loop(), connect(redis_server.url, timeout_s=2) as client:
        await client.set("k", b"v")

        @trio_asyncio.trio_as_aio
        async def in_trio() -> bytes | None:
            return await client.get("k")

        async def handler() -> bytes | None:
            return await in_trio()

        assert await trio_asyncio.aio_as_trio(handler)() == b"v"


async def test_stopped_redis_is_unavailable_then_recovers(redis_server: RedisServer) -> None:
    async with connect(redis_server.url, timeout_s=1) as client:
        await client.set("k", b"v")
        redis_server.stop()
        for _ in range(2):
            with pytest.raises(RedisUnavailable, match="get: Redis at here unavailable"):
                with redis_errors("get", "here"):
                    await client.get("k")
        redis_server.start()  # no persistence: the data is gone, the client reconnects
        with redis_errors("get"):
            assert await client.get("k") is None
            assert await client.set("k", b"w")


async def test_hung_redis_times_out_as_unavailable(redis_server: RedisServer) -> None:
    async with connect(redis_server.url, timeout_s=0.5) as client:
        await client.set("k", b"v")
        redis_server.pause()
        try:
            start = trio.current_time()
            with pytest.raises(RedisUnavailable, match="timed out"):
                with redis_errors("get"):
                    await client.get("k")
            assert trio.current_time() - start < 2.0  # timeouts are not retried
        finally:
            redis_server.resume()
        with redis_errors("get"):
            assert await client.get("k") == b"v"


async def test_redis_errors_leaves_command_errors_alone(redis_server: RedisServer) -> None:
    async with connect(redis_server.url, timeout_s=1) as client:
        await client.set("k", b"v")
        with pytest.raises(Exception, match="wrong kind of value") as e:
            with redis_errors("lpush"):
                await client.lpush("k", [b"x"])
        assert not isinstance(e.value, RedisUnavailable)


async def test_client_host_outlives_the_builder_scope(redis_server: RedisServer) -> None:
    host = ClientHost(connect(redis_server.url, timeout_s=1), what="test")
    with trio.move_on_after(10):  # a cancel scope opened after start and closed before aclose
        client = await host.start()
        await client.set("k", b"v")
    got: list[bytes | None] = []

    async def get() -> None:  # from another task than the one that started the host
        got.append(await client.get("k"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(get)
    assert got == [b"v"]
    with trio.move_on_after(5, shield=True):
        await host.aclose()


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1."""
    key, cert = tmp_path / "redis.key", tmp_path / "redis.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=redis",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_rediss_verifies_the_server_certificate(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server = RedisServer(Path(tempfile.mkdtemp(prefix="reexec-redis-")), tls=(cert, key))
    server.start()
    try:
        async with connect(server.tls_url, timeout_s=2, tls_ca=str(cert)) as client:
            await client.set("k", b"v")
            assert await client.get("k") == b"v"
        # Not signed by the system's CAs: refused, as UNAVAILABLE naming the reason.
        async with connect(server.tls_url, timeout_s=2) as client:
            with pytest.raises(RedisUnavailable, match="certificate verify failed"):
                with redis_errors("get"):
                    await client.get("k")
    finally:
        server.close()
