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
"""

from __future__ import annotations

from typing import Dict, Type

__all__ = ["MaplError", "Cancelled", "InvalidArgument", "DeadlineExceeded", "NotFound",
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
    def code_name(self) -> str:
        return _CODE_NAMES[self.code] if 0 <= self.code < len(_CODE_NAMES) else "UNKNOWN"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.message, self.code))


class Cancelled(MaplError):
    code = 1


class InvalidArgument(MaplError, ValueError):
    """A bad tensor reference, shape, dtype, boundary or direction."""
    code = 3


class DeadlineExceeded(MaplError, TimeoutError):
    """Nothing arrived before the timeout (Recv, Step)."""
    code = 4


class NotFound(MaplError, LookupError):
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


class Aborted(MaplError):
    code = 10


class OutOfRange(MaplError, ValueError):
    code = 11


class Internal(MaplError):
    code = 13


class Unavailable(MaplError, ConnectionError):
    """mapld is not running (or went away), or its peer is unreachable."""
    code = 14


class DataLoss(MaplError):
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
