"""How a remote CAS's failures become our errors (for clients of another REAPI endpoint: the
`grpc` store, the worker's CAS access).

Infrastructure trouble (the endpoint unreachable, UNAVAILABLE) is `Unavailable`, which callers
may retry elsewhere; what the endpoint refused with a precise status keeps that status; anything
else is `Internal`. Callers tell these apart by class, never by grpclib's exception types.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from reexec.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ReexecError,
    ResourceExhausted,
    Unavailable,
)

# What a lost or refused connection raises (not local disk errors, which are OSErrors too).
UNREACHABLE = (ConnectionError, StreamTerminatedError, TimeoutError, socket.gaierror)

_STATUS_ERRORS: dict[int, type[ReexecError]] = {
    Status.UNAVAILABLE.value: Unavailable,
    Status.RESOURCE_EXHAUSTED.value: ResourceExhausted,
    Status.INVALID_ARGUMENT.value: InvalidArgument,
    Status.DEADLINE_EXCEEDED.value: DeadlineExceeded,
    Status.NOT_FOUND.value: NotFound,
}


def from_status(code: int, message: str) -> ReexecError:
    """The ReexecError for a status the remote answered (unknown ones are Internal)."""
    return _STATUS_ERRORS.get(code, Internal)(message)


@contextmanager
def remote_errors(what: str) -> Iterator[None]:
    """gRPC failures inside the block as ReexecErrors naming `what`."""
    try:
        yield
    except GRPCError as e:
        raise from_status(e.status.value, f"{what}: {e.message or e.status.name}") from None
    except UNREACHABLE as e:
        raise Unavailable(f"{what}: the CAS is unreachable: {e}") from None
