"""The ActionCache service on a Redis action cache: shared by two daemons, UNAVAILABLE while
Redis is down and serving again when it returns."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec.cas.config import CompletenessCheckingActionCacheConfig, RedisActionCacheConfig
from reexec.daemon.config import SchedulerConfig
from reexec.gen.build.bazel.remote.execution import v2 as re
from tests.conftest import call, make_config, open_channel, start_daemon
from tests.e2e.harness import ReexecdProcess, free_port
from tests.fake_worker import ExecuteCall, FakeWorker, execute_request, upload_action
from tests.redis_server import RedisServer
from tests.test_cas_service import sha, upload

ACTION = sha(b"an action shared through Redis")
STDOUT = b"stdout of the shared action"


def _result() -> re.ActionResult:
    return re.ActionResult(exit_code=0, stdout_digest=sha(STDOUT))


async def _get(channel) -> re.ActionResult:
    return await call(
        re.ActionCacheStub(channel).get_action_result,
        re.GetActionResultRequest(action_digest=ACTION),
    )


async def _update(channel) -> re.ActionResult:
    return await call(
        re.ActionCacheStub(channel).update_action_result,
        re.UpdateActionResultRequest(action_digest=ACTION, action_result=_result()),
    )


def _storage_toml(port: int, redis_url: str) -> str:
    return (
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
        '[action_cache]\ntype = "completeness_checking"\n'
        f'[action_cache.inner]\ntype = "redis"\nurl = "{redis_url}"\nkey_prefix = "test:"\n'
    )


async def test_two_storage_nodes_share_one_redis_action_cache(
    aio_loop, tmp_path: Path, redis_server: RedisServer
) -> None:
    nodes = []
    for name in ("a", "b"):
        port = free_port()
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(_storage_toml(port, redis_server.url))
        data = tmp_path / name
        nodes.append(
            ReexecdProcess(
                data,
                port=port,
                args=["storage", "--config", str(cfg), "--data-dir", str(data)],
                log_dir=tmp_path / f"{name}-log",
            )
        )
    with nodes[0] as a, nodes[1] as b:
        ch_a, ch_b = await open_channel(a.port), await open_channel(b.port)
        try:
            await upload(re.ContentAddressableStorageStub(ch_a), STDOUT)
            await _update(ch_a)
            assert bytes(await _get(ch_a)) == bytes(_result())
            # B shares the entry, but its own CAS lacks the stdout blob: the completeness check
            # on top hides the entry there until B has the blob too.
            with pytest.raises(GRPCError) as e:
                await _get(ch_b)
            assert e.value.status is Status.NOT_FOUND
            await upload(re.ContentAddressableStorageStub(ch_b), STDOUT)
            assert bytes(await _get(ch_b)) == bytes(_result())
        finally:
            ch_a.close()
            ch_b.close()


async def test_redis_down_is_unavailable_then_serves_again(
    aio_loop, tmp_path: Path, nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    config = msgspec.structs.replace(
        make_config(tmp_path / "data", scheduler=SchedulerConfig(enabled=False)),
        action_cache=CompletenessCheckingActionCacheConfig(
            inner=RedisActionCacheConfig(url=redis_server.url, timeout_s=1)
        ),
    )
    daemon = await start_daemon(nursery, config)
    channel = await open_channel(daemon.port)
    try:
        await upload(re.ContentAddressableStorageStub(channel), STDOUT)
        await _update(channel)
        redis_server.stop()
        for rpc in (_get, _update):
            with pytest.raises(GRPCError) as e:
                await rpc(channel)
            assert e.value.status is Status.UNAVAILABLE, e.value
            assert "Redis" in (e.value.message or "") and redis_server.url in e.value.message
        # The CAS does not depend on Redis.
        await upload(re.ContentAddressableStorageStub(channel), b"still stored")
        redis_server.start()  # empty: no persistence
        with pytest.raises(GRPCError) as e:
            await _get(channel)
        assert e.value.status is Status.NOT_FOUND
        await _update(channel)
        assert bytes(await _get(channel)) == bytes(_result())
        # A hung Redis too: UNAVAILABLE within the configured bound, then serving again.
        redis_server.pause()
        try:
            with trio.fail_after(5), pytest.raises(GRPCError) as e:
                await _get(channel)
            assert e.value.status is Status.UNAVAILABLE
        finally:
            redis_server.resume()
        assert bytes(await _get(channel)) == bytes(_result())
    finally:
        channel.close()


# -- the scheduler's cache lookups and writes on a Redis action cache ---------------------------


async def _scheduler(tmp_path: Path, nursery: trio.Nursery, name: str, redis_url: str):
    config = msgspec.structs.replace(
        make_config(tmp_path / name, scheduler=SchedulerConfig(worker_timeout_s=30)),
        action_cache=CompletenessCheckingActionCacheConfig(
            inner=RedisActionCacheConfig(url=redis_url, timeout_s=1)
        ),
    )
    daemon = await start_daemon(nursery, config)
    channel = await open_channel(daemon.port)
    worker = FakeWorker(channel, f"{name}-worker")
    await nursery.start(worker.run)
    return daemon, channel, worker


async def _run(channel, nursery: trio.Nursery, digest, worker: FakeWorker | None) -> ExecuteCall:
    ex = ExecuteCall(channel, execute_request(digest))
    nursery.start_soon(ex.run)
    if worker is not None:
        await worker.finish(await worker.next_start(), exit_code=0, stdout=b"hi\n")
    with trio.fail_after(10):
        await ex.finished.wait()
    assert ex.error is None, ex.error
    return ex


async def test_schedulers_share_results_and_execute_while_redis_is_down(
    aio_loop, tmp_path: Path, nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    _, ch_a, worker_a = await _scheduler(tmp_path, nursery, "a", redis_server.url)
    _, ch_b, worker_b = await _scheduler(tmp_path, nursery, "b", redis_server.url)
    try:
        digest = await upload_action(ch_a, ["echo", "hi"])
        await upload_action(ch_b, ["echo", "hi"])
        ran = await _run(ch_a, nursery, digest, worker_a)
        assert not ran.response.cached_result
        # B never ran it: its cache check finds A's result in Redis.
        hit = await _run(ch_b, nursery, digest, None)
        assert hit.response.cached_result and hit.response.result.stdout_raw == b"hi\n"
        assert worker_b.pending() == 0

        # Redis down: the cache check fails, the action simply runs (never an error).
        redis_server.stop()
        other = await upload_action(ch_b, ["echo", "again"])
        down = await _run(ch_b, nursery, other, worker_b)
        assert down.response.status.code == 0 and not down.response.cached_result

        # Back (empty, no persistence): results are written and shared again.
        redis_server.start()
        await _run(ch_b, nursery, other, worker_b)
        await upload_action(ch_a, ["echo", "again"])
        assert (await _run(ch_a, nursery, other, None)).response.cached_result
    finally:
        ch_a.close()
        ch_b.close()
