"""Domain errors that carry the gRPC status they map to.

Pure code (stores, parsers, the scheduler) raises these; only the gRPC edge turns them into
wire statuses, so the same code is testable without grpclib.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grpclib.const import Status


@dataclass(frozen=True, slots=True)
class Violation:
    """One google.rpc.PreconditionFailure.Violation (or a BadRequest field violation)."""

    type: str
    subject: str
    description: str = ""


class ReexecError(Exception):
    """Base class: an error with a gRPC status code and a precise message."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str, violations: Sequence[Violation] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations: tuple[Violation, ...] = tuple(violations)


class InvalidArgument(ReexecError):
    status = Status.INVALID_ARGUMENT


class NotFound(ReexecError):
    status = Status.NOT_FOUND


class FailedPrecondition(ReexecError):
    status = Status.FAILED_PRECONDITION


class OutOfRange(ReexecError):
    status = Status.OUT_OF_RANGE


class ResourceExhausted(ReexecError):
    status = Status.RESOURCE_EXHAUSTED


class Unavailable(ReexecError):
    status = Status.UNAVAILABLE


class DeadlineExceeded(ReexecError):
    status = Status.DEADLINE_EXCEEDED


class Internal(ReexecError):
    status = Status.INTERNAL


class PermissionDenied(ReexecError):
    status = Status.PERMISSION_DENIED


def missing_blobs_error(what: str, subjects: Sequence[str]) -> FailedPrecondition:
    """FAILED_PRECONDITION with one MISSING violation per blob, subject `blobs/{hash}/{size}`."""
    shown = ", ".join(subjects[:5]) + (
        f" and {len(subjects) - 5} more" if len(subjects) > 5 else ""
    )
    return FailedPrecondition(
        f"{what}: {len(subjects)} blob(s) missing from the CAS: {shown}",
        [Violation("MISSING", s, f"blob {s} is not in the CAS") for s in subjects],
    )
