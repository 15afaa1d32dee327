"""Exceptions for errors the daemon (or the client talking to it) reports.

Every error is a :class:`MaplError` carrying the gRPC status code (``.code``, e.g. 3) and its name
(``.code_name``, e.g. ``"INVALID_ARGUMENT"``); the message is the daemon's, unchanged. The
subclasses also derive from the matching built-in exception, so generic handlers work::

    try:
        h = sidecar.recv_activation(0, step, mb, timeout=5.0)
    except TimeoutError:          # mapl.DeadlineExceeded
        ...
    except ValueError as e:       # mapl.InvalidArgument, AlreadyExists, FailedPrecondition, OutOfRange
        print(e.code_name, e)

Two families tell a caller what to do. :class:`Transient` errors (:class:`Unavailable`,
:class:`Aborted`) are the state of a link or a daemon, not the call: the same call may succeed
later (``e.retryable`` is True). The ``ValueError`` ones are misuse: the call itself is wrong and
fails the same way again.
"""

from __future__ import annotations

from typing import Dict, Type

__all__ = ["MaplError", "Transient", "Cancelled", "InvalidArgument", "DeadlineExceeded", "NotFound",
           "AlreadyExists", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
           "Internal", "Unavailable", "DataLoss", "error_from_status"]

_CODE_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
               "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
               "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
               "UNAUTHENTICATED")


class MaplError(RuntimeError):
    """An error from mapld or the mapl client; ``code`` is the gRPC status code."""

    code: int = 2  # UNKNOWN, for the base class

    def __init__(self, message: str, code: int | None = None) -> None:
        # One positional argument only: OSError-derived subclasses (TimeoutError,
        # ConnectionError) would read two as (errno, strerror).
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later (a :class:`Transient` error)."""
        return isinstance(self, Transient)

    @property
    def code_name(self) -> str:
        return _CODE_NAMES[self.code] if 0 <= self.code < len(_CODE_NAMES) else "UNKNOWN"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.message, self.code))


class Transient(MaplError):
    """The state of a link or a daemon, not the call, failed it: a peer unreachable, a frame
    whose dictionary version never came, a send the peer's daemon failed to encode. Retry the call
    (or the step) once the state has changed; never a ``ValueError``."""


class Cancelled(MaplError):
    code = 1


class InvalidArgument(MaplError, ValueError):
    """A bad tensor reference, shape, dtype, boundary or direction."""
    code = 3


class DeadlineExceeded(MaplError, TimeoutError):
    """Nothing arrived before the timeout (Recv, Step)."""
    code = 4


class NotFound(MaplError, LookupError):
    """Something named in the call does not exist (a session the daemon no longer knows)."""
    code = 5


class AlreadyExists(MaplError, ValueError):
    """The tensor of this (step, microbatch) was already sent; each is sent once."""
    code = 6


class ResourceExhausted(MaplError):
    """Out of shared memory (or another resource) on the client or the daemon."""
    code = 8


class FailedPrecondition(MaplError, ValueError):
    """The call does not fit the state it is in (e.g. the client is closed)."""
    code = 9


class Aborted(Transient):
    """The tensor will not come: the peer's daemon failed to encode it (the reason is in the
    message). Retry the step."""
    code = 10


class OutOfRange(MaplError, ValueError):
    code = 11


class Internal(MaplError):
    """A broken invariant inside mapld or the client: a bug, report it with the daemon's log."""
    code = 13


class Unavailable(Transient, ConnectionError):
    """mapld is not running (or went away), its peer is unreachable, or a frame's dictionary
    version has not arrived."""
    code = 14


class DataLoss(MaplError):
    """A frame arrived corrupt (checksum or shape) and was rejected, never decoded."""
    code = 15


_BY_CODE: Dict[int, Type[MaplError]] = {
    cls.code: cls for cls in (Cancelled, InvalidArgument, DeadlineExceeded, NotFound,
                              AlreadyExists, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
                              Internal, Unavailable, DataLoss)
}


def error_from_status(code: int, message: str) -> MaplError:
    """The exception for a non-OK status: the most specific class for ``code``."""
    cls = _BY_CODE.get(code, MaplError)
    return cls(message, code)
