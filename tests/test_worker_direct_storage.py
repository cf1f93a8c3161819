"""A worker that reads inputs from and writes outputs to the storage node directly (`worker.cas`),
not through its scheduler: storage, scheduler and worker as separate `reexecd` processes."""

from __future__ import annotations

import trio

from reexec.cas.digest import make_digest
from reexec.cas.grpc_store import GrpcStore, channel_factory
from reexec.daemon.status_cli import request
from tests.conftest import open_channel
from tests.e2e.harness import ReexecdProcess, free_port
from tests.fake_worker import ExecuteCall, execute_request, upload_action


async def test_worker_uses_the_storage_node_directly(aio_loop, tmp_path):
    storage_port, sched_port = free_port(), free_port()
    storage_url = f"grpc://127.0.0.1:{storage_port}"
    (tmp_path / "storage.toml").write_text(f'[server]\nlisten = ["127.0.0.1:{storage_port}"]\n')
    (tmp_path / "scheduler.toml").write_text(
        f'[server]\nlisten = ["127.0.0.1:{sched_port}"]\n'
        f'[cas]\ntype = "grpc"\nurl = "{storage_url}"\n'
        "[worker]\nenabled = false\n"
    )
    (tmp_path / "worker.toml").write_text(
        f'[worker]\nscheduler = "grpc://127.0.0.1:{sched_port}"\nworker_id = "w-direct"\n'
        f'max_inflight_tasks = 1\ncas = {{ type = "grpc", url = "{storage_url}" }}\n'
    )

    def proc(role: str, port: int | None, wait: bool = True) -> ReexecdProcess:
        data = tmp_path / role
        return ReexecdProcess(
            data,
            port=port,
            args=[role, "--config", str(tmp_path / f"{role}.toml"), "--data-dir", str(data)],
            log_dir=tmp_path / f"{role}-log",
            wait_ready=wait,
        )

    with proc("storage", storage_port) as storage, proc("scheduler", sched_port) as sched:
        worker = proc("worker", None, wait=False)
        worker.start()
        try:
            with trio.fail_after(30):
                while "worker connected" not in sched.log_text():
                    await trio.sleep(0.05)
            channel = await open_channel(sched_port)
            try:
                digest = await upload_action(channel, ["sh", "-c", "echo direct"])
                ex = ExecuteCall(channel, execute_request(digest))
                with trio.fail_after(60):
                    await ex.run()
                result = ex.response.result
                assert ex.response.status.code == 0 and result.exit_code == 0, ex.response
            finally:
                channel.close()
            # The worker read its inputs from the storage node and wrote its outputs there.
            store = GrpcStore(channel_factory(storage_url), timeout_s=10)
            try:
                out = result.stdout_digest
                assert await store.get_bytes(make_digest(out.hash, out.size_bytes)) == b"direct\n"
            finally:
                await store.aclose()
            # ... and never through the scheduler: its CAS saw only the client's upload.
            code, body = await trio.to_thread.run_sync(
                request, str(tmp_path / "scheduler" / "reexecd.sock"), "GET", "/metrics"
            )
            assert code == 200
            counts = [
                line
                for line in body.decode().splitlines()
                if line.startswith("reexec_rpc_duration_seconds_count")
            ]
            assert any("BatchUpdateBlobs" in line for line in counts), counts
            cas_reads = [
                line
                for line in counts
                if any(m in line for m in ("FindMissingBlobs", "BatchReadBlobs", "ByteStream"))
            ]
            assert cas_reads == [], cas_reads
            assert storage.pid != worker.pid
        finally:
            worker.stop()
