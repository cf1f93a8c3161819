"""Clients that collide: the same upload from several streams, the same blob under many upload
names, a stalling writer, the same action from many clients at once. Each ends with the data
intact, one precise answer per client, and the work done once.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from reexec import fastpb
from tests.hardening.conftest import (
    BYTESTREAM,
    CAS,
    EXECUTION,
    Health,
    Outcome,
    RawClient,
    ThreadDaemon,
    sha,
)

CHUNK = 64 * 1024


def _in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait(10)
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a client thread is stuck"
    return results


def _write_messages(name: str, data: bytes, pause: float = 0.0) -> Iterator[bytes]:
    for off in range(0, len(data), CHUNK):
        if pause and off:
            time.sleep(pause)
        yield fastpb.WriteRequest(
            resource_name=name if off == 0 else "",
            write_offset=off,
            data=data[off : off + CHUNK],
            finish_write=off + CHUNK >= len(data),
        ).SerializeToString()


def _name(data: bytes, upload: str | None = None) -> str:
    return f"uploads/{upload or uuid.uuid4()}/blobs/{hashlib.sha256(data).hexdigest()}/{len(data)}"


def test_two_streams_on_one_upload_name(raw: RawClient, health: Health) -> None:
    data = os.urandom(1024 * 1024)
    name = _name(data)
    outs: list[Outcome] = _in_threads(
        2,
        lambda i: raw.client_stream(BYTESTREAM + "Write", _write_messages(name, data, 0.01)),
    )
    codes = sorted(o.code.name for o in outs)
    assert grpc.StatusCode.OK.name in codes, [str(o) for o in outs]
    for o in outs:
        assert o.ok or o.code is grpc.StatusCode.INVALID_ARGUMENT, str(o)
    assert raw.read_blob(sha(data)) == data
    health.check("two streams on one upload")


def test_many_uploads_of_one_blob(raw: RawClient, health: Health) -> None:
    data = os.urandom(512 * 1024)
    outs: list[Outcome] = _in_threads(
        8, lambda i: raw.client_stream(BYTESTREAM + "Write", _write_messages(_name(data), data))
    )
    assert all(o.ok for o in outs), [str(o) for o in outs]
    for o in outs:
        committed = fastpb.WriteResponse.FromString(o.responses[0]).committed_size
        assert committed == len(data), committed
    batch = fastpb.BatchUpdateBlobsRequest()
    for _ in range(3):  # the same blob three times in one batch
        r = batch.requests.add(data=data)
        r.digest.CopyFrom(sha(data))
    out = raw.unary(CAS + "BatchUpdateBlobs", batch.SerializeToString())
    assert out.ok, out
    codes = [
        r.status.code
        for r in fastpb.BatchUpdateBlobsResponse.FromString(out.responses[0]).responses
    ]
    assert codes == [0, 0, 0], codes
    assert raw.read_blob(sha(data)) == data
    health.check("many uploads of one blob")


def test_a_stalling_writer_completes(raw: RawClient, health: Health) -> None:
    data = os.urandom(4 * CHUNK)
    out = raw.client_stream(BYTESTREAM + "Write", _write_messages(_name(data), data, pause=1.0))
    assert out.ok, out
    assert raw.read_blob(sha(data)) == data
    health.check("stalling writer")


def test_one_action_from_many_clients(
    raw: RawClient, health: Health, thread_daemon: ThreadDaemon
) -> None:
    """Twelve clients Execute the same (cacheable) action at once: one execution, one answer
    each, all the same result."""
    command = fastpb.Command(arguments=["/bin/true", "many clients"])
    root = fastpb.Directory().SerializeToString()
    action = fastpb.Action()
    action.command_digest.CopyFrom(sha(command.SerializeToString()))
    action.input_root_digest.CopyFrom(sha(root))
    raw.upload(command.SerializeToString(), root, action.SerializeToString())
    req = fastpb.ExecuteRequest()
    req.action_digest.CopyFrom(sha(action.SerializeToString()))
    before = thread_daemon.finished_actions

    def execute(i: int) -> Any:
        out = raw.server_stream(EXECUTION + "Execute", req.SerializeToString(), timeout=30)
        assert out.ok, out
        op = fastpb.Operation.FromString(out.responses[-1])
        assert op.done, op
        resp = fastpb.ExecuteResponse()
        op.response.Unpack(resp)
        return resp

    results = _in_threads(12, execute)
    assert thread_daemon.finished_actions - before == 1, "the action ran more than once"
    stdouts = {r.result.stdout_raw for r in results}
    assert all(r.status.code == 0 and r.result.exit_code == 0 for r in results), results
    assert len(stdouts) == 1, stdouts  # the fake worker's stdout names the operation
    health.check("one action from many clients")
