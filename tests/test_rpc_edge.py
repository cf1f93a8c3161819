"""Odd inputs at the gRPC edge get precise statuses, never INTERNAL (issue 9)."""

from __future__ import annotations

import errno

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import given, settings
from hypothesis import strategies as st

from reexec import fastpb
from reexec.errors import InvalidArgument
from reexec.gen.build.bazel.remote.execution import v2 as re
from reexec.rpc import RpcGate, guard, parse_page_token
from tests.conftest import call, collect
from tests.test_cas_service import sha, upload


@pytest.mark.parametrize("token", ["²", "1" * 5000, "-1", " 1", "0x10", "1.0"])
def test_odd_page_tokens_are_invalid_argument(token):
    with pytest.raises(InvalidArgument, match="invalid page_token"):
        parse_page_token(token)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_page_token_parser_never_fails_otherwise(token):
    try:
        value = parse_page_token(token)
    except InvalidArgument:
        return
    assert value == (int(token) if token else 0) and value >= 0


async def test_get_tree_with_an_odd_page_token(channel):
    cas = re.ContentAddressableStorageStub(channel)
    root = re.Directory()
    await upload(cas, bytes(root))
    for token in ("²", "9" * 5000):
        with pytest.raises(GRPCError) as e:
            await collect(
                cas.get_tree, re.GetTreeRequest(root_digest=sha(bytes(root)), page_token=token)
            )
        assert e.value.status is Status.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (errno.EMFILE, Status.UNAVAILABLE),
        (errno.ENFILE, Status.UNAVAILABLE),
        (errno.ENOSPC, Status.RESOURCE_EXHAUSTED),
        (errno.EIO, Status.INTERNAL),
    ],
)
async def test_os_errors_map_to_resource_statuses(code, status):
    async def handler(stream):
        raise OSError(code, "boom")

    class _Stream:
        metadata: dict = {}

    wrapped = guard(RpcGate(), "/x.Y/Z", handler)
    with pytest.raises(GRPCError) as e:
        await wrapped(_Stream())
    assert e.value.status is status
    assert "internal error in" not in e.value.message  # the failure is named


async def test_wait_operation_with_a_negative_timeout(aio_loop, tmp_path, nursery):
    from tests.conftest import make_config, open_channel, start_daemon
    from tests.test_execution_service import _Ops, _req

    daemon = await start_daemon(nursery, make_config(tmp_path / "data"))
    channel = await open_channel(daemon.port)
    try:
        ops = _Ops(channel)
        req = _req("WaitOperationRequest", name="whatever")
        req.timeout.seconds = -5
        with pytest.raises(GRPCError) as e:
            await call(ops._unary, "WaitOperation", req, fastpb.Operation)
        assert e.value.status is Status.INVALID_ARGUMENT
        assert "negative" in e.value.message
    finally:
        channel.close()
