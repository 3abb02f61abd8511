"""The exceptions testbus raises.

Every error the server returns becomes one of the :class:`TestbusError`
subclasses below, carrying the server's message; each also derives from the
built-in exception a Python programmer would catch for it (``LookupError``,
``ValueError``, ``PermissionError``, ``ConnectionError``).
"""

from __future__ import annotations

from typing import List, Optional, Protocol

import grpc

__all__ = [
    "TestbusError",
    "NotFound",
    "Invalid",
    "PermissionDenied",
    "Conflict",
    "Unavailable",
    "ClaimError",
    "ProcessError",
]


class TestbusError(Exception):
    """An error from testbus; ``message`` is what the server (or client) said."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class NotFound(TestbusError, LookupError):
    """The object named does not exist."""


class Invalid(TestbusError, ValueError):
    """The request was refused as invalid; ``field`` is the path of the field
    the server named (``spec.hosts[0].role``), or None."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(message, code)
        head, sep, _ = message.partition(": ")
        self.field: Optional[str] = head if sep and " " not in head else None


class PermissionDenied(TestbusError, PermissionError):
    """The caller may not do this (or has no valid certificate)."""


class Conflict(TestbusError):
    """The object changed meanwhile, already exists, or is in a state that
    does not allow this (a test that is not running)."""


class Unavailable(TestbusError, ConnectionError):
    """No server could be reached, after failing over between every address
    and retrying."""


class ClaimError(TestbusError):
    """A test could not claim its hosts: it cannot run on the hosts that exist
    (``reason`` Unsatisfiable), or it ended while pending."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProcessError(TestbusError):
    """A command did not succeed. It carries everything a caller needs to say
    why: the exit code (None when it was killed or never ran), both outputs,
    and the process's own account (``phase``, ``reason``, ``message``)."""

    def __init__(self, result: "RunResultLike") -> None:
        what = " ".join(result.command) if result.command else result.process
        if result.rc is not None and result.reason in ("NonZeroExit", "Completed", ""):
            why = f"exit code {result.rc}"
        else:
            why = result.message or result.reason or result.phase
        tail = result.stderr.strip().splitlines()[-5:]
        detail = ("\n" + "\n".join(tail)) if tail else ""
        super().__init__(f"{what!r} on {result.member} ({result.host}): {why}{detail}")
        self.result = result
        self.rc = result.rc
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.phase = result.phase
        self.reason = result.reason


class RunResultLike(Protocol):
    """What a ProcessError carries (:class:`testbus.RunResult`)."""

    command: List[str]
    process: str
    member: str
    host: str
    rc: Optional[int]
    stdout: str
    stderr: str
    phase: str
    reason: str
    message: str


_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: Invalid,
    grpc.StatusCode.OUT_OF_RANGE: Invalid,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc(error: grpc.RpcError) -> TestbusError:
    """The typed exception for a failed call."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    message = details or str(error)
    cls = _BY_CODE.get(code, TestbusError)
    return cls(message, code)
