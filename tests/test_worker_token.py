"""Only workers that present the scheduler's worker token may register.

Any client that registers as a worker receives other users' actions and answers them with
results of its choosing, which enter the action cache: registration is a privilege.
"""

from __future__ import annotations

import functools

import pytest
import trio
import trio_asyncio
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from reexec.daemon.app import run_daemon
from reexec.daemon.config import Config, SchedulerConfig, ServerConfig, StatusConfig
from reexec.worker_protocol import CONNECT, WORKER_TOKEN_HEADER, SchedulerMessage, WorkerMessage
from tests.conftest import open_channel
from tests.fake_worker import ExecuteCall, FakeWorker, execute_request, upload_action

TOKEN = "s3cret-token-for-the-workers-0123"


def _config(tmp_path, **sched) -> Config:  # type: ignore[no-untyped-def]
    return Config(
        data_dir=str(tmp_path / "data"),
        server=ServerConfig(listen=["127.0.0.1:0"]),
        scheduler=SchedulerConfig(**sched),
        status=StatusConfig(socket=""),
    )


async def _register(channel, worker_id: str, token: str | None) -> None:  # type: ignore[no-untyped-def]
    """Register and wait for the scheduler's answer; raises its GRPCError if refused."""

    async def attempt() -> None:
        async with channel.request(
            CONNECT,
            Cardinality.STREAM_STREAM,
            WorkerMessage,
            SchedulerMessage,
            metadata={WORKER_TOKEN_HEADER: token} if token else None,
        ) as stream:
            msg = WorkerMessage()
            msg.register.worker_id = worker_id
            msg.register.max_inflight_tasks = 1
            await stream.send_message(msg)
            await stream.recv_message()
            await stream.cancel()

    with trio.fail_after(10):
        await trio_asyncio.aio_as_trio(attempt)()


async def test_serve_admits_only_its_local_worker(aio_loop, tmp_path, nursery):
    config = _config(tmp_path)
    config.worker.max_inflight_tasks = 1
    daemon = await nursery.start(
        functools.partial(run_daemon, config, handle_signals=False, local_worker=True)
    )
    channel = await open_channel(daemon.port)
    try:
        for token in (None, "a-guess-at-the-token-0000000"):
            with pytest.raises(GRPCError) as e:
                await _register(channel, "intruder", token)
            assert e.value.status is Status.PERMISSION_DENIED
            assert "worker token" in (e.value.message or "")
        assert "intruder" not in daemon.scheduler.workers
        # The local worker (which holds the per-process token) still runs actions.
        digest = await upload_action(channel, ["true"])
        call = ExecuteCall(channel, execute_request(digest))
        with trio.fail_after(20):
            await call.run()
        assert call.response.status.code == 0 and call.response.result.exit_code == 0
    finally:
        channel.close()


async def test_scheduler_with_a_token_file(aio_loop, tmp_path, nursery):
    token_file = tmp_path / "worker-token"
    token_file.write_text(TOKEN + "\n")
    config = _config(tmp_path, worker_token_file=str(token_file))
    daemon = await nursery.start(
        functools.partial(run_daemon, config, handle_signals=False, local_worker=False)
    )
    channel = await open_channel(daemon.port)
    try:
        with pytest.raises(GRPCError) as e:
            await _register(channel, "w-bad", TOKEN[:-1] + "x")
        assert e.value.status is Status.PERMISSION_DENIED
        w = FakeWorker(channel, "w-good", token=TOKEN)
        await nursery.start(w.run)  # registered: its Registered answer came back
        assert "w-good" in daemon.scheduler.workers and "w-bad" not in daemon.scheduler.workers
    finally:
        channel.close()


async def test_a_short_token_file_is_a_config_error(aio_loop, tmp_path):
    token_file = tmp_path / "worker-token"
    token_file.write_text("short\n")
    config = _config(tmp_path, worker_token_file=str(token_file))
    with pytest.raises(BaseException) as e:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(run_daemon, config, handle_signals=False, local_worker=False)
            )
    assert "shorter than 16 characters" in str(
        e.value.exceptions[0] if hasattr(e.value, "exceptions") else e.value
    ) or "shorter than 16" in repr(e.value)
