"""A daemon whose CAS is a `shard` of two storage daemons reached over gRPC (in process).

Actions run with inputs and outputs spread over both storage daemons; when one stops, its blobs
are missing (FindMissingBlobs lists them; Execute answers FAILED_PRECONDITION with MISSING
violations), never INTERNAL; uploaded again, they land on the remaining shard and actions run.
"""

from __future__ import annotations

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec.cas.config import GrpcStoreConfig, Shard, ShardStoreConfig
from reexec.daemon.app import run_daemon
from reexec.daemon.config import Config, SchedulerConfig, ServerConfig, StatusConfig
from reexec.gen.build.bazel.remote.execution import v2 as re
from tests.conftest import call, open_channel
from tests.fake_worker import ExecuteCall, execute_request, upload_action


def _config(data_dir, **kw) -> Config:  # type: ignore[no-untyped-def]
    return Config(
        data_dir=str(data_dir),
        server=ServerConfig(listen=["127.0.0.1:0"]),
        status=StatusConfig(socket=""),
        **kw,
    )


async def _start(nursery: trio.Nursery, config: Config, *, local_worker: bool):  # type: ignore[no-untyped-def]
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        with scope:
            await run_daemon(
                config, handle_signals=False, local_worker=local_worker, task_status=task_status
            )

    daemon = await nursery.start(run)
    return daemon, scope


async def test_execute_over_a_shard_of_two_storage_daemons(aio_loop, tmp_path, nursery):
    storage = []
    for name in ("a", "b"):
        daemon, scope = await _start(
            nursery,
            _config(tmp_path / name, scheduler=SchedulerConfig(enabled=False)),
            local_worker=False,
        )
        storage.append((name, daemon, scope))
    cas = ShardStoreConfig(
        shards=[
            Shard(name=name, store=GrpcStoreConfig(url=f"grpc://127.0.0.1:{d.port}", timeout_s=5))
            for name, d, _ in storage
        ]
    )
    front = _config(tmp_path / "front", cas=cas)
    front.worker.max_inflight_tasks = 2
    daemon, _ = await _start(nursery, front, local_worker=True)
    channel = await open_channel(daemon.port)
    try:
        digests = [
            await upload_action(channel, ["sh", "-c", f"echo out-{i}"], salt=f"s{i}")
            for i in range(6)
        ]
        for d in digests:
            ex = ExecuteCall(channel, execute_request(d))
            with trio.fail_after(30):
                await ex.run()
            assert ex.response.status.code == 0 and ex.response.result.exit_code == 0
        # Both storage daemons hold some of the blobs.
        held = [d.cas.stats() for _, d, _ in storage]
        assert all(h for h in held), held

        # Stop storage "b": the blobs it held are missing now, never an internal error.
        _, _, b_scope = storage[1]
        b_scope.cancel()
        await trio.sleep(0.2)
        cas_stub = re.ContentAddressableStorageStub(channel)
        resp = await call(
            cas_stub.find_missing_blobs,
            re.FindMissingBlobsRequest(
                blob_digests=[re.Digest(d.hash, d.size_bytes) for d in digests]
            ),
        )
        missing = {m.hash for m in resp.missing_blob_digests}
        assert missing and missing < {d.hash for d in digests}
        lost = next(d for d in digests if d.hash in missing)
        ex = ExecuteCall(channel, execute_request(lost, skip_cache_lookup=True))
        with trio.fail_after(30):
            await ex.run()
        # Refused before it is queued: the client re-uploads the MISSING blobs and retries.
        assert isinstance(ex.error, GRPCError), ex.error
        assert ex.error.status is Status.FAILED_PRECONDITION
        assert [v.type for d in ex.error.details for v in d.violations] == ["MISSING"]
        assert daemon.cas.stats()["shard_failures"] >= 1
        # The client uploads what was lost: it lands on the remaining shard and the action runs.
        i = digests.index(lost)
        again = await upload_action(channel, ["sh", "-c", f"echo out-{i}"], salt=f"s{i}")
        assert again.hash == lost.hash
        ex = ExecuteCall(channel, execute_request(again, skip_cache_lookup=True))
        with trio.fail_after(30):
            await ex.run()
        assert ex.response.status.code == 0 and ex.response.result.exit_code == 0
    finally:
        channel.close()
