"""GrpcActionCache: a storage node's action cache, shared over gRPC."""

from __future__ import annotations

import pytest

from reexec import fastpb
from reexec.cas.action_cache import ActionKey
from reexec.cas.digest import digest_of
from reexec.cas.grpc_action_cache import GrpcActionCache
from reexec.cas.grpc_store import channel_factory
from reexec.daemon.config import SchedulerConfig
from reexec.errors import Unavailable
from tests.conftest import make_config, start_daemon
from tests.e2e.harness import free_port


def _result(code: int) -> bytes:
    r = fastpb.ActionResult(exit_code=code)
    r.execution_metadata.worker = "w"
    return r.SerializeToString()


async def test_put_get_and_miss(aio_loop, tmp_path, nursery) -> None:
    daemon = await start_daemon(
        nursery, make_config(tmp_path / "node", scheduler=SchedulerConfig(enabled=False))
    )
    ac = GrpcActionCache(channel_factory(f"grpc://127.0.0.1:{daemon.port}"), timeout_s=10)
    key = ActionKey("main", digest_of(b"an action"))
    assert await ac.get(key) is None
    await ac.put(key, _result(3))
    got = await ac.get(key)
    assert got is not None and fastpb.ActionResult.FromString(got).exit_code == 3
    # Instances are kept apart, as the node keeps them.
    assert await ac.get(ActionKey("other", key.digest)) is None
    # The node's own cache holds it: another client of the node sees the same entry.
    assert await daemon.ac.get(key) is not None
    await ac.aclose()


async def test_unreachable_is_a_miss_on_reads_and_unavailable_on_writes(aio_loop) -> None:
    ac = GrpcActionCache(channel_factory(f"grpc://127.0.0.1:{free_port()}"), timeout_s=5)
    key = ActionKey("", digest_of(b"x"))
    assert await ac.get(key) is None and ac.stats()["unreachable"] == 1
    with pytest.raises(Unavailable):
        await ac.put(key, _result(0))
    await ac.aclose()
