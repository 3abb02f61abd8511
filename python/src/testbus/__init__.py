"""testbus for Python: claim several hosts at once, run commands on them,
synchronise them, and record results.

The synchronous API is here (:class:`Client`); :mod:`testbus.aio` is its
asyncio twin; :mod:`testbus.intest` (re-exported: :func:`sync`,
:func:`send`, :func:`recv`) is for code running inside a test process; the
pytest plugin is :mod:`testbus.pytest_plugin`. The generated gRPC stubs are
:mod:`testbus.v1`.
"""

from .aio import PIPE, Role, RunResult
from .client import Client, Group, Host, Process, Test
from .errors import (
    ClaimError,
    Conflict,
    Invalid,
    NotFound,
    PermissionDenied,
    ProcessError,
    TestbusError,
    Unavailable,
)
from .intest import in_test, recv, recv_all, send, sync

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Test",
    "Host",
    "Group",
    "Process",
    "Role",
    "RunResult",
    "PIPE",
    "TestbusError",
    "NotFound",
    "Invalid",
    "PermissionDenied",
    "Conflict",
    "Unavailable",
    "ClaimError",
    "ProcessError",
    "sync",
    "send",
    "recv",
    "recv_all",
    "in_test",
]
