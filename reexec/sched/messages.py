"""Operation records rendered as google.longrunning.Operation messages (upb classes)."""

from __future__ import annotations

from reexec import fastpb
from reexec.sched.state import Operation, Stage


def operation_message(op: Operation) -> fastpb.Message:
    _, h, size, fn = op.action_key
    msg = fastpb.Operation(name=op.name, done=op.done)
    meta = fastpb.ExecuteOperationMetadata(stage=int(op.stage), digest_function=fn)
    meta.action_digest.hash = h
    meta.action_digest.size_bytes = size
    msg.metadata.Pack(meta)
    if op.stage is Stage.COMPLETED and op.outcome is not None:
        msg.response.Pack(execute_response(op))
    return msg


def execute_response(op: Operation) -> fastpb.Message:
    outcome = op.outcome
    assert outcome is not None
    resp = fastpb.ExecuteResponse(cached_result=outcome.cached_result, message=outcome.message)
    if outcome.result:
        resp.result.MergeFromString(outcome.result)
    resp.status.code = outcome.status.value
    resp.status.message = outcome.message
    for type_url, value in outcome.status_details:
        detail = resp.status.details.add()
        detail.type_url = type_url
        detail.value = value
    for name, log_file in outcome.server_logs:
        resp.server_logs[name].MergeFromString(log_file)
    return resp
