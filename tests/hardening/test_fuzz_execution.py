"""Fuzzing Execution (Execute, WaitExecution) and Operations with hostile requests, Actions,
Commands and input-root DAGs.

The module's daemon has a fake worker (platform os=linux, cores=4) that finishes every action
with exit code 0, so a valid request runs to COMPLETED; an action asking for another os stays
QUEUED, which gives the Operations fuzzers live operations to cancel, wait for and delete.

Property: success (an Execute stream that reaches `done`, or one that stays queued and keeps
answering) or a precise status; never INTERNAL/UNKNOWN, never silence; the daemon stays healthy.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reexec import fastpb
from tests.hardening import strategies as s
from tests.hardening.conftest import (
    EXECUTION,
    OPERATIONS,
    Health,
    Outcome,
    RawClient,
    ThreadDaemon,
    assert_precise,
)

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# How long an Execute stream is followed before the client leaves (a queued action never ends).
FOLLOW_S = 3.0
# Once the stream has answered, how long to wait for more before leaving.
LINGER_S = 0.3


@dataclass
class ExecuteOutcome:
    code: grpc.StatusCode
    details: str = ""
    operations: list[Any] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.operations) and self.operations[-1].done


def follow_execute(raw: RawClient, method: str, request: bytes) -> ExecuteOutcome:
    """Read an Execute/WaitExecution stream until the operation is done or an error; an
    operation still live LINGER_S after the first answer is left (the client goes away, as
    Bazel does on Ctrl-C). No answer at all within FOLLOW_S is a hang."""
    call = raw.channel.unary_stream(method)(request, timeout=FOLLOW_S)
    ops: list[Any] = []
    timer = threading.Timer(FOLLOW_S, call.cancel)
    try:
        for msg in call:
            op = fastpb.Operation.FromString(msg)
            ops.append(op)
            if op.done:
                return ExecuteOutcome(grpc.StatusCode.OK, operations=ops)
            if len(ops) == 1:
                timer = threading.Timer(LINGER_S, call.cancel)
                timer.start()
        return ExecuteOutcome(grpc.StatusCode.OK, operations=ops)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED) and ops:
            return ExecuteOutcome(grpc.StatusCode.OK, "still running", ops)  # alive and queued
        return ExecuteOutcome(code, details, ops)
    finally:
        timer.cancel()
        call.cancel()


def check_execute(out: ExecuteOutcome, what: object) -> None:
    assert_precise(Outcome(out.code, out.details), what)
    if os.environ.get("HARDENING_EVENTS"):  # the mix of error messages in the statistics
        event(out.details[:70] + " ... " + out.details[-70:])
    if out.done:
        op = out.operations[-1]
        assert op.WhichOneof("result") == "response", f"Operation.error is never used: {op}"
        resp = fastpb.ExecuteResponse()
        assert op.response.Unpack(resp), op
        event(f"completed with status {resp.status.code}")


# -- strategies -------------------------------------------------------------------------------


@st.composite
def actions(draw: st.DrawFn, raw: RawClient, plausible: bool) -> tuple[Any, Any]:
    """(Action, Command), blobs uploaded. A plausible one is well formed (it should run); the
    others have hostile Commands, DAGs, digests, timeouts, platforms, or blobs left out."""
    if plausible:
        command = draw(s.plausible_commands())
        root, dirs = draw(s.valid_dags())
    else:
        command = draw(st.one_of(s.plausible_commands(), s.commands()))
        root, dirs = draw(s.dags())
    command_bytes = command.SerializeToString()
    action = fastpb.Action(do_not_cache=draw(st.booleans()), salt=draw(st.binary(max_size=8)))
    action.command_digest.CopyFrom(s.digest_of(command_bytes))
    action.input_root_digest.CopyFrom(root)
    if plausible:
        if draw(st.booleans()):
            action.timeout.seconds = draw(st.integers(1, 600))
        if draw(st.booleans()):
            action.platform.properties.add(name="os", value="linux")
        raw.upload(command_bytes, *dirs)
        return action, command
    if draw(st.integers(0, 6)) == 0:
        action.command_digest.CopyFrom(draw(s.digests()))
    if draw(st.integers(0, 6)) == 0:
        action.input_root_digest.CopyFrom(draw(s.digests()))
    if draw(st.integers(0, 3)) == 0:
        action.timeout.CopyFrom(draw(s.durations()))
    if draw(st.integers(0, 3)) == 0:
        action.platform.CopyFrom(draw(s.platforms()))
    if draw(st.integers(0, 5)):
        raw.upload(command_bytes, *dirs)
    return action, command


@st.composite
def execute_requests(draw: st.DrawFn, raw: RawClient) -> Any:
    plausible = draw(st.booleans())
    action, _ = draw(actions(raw, plausible))
    action_bytes = action.SerializeToString()
    if plausible:
        req = fastpb.ExecuteRequest(
            instance_name=draw(st.sampled_from(["", "main"])),
            skip_cache_lookup=draw(st.booleans()),
            digest_function=draw(st.sampled_from([0, 1])),
        )
        raw.upload(action_bytes)
        req.action_digest.CopyFrom(s.digest_of(action_bytes))
        if draw(st.booleans()):
            req.execution_policy.priority = draw(st.integers(-1000, 1000))
        return req
    req = fastpb.ExecuteRequest(
        instance_name=draw(s.instance_names),
        skip_cache_lookup=draw(st.booleans()),
        digest_function=draw(st.one_of(st.just(0), s.digest_functions)),
    )
    if draw(st.integers(0, 5)):
        raw.upload(action_bytes)
        req.action_digest.CopyFrom(s.digest_of(action_bytes))
    else:
        req.action_digest.CopyFrom(draw(s.digests()))
    if draw(st.booleans()):
        req.execution_policy.priority = draw(st.integers(-(2**31), 2**31 - 1))
    if draw(st.booleans()):
        req.results_cache_policy.priority = draw(st.integers(-(2**31), 2**31 - 1))
    return req


def start_operation(raw: RawClient, queued: bool, salt: bytes) -> str:
    """A real operation: one that completes at once, or one that stays queued (os=other)."""
    command = fastpb.Command(arguments=["/bin/true"])
    root = fastpb.Directory().SerializeToString()
    action = fastpb.Action(salt=salt, do_not_cache=True)
    action.command_digest.CopyFrom(s.digest_of(command.SerializeToString()))
    action.input_root_digest.CopyFrom(s.digest_of(root))
    if queued:
        action.platform.properties.add(name="os", value="other")
    raw.upload(command.SerializeToString(), root, action.SerializeToString())
    req = fastpb.ExecuteRequest()
    req.action_digest.CopyFrom(s.digest_of(action.SerializeToString()))
    out = follow_execute(raw, EXECUTION + "Execute", req.SerializeToString())
    assert out.code is grpc.StatusCode.OK and out.operations, out
    return out.operations[0].name


@st.composite
def operation_names(draw: st.DrawFn, raw: RawClient) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.one_of(s.names, s.paths, st.text(max_size=60)))
    name = start_operation(raw, queued=kind == 1, salt=draw(st.binary(min_size=8, max_size=8)))
    if kind == 3:
        name = draw(st.sampled_from([name + "x", name.upper(), name[:-1], "operations/" + name]))
    return name


def _lro(name: str) -> Any:
    return fastpb.message_class(f"google.longrunning.{name}")


@st.composite
def operations_calls(draw: st.DrawFn, raw: RawClient) -> tuple[str, Any]:
    method = draw(st.sampled_from(["GetOperation", "ListOperations", "CancelOperation",
                                   "DeleteOperation", "WaitOperation"]))  # fmt: skip
    if method == "ListOperations":
        req = _lro("ListOperationsRequest")(
            name=draw(s.names),
            filter=draw(st.one_of(st.just(""), st.text(max_size=10))),
            page_size=draw(st.integers(-(2**31), 2**31 - 1)),
            page_token=draw(s.page_tokens),
        )
        return method, req
    req = _lro(method.replace("Operation", "OperationRequest"))(name=draw(operation_names(raw)))
    if method == "WaitOperation":
        # A live operation is waited for at most ~2 s, well within the client's deadline.
        req.timeout.seconds = draw(st.sampled_from([0, 1, -1, -(2**40), -(2**63)]))
        req.timeout.nanos = draw(st.sampled_from([0, 1000, 999_999_999, -1, -(2**31)]))
    return method, req


# -- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _deep_check_after(health: Health, thread_daemon: ThreadDaemon):
    yield
    health.deep_check()
    # An action still runs to completion on the worker after everything the fuzzers sent.
    before = thread_daemon.finished_actions
    start_operation(health.client, queued=False, salt=b"final check")
    assert thread_daemon.finished_actions == before + 1


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_execute(raw: RawClient, health: Health, data: st.DataObject) -> None:
    req = data.draw(execute_requests(raw), label="request")
    wire = req.SerializeToString()
    if data.draw(st.integers(0, 4), label="mutate") == 0:
        wire = data.draw(s.mutated(wire), label="mutated bytes")
        try:
            req = fastpb.ExecuteRequest.FromString(wire)
        except Exception:
            event("undecodable")
            return
    out = follow_execute(raw, EXECUTION + "Execute", wire)
    check_execute(out, req)
    health.check(req)


@FUZZ
@given(data=st.data())
def test_wait_execution(raw: RawClient, health: Health, data: st.DataObject) -> None:
    name = data.draw(operation_names(raw), label="name")
    req = fastpb.message_class("build.bazel.remote.execution.v2.WaitExecutionRequest")(name=name)
    out = follow_execute(raw, EXECUTION + "WaitExecution", req.SerializeToString())
    check_execute(out, req)
    health.check(req)


@FUZZ
@given(data=st.data())
def test_operations(raw: RawClient, health: Health, data: st.DataObject) -> None:
    method, req = data.draw(operations_calls(raw), label="call")
    out = raw.unary(OPERATIONS + method, req.SerializeToString(), timeout=5)
    assert_precise(out, (method, req))
    health.check((method, req))


@pytest.mark.parametrize("seconds", [-1, -(2**40)])
def test_wait_operation_negative_timeout(raw: RawClient, health: Health, seconds: int) -> None:
    """WaitOperation with a negative timeout on a live operation (found by test_operations,
    INTERNAL until 37761cc): answered at once, INVALID_ARGUMENT or the current state."""
    name = start_operation(raw, queued=True, salt=b"negative timeout")
    req = _lro("WaitOperationRequest")(name=name)
    req.timeout.seconds = seconds
    out = raw.unary(OPERATIONS + "WaitOperation", req.SerializeToString(), timeout=5)
    assert_precise(out, req)
    health.check(req)
