"""URLs of web UI pages, and the link a failed action's ExecuteResponse.message carries.

Bazel prints ExecuteResponse.message when an action fails remotely, so a link there takes the
person reading the build's output straight to the action's page (as Buildbarn does).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from grpclib.const import Status

from reexec import fastpb
from reexec.sched.state import Operation


def operation_path(name: str) -> str:
    return f"/operation/{quote(name, safe='')}"


def action_path(action_hash: str, size: int) -> str:
    return f"/action/{quote(action_hash, safe='')}/{size}"


def _exit_code(result: bytes) -> int:
    if not result:
        return 0
    msg = fastpb.ActionResult()
    try:
        msg.MergeFromString(result)
    except Exception:
        return 0
    return msg.exit_code


def failure_link(base_url: str) -> Callable[[Operation], str] | None:
    """A function giving the text to append to a completed operation's message: the URL of its
    page when it failed (an error status, a timeout, or a non-zero exit code), else "".
    None when no base URL is configured (no link can be formed)."""
    if not base_url:
        return None
    base = base_url.rstrip("/")

    def link(op: Operation) -> str:
        outcome = op.outcome
        if outcome is None or outcome.cached_result:
            return ""
        if outcome.status is Status.OK and _exit_code(outcome.result) == 0:
            return ""
        return f"reexec: details of this action at {base}{operation_path(op.name)}"

    return link


__all__ = ["action_path", "failure_link", "operation_path"]
