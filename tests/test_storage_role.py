"""`reexecd storage`: a storage node serves the CAS and the action cache, and nothing else."""

from __future__ import annotations

import json

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec.cas.digest import digest_of
from reexec.cas.grpc_store import GrpcStore, channel_factory
from reexec.daemon.status_cli import request
from reexec.gen.build.bazel.remote.execution import v2 as re
from tests.conftest import call, open_channel
from tests.e2e.harness import ReexecdProcess, free_port
from tests.fake_worker import ExecuteCall, execute_request, upload_action


async def test_storage_node_serves_blobs_but_no_execution(aio_loop, tmp_path):
    port = free_port()
    cfg = tmp_path / "storage.toml"
    # A [scheduler] section asking for a scheduler is overruled by the role.
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[scheduler]\nenabled = true\n')
    data = tmp_path / "data"
    with ReexecdProcess(
        data,
        port=port,
        args=["storage", "--config", str(cfg), "--data-dir", str(data)],
        log_dir=tmp_path / "log",
    ):
        store = GrpcStore(channel_factory(f"grpc://127.0.0.1:{port}"), timeout_s=10)
        blob = b"kept by the storage node" * 20_000  # streamed through ByteStream
        d = digest_of(blob)
        await store.put_bytes(d, blob)
        assert await store.get_bytes(d) == blob
        await store.aclose()
        channel = await open_channel(port)
        try:
            caps = await call(
                re.CapabilitiesStub(channel).get_capabilities, re.GetCapabilitiesRequest()
            )
            assert not caps.execution_capabilities.exec_enabled
            ex = ExecuteCall(channel, execute_request(await upload_action(channel, ["true"])))
            with trio.fail_after(10):
                await ex.run()
            # No Execution service: grpclib's server answers an unknown method UNIMPLEMENTED in a
            # trailers-only response, which grpclib's own client reports as a missing
            # content-type (grpcio and Netty clients see UNIMPLEMENTED).
            assert isinstance(ex.error, GRPCError)
            assert ex.error.status is Status.UNIMPLEMENTED or (
                ex.error.status is Status.UNKNOWN and "content-type" in (ex.error.message or "")
            )
        finally:
            channel.close()
        code, body = await trio.to_thread.run_sync(
            request, str(data / "reexecd.sock"), "GET", "/status?format=json"
        )
        assert code == 200, body
        doc = json.loads(body)
        assert doc["role"] == "storage"
