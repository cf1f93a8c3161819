"""`reexecd serve`'s worker reaches its scheduler through an in-process LocalLink (the worker
protocol's messages over memory channels), not gRPC over a unix socket: the same answers either
way, and the link behaves as a stream (half-close, errors, refusals)."""

from __future__ import annotations

import functools

import pytest
import trio

from reexec.daemon.app import Daemon, run_daemon
from reexec.daemon.config import Config, SchedulerConfig, ServerConfig, StatusConfig
from reexec.worker_protocol import LinkClosed, LocalLink, SchedulerMessage, WorkerMessage
from tests.conftest import open_channel
from tests.fake_worker import ExecuteCall, execute_request, upload_action

SCRIPT = "echo out-$SALT; echo err >&2; exit 3"


def _config(tmp_path, name: str) -> Config:  # type: ignore[no-untyped-def]
    config = Config(
        data_dir=str(tmp_path / name),
        server=ServerConfig(listen=["127.0.0.1:0"]),
        scheduler=SchedulerConfig(),
        status=StatusConfig(socket=""),
    )
    config.worker.max_inflight_tasks = 2
    config.worker.sandbox.confinement = "off"
    return config


async def _run_actions(tmp_path, nursery, link: str, monkeypatch) -> list[bytes]:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(Daemon, "worker_link", link)
    daemon = await nursery.start(
        functools.partial(
            run_daemon, _config(tmp_path, link), handle_signals=False, local_worker=True
        )
    )
    assert (daemon.server.unix_path is not None) == (link == "unix")
    channel = await open_channel(daemon.port)
    answers = []
    try:
        for args, salt in ((["sh", "-c", SCRIPT], "a"), (["true"], ""), (["sh", "-c", SCRIPT], "")):
            digest = await upload_action(channel, args, salt=salt)
            call = ExecuteCall(channel, execute_request(digest))
            with trio.fail_after(30):
                await call.run()
            r = call.response
            r.result.ClearField("execution_metadata")
            answers.append(r.SerializeToString(deterministic=True))
    finally:
        channel.close()
    assert daemon.agent.completed == 3 and daemon.agent.scheduler_url == "local"
    return answers


async def test_same_answers_over_the_link_and_the_unix_socket(
    aio_loop, tmp_path, nursery, monkeypatch
):
    memory = await _run_actions(tmp_path, nursery, "memory", monkeypatch)
    unix = await _run_actions(tmp_path, nursery, "unix", monkeypatch)
    assert memory == unix
    assert b"out-a" not in memory[0]  # stdout went to the CAS by digest: compared as such


async def _echo_scheduler(end) -> None:  # type: ignore[no-untyped-def]
    """Answers Register, then echoes each keepalive as a drain with the worker's metadata."""
    first = await end.recv_message()
    assert first.WhichOneof("kind") == "register"
    hello = SchedulerMessage()
    hello.registered.SetInParent()
    await end.send_message(hello)
    while (msg := await end.recv_message()) is not None:
        if msg.WhichOneof("kind") == "going_away":
            raise PermissionError("refused: " + end.metadata.get("who", "?"))
        out = SchedulerMessage()
        out.drain.reason = end.metadata.get("who", "?")
        await end.send_message(out)


async def test_link_carries_copies_half_closes_and_resets_on_errors(nursery):
    link = LocalLink()
    await nursery.start(link.run, _echo_scheduler)
    async with link.connect({"who": "w1"}) as stream:
        reg = WorkerMessage()
        reg.register.worker_id = "w1"
        await stream.send_message(reg)
        reg.register.worker_id = "changed after the send"
        assert (await stream.recv_message()).WhichOneof("kind") == "registered"
        ka = WorkerMessage()
        ka.keepalive.SetInParent()
        await stream.send_message(ka)
        assert (await stream.recv_message()).drain.reason == "w1"
        await stream.end()  # half-close: the scheduler's handler returns, ending its side
        with trio.fail_after(5):
            assert await stream.recv_message() is None
        with pytest.raises(LinkClosed):
            await stream.send_message(ka)

    async with link.connect({"who": "w2"}) as stream:
        await stream.send_message(reg)
        await stream.recv_message()
        bye = WorkerMessage()
        bye.going_away.SetInParent()
        await stream.send_message(bye)
        with pytest.raises(LinkClosed, match="PermissionError: refused: w2"):
            await stream.recv_message()


async def test_link_refuses_once_its_owner_stopped():
    link = LocalLink()
    async with trio.open_nursery() as owner:
        await owner.start(link.run, _echo_scheduler)
        owner.cancel_scope.cancel()
    with pytest.raises(LinkClosed, match="not accepting"):
        async with link.connect():
            pass
