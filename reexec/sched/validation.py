"""Checks an ExecuteRequest before anything is queued.

Errors here are gRPC errors of the Execute call itself (REAPI: errors found while creating the
operation). Missing Action, Command or input root is FAILED_PRECONDITION with one MISSING
violation per blob, which makes clients re-upload them. Blobs deeper in the input tree are
checked by the worker when it fetches them (checking every file here would read the whole tree
on the scheduler for each Execute).
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.digest import Digest, make_digest
from reexec.cas.store import BlobNotFound, Store
from reexec.errors import InvalidArgument, missing_blobs_error
from reexec.rpc import check_instance
from reexec.sched.matching import queue_key
from reexec.sched.scheduler import ActionSpec, SchedulerSettings


async def _read(cas: Store, digest: Digest) -> bytes | None:
    try:
        return await cas.get_bytes(digest)
    except BlobNotFound:
        return None


def _parse(cls: type, data: bytes, what: str, digest: Digest) -> fastpb.Message:
    try:
        return cls.FromString(data)
    except DecodeError:
        raise InvalidArgument(
            f"{what} {digest.blob_path} is not a valid {cls.__name__} message"
        ) from None


def _timeout_s(action: fastpb.Message, settings: SchedulerSettings) -> float:
    if not action.HasField("timeout"):
        requested = 0.0
    else:
        t = action.timeout
        if t.seconds < 0 or t.nanos < 0:
            raise InvalidArgument("Action.timeout is negative")
        requested = t.seconds + t.nanos / 1e9
    if requested == 0:
        return min(settings.default_action_timeout_s, settings.max_action_timeout_s)
    if settings.max_action_timeout_s and requested > settings.max_action_timeout_s:
        raise InvalidArgument(
            f"Action.timeout {requested:g}s is above this server's maximum of "
            f"{settings.max_action_timeout_s:g}s"
        )
    return requested


async def validate_execute(
    request: fastpb.Message, cas: Store, settings: SchedulerSettings, instances: Sequence[str]
) -> tuple[ActionSpec, fastpb.Message, fastpb.Message]:
    """The ActionSpec for `request`, plus its parsed Action and Command."""
    check_instance(instances, request.instance_name)
    d = request.action_digest
    digest = make_digest(d.hash, d.size_bytes, request.digest_function)
    fn = int(digest.function)

    action_bytes = await _read(cas, digest)
    if action_bytes is None:
        raise missing_blobs_error("Execute: the Action", [digest.blob_path])
    action = _parse(fastpb.Action, action_bytes, "Action", digest)
    if not action.HasField("command_digest"):
        raise InvalidArgument(f"Action {digest.blob_path} has no command_digest")
    command_digest = make_digest(action.command_digest.hash, action.command_digest.size_bytes, fn)
    if not action.HasField("input_root_digest"):
        raise InvalidArgument(f"Action {digest.blob_path} has no input_root_digest")
    root_digest = make_digest(
        action.input_root_digest.hash, action.input_root_digest.size_bytes, fn
    )

    command_bytes = await _read(cas, command_digest)
    missing = [] if command_bytes is not None else [command_digest.blob_path]
    if not await cas.has(root_digest):
        missing.append(root_digest.blob_path)
    if missing:
        raise missing_blobs_error(f"Execute {digest.blob_path}", missing)
    assert command_bytes is not None
    command = _parse(fastpb.Command, command_bytes, "Command", command_digest)
    if not command.arguments:
        raise InvalidArgument(f"Command {command_digest.blob_path} has no arguments")

    timeout_s = _timeout_s(action, settings)
    # REAPI 2.2 moved the platform to the Action; older clients (Bazel 4) set both.
    platform = action.platform if action.HasField("platform") else command.platform
    key = queue_key(
        [(p.name, p.value) for p in platform.properties], settings.rules, settings.modifiers
    )
    policy = request.execution_policy
    spec = ActionSpec(
        instance=request.instance_name,
        digest=digest,
        priority=policy.priority if request.HasField("execution_policy") else 0,
        queue_key=key,
        do_not_cache=action.do_not_cache,
        skip_cache_lookup=request.skip_cache_lookup,
        timeout_s=timeout_s,
    )
    return spec, action, command
