"""Helpers for code that runs *inside* a test process: barriers and
messages between the test's hosts, through the agent's socket for this
process (``$TESTBUS_AGENT_SOCKET``), which adds who is speaking, as
``testbusctl sync``/``send``/``recv`` do.

::

    import testbus
    testbus.sync("server-up", roles=["server", "client"], timeout=60)
    testbus.send("address", "10.0.0.1")          # from the server
    addr = testbus.recv("address", sender="server")  # on a client
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence, Union

import grpc

from . import errors
from .aio import _ENV, duration
from .v1 import api_pb2, api_pb2_grpc

__all__ = ["sync", "send", "recv", "recv_all", "in_test"]


def in_test() -> bool:
    """Whether this process runs inside a testbus test."""
    return bool(os.environ.get("TESTBUS_AGENT_SOCKET"))


_STUBS: Dict[str, api_pb2_grpc.SyncStub] = {}


def _stub() -> api_pb2_grpc.SyncStub:
    path = os.environ.get("TESTBUS_AGENT_SOCKET")
    if not path:
        raise errors.TestbusError("TESTBUS_AGENT_SOCKET is not set: this runs only inside a testbus process")
    if path not in _STUBS:
        # gRPC's default authority for a socket is its path, which the
        # agent's HTTP/2 server refuses as an authority.
        channel = grpc.insecure_channel(f"unix:{path}", options=[("grpc.default_authority", "localhost")])
        _STUBS[path] = api_pb2_grpc.SyncStub(channel)
    return _STUBS[path]


def _call(fn):  # type: ignore[no-untyped-def]
    """``fn``, again while the agent's socket is unreachable (an agent
    reconnecting), for 30 s at most."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            unreachable = getattr(e, "code", lambda: None)() == grpc.StatusCode.UNAVAILABLE
            if not unreachable or time.monotonic() >= deadline:
                raise errors.from_rpc(e) from None
            time.sleep(0.2)


def _key(key: str, arg: str) -> str:
    if not isinstance(key, str) or not key or len(key) > 253 or not all(c.isalnum() or c in "._-" for c in key):
        raise ValueError(f"{arg}: {key!r} must be 1 to 253 of A-Z, a-z, 0-9, '.', '_' and '-'")
    return key


def sync(name: str, roles: Optional[Sequence[str]] = None, timeout: Optional[float] = None) -> List[str]:
    """Waits until every member of the test (or of ``roles``) has arrived at
    barrier ``name``; the participants. Fails at once
    (:class:`~testbus.errors.Conflict`) if one of them can no longer arrive."""
    if isinstance(roles, str):
        raise ValueError(f"roles: a list of roles or members, not the string {roles!r}")
    req = api_pb2.BarrierRequest(name=_key(name, "name"), roles=list(roles or []), timeout=duration(timeout, "timeout"))
    return list(_call(lambda: _stub().Barrier(req)).participants)


def send(key: str, value: Union[str, bytes] = b"") -> None:
    """Sends ``key`` from this member; a value, once sent, cannot change."""
    if isinstance(value, str):
        data = value.encode()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise ValueError(f"value: str or bytes, not {type(value).__name__}")
    _call(lambda: _stub().Send(api_pb2.SendRequest(key=_key(key, "key"), value=data)))


def recv_all(key: str, sender: str = "", timeout: Optional[float] = None) -> List["tuple[str, bytes]"]:
    """Waits for ``key`` from ``sender`` (a member, or a role: every member
    of it; empty: whatever has been sent); (sender, value) pairs."""
    if sender and not _ENV.match(sender.replace("-", "_")):
        raise ValueError(f"sender: {sender!r} is not a role or member name")
    req = api_pb2.RecvRequest(key=_key(key, "key"), timeout=duration(timeout, "timeout"))
    setattr(req, "from", sender)
    return [(m.sender, m.value) for m in _call(lambda: _stub().Recv(req)).messages]


def recv(key: str, sender: str = "", timeout: Optional[float] = None) -> str:
    """The value of ``key`` from one sender, as text (see :func:`recv_all`)."""
    got = recv_all(key, sender, timeout)
    if len(got) != 1:
        raise ValueError(f"sender: {len(got)} members sent {key!r}; use recv_all for a role with several")
    return got[0][1].decode(errors="replace")
