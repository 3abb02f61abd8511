"""Where the control plane is, how to prove who we are, and calls that fail
over between replicas: the same rules as ``testbusctl``.

The address: the ``server`` argument, else ``$TESTBUS_SERVER``, else the
config file's, else the socket of a control plane running here with its
default data dir, else ``https://127.0.0.1:7780``. It is
``https://host:port`` (``http://`` or a bare ``host:port`` for an insecure
server), a comma-separated list of them (replicas), ``unix:/path`` or
``unix+tls:/path``. The credentials: the config file (``config`` argument,
else ``$TESTBUS_CONFIG``, else ``~/.config/testbus/config.yaml``), written by
``testbus-control-plane user create``.

A :class:`Connection` owns one channel per address. A call goes to the
address that last answered; when that one is unreachable it moves to the
next, retrying with a backoff until ``retry_for`` has passed, then raises
:class:`~testbus.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, List, Optional, Tuple, TypeVar, Union

import grpc
import grpc.aio

from . import errors
from .v1 import api_pb2_grpc

__all__ = ["Settings", "Connection", "DEFAULT_SERVER", "SERVER_NAME"]

DEFAULT_SERVER = "https://127.0.0.1:7780"
#: The name a control plane's certificate always carries (checked for
#: ``unix+tls:`` sockets, which have no host name).
SERVER_NAME = "testbus-control-plane"

# A dead peer is noticed within ~15 s, a call never waits on one forever.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


@dataclass(frozen=True)
class Settings:
    """What a connection needs: the addresses and the TLS material (PEM)."""

    server: str
    certificate_authority: bytes = b""
    client_certificate: bytes = b""
    client_key: bytes = b""
    config_path: Optional[Path] = None

    @staticmethod
    def resolve(server: Optional[str] = None, config: Optional[Union[str, os.PathLike]] = None) -> "Settings":
        """The settings ``testbusctl`` would use, given its ``--server`` and
        ``$TESTBUS_CONFIG``."""
        path, named = _config_path(config)
        data: dict = {}
        if named or path.exists():
            data = _load_config(path)
        address = server or os.environ.get("TESTBUS_SERVER") or data.get("server") or _local_socket() or DEFAULT_SERVER
        return Settings(
            server=address,
            certificate_authority=data.get("certificateAuthority", "").encode(),
            client_certificate=data.get("clientCertificate", "").encode(),
            client_key=data.get("clientKey", "").encode(),
            config_path=path if data else None,
        )

    def addresses(self) -> List["Address"]:
        return parse_server(self.server)


@dataclass(frozen=True)
class Address:
    """One place to reach: a gRPC target and whether TLS is spoken there."""

    text: str
    target: str
    tls: bool
    #: The name the server's certificate is checked for, where the target
    #: has none of its own (a socket).
    name_override: Optional[str] = None


def parse_server(server: str) -> List[Address]:
    """The addresses of a ``--server`` value; ``ValueError`` names what is
    wrong."""
    server = server.strip()
    for scheme, tls in (("unix+tls:", True), ("unix:", False)):
        if server.startswith(scheme):
            path = server[len(scheme) :]
            if not path:
                raise ValueError(f"server: {scheme} needs a socket path")
            return [Address(server, f"unix:{path}", tls, SERVER_NAME if tls else None)]
    out = []
    for part in (p.strip() for p in server.split(",")):
        if not part:
            continue
        text = part if "://" in part else f"http://{part}"
        scheme, _, rest = text.partition("://")
        if scheme not in ("http", "https"):
            raise ValueError(f"server: {part!r}: expected HOST:PORT, http://host:port, https://host:port or unix:/path")
        hostport = rest.split("/", 1)[0]
        if not hostport or hostport.startswith(":"):
            raise ValueError(f"server: {part!r} has no host")
        if ":" not in hostport.rsplit("]", 1)[-1]:
            hostport += ":443" if scheme == "https" else ":80"
        out.append(Address(part, hostport, scheme == "https"))
    if not out:
        raise ValueError("server: no address given")
    return out


def _config_path(config: Optional[Union[str, os.PathLike]]) -> "tuple[Path, bool]":
    if config:
        return Path(config), True
    env = os.environ.get("TESTBUS_CONFIG")
    if env:
        return Path(env), True
    return Path(os.environ.get("HOME", ".")) / ".config/testbus/config.yaml", False


def _load_config(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise errors.Invalid(f"TESTBUS_CONFIG: {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise errors.Invalid(f"TESTBUS_CONFIG: {path}: {e}") from None
    known = {"server", "certificateAuthority", "clientCertificate", "clientKey"}
    if not isinstance(data, dict) or not set(data) <= known or not all(isinstance(v, str) for v in data.values()):
        raise errors.Invalid(
            f"TESTBUS_CONFIG: {path}: expected a mapping of server, certificateAuthority, clientCertificate, clientKey"
        )
    return data


def _local_socket() -> Optional[str]:
    data_dir = os.environ.get("TESTBUS_DATA_DIR")
    if not data_dir:
        if os.geteuid() == 0:
            data_dir = "/var/lib/testbus"
        elif os.environ.get("HOME"):
            data_dir = os.path.join(os.environ["HOME"], ".local/share/testbus")
        else:
            return None
    sock = os.path.join(data_dir, "api.sock")
    return f"unix:{sock}" if os.path.exists(sock) else None


class Stubs:
    """The generated service stubs over one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.tests = api_pb2_grpc.TestsStub(channel)
        self.hosts = api_pb2_grpc.HostsStub(channel)
        self.processes = api_pb2_grpc.ProcessesStub(channel)
        self.pools = api_pb2_grpc.HostPoolsStub(channel)
        self.output = api_pb2_grpc.OutputStub(channel)
        self.blobs = api_pb2_grpc.BlobsStub(channel)
        self.sync = api_pb2_grpc.SyncStub(channel)


T = TypeVar("T")


class Connection:
    """Channels to each address of ``settings`` (made on first use, in the
    running event loop), and calls that fail over between them."""

    #: How long one attempt of a single-answer call may take before the
    #: next replica is tried (a replica that accepts calls but cannot
    #: answer, its store cut off, would hold it for ever).
    ATTEMPT = 60.0

    def __init__(self, settings: Settings, retry_for: float = 30.0) -> None:
        self.settings = settings
        self.addresses = settings.addresses()
        self.retry_for = retry_for
        self._stubs: List[Optional[Stubs]] = [None] * len(self.addresses)
        self._current = 0

    def _open(self, i: int) -> Stubs:
        stubs = self._stubs[i]
        if stubs is None:
            a = self.addresses[i]
            options: List[Tuple[str, Union[str, int]]] = list(_CHANNEL_OPTIONS)
            if a.target.startswith("unix:") and not a.name_override:
                # gRPC's default authority for a socket is its path, which
                # the server's HTTP/2 refuses as an authority.
                options.append(("grpc.default_authority", "localhost"))
            if a.tls:
                s = self.settings
                creds = grpc.ssl_channel_credentials(
                    root_certificates=s.certificate_authority or None,
                    private_key=s.client_key or None,
                    certificate_chain=s.client_certificate or None,
                )
                if a.name_override:
                    options.append(("grpc.ssl_target_name_override", a.name_override))
                channel = grpc.aio.secure_channel(a.target, creds, options=options)
            else:
                channel = grpc.aio.insecure_channel(a.target, options=options)
            stubs = self._stubs[i] = Stubs(channel)
        return stubs

    @property
    def server(self) -> str:
        return self.addresses[self._current].text

    async def call(self, fn: Callable[[Stubs], Awaitable[T]], retry_for: Optional[float] = None) -> T:
        """``fn`` on the current replica; on an unreachable one, the next,
        until one answers or ``retry_for`` seconds have passed."""
        limit = self.retry_for if retry_for is None else retry_for
        deadline = time.monotonic() + limit
        backoff = 0.05
        tried = 0
        while True:
            i = self._current
            try:
                return await asyncio.wait_for(fn(self._open(i)), self.ATTEMPT)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError) as err:
                e = err if isinstance(err, grpc.aio.AioRpcError) else _Stalled(self.addresses[i].text, self.ATTEMPT)
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise errors.from_rpc(e) from None
                tried += 1
                if time.monotonic() >= deadline:
                    raise errors.Unavailable(
                        f"cannot reach the server ({self.settings.server}) after {limit:g}s: {e.details()}",
                        e.code(),
                    ) from None
                if self._current == i:
                    self._current = (i + 1) % len(self.addresses)
                if tried % len(self.addresses) == 0:
                    await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                    backoff = min(backoff * 2, 2.0)

    def stubs(self) -> Stubs:
        """The current replica's stubs (for a stream the caller resumes
        itself); :meth:`failed_over` moves on after it broke."""
        return self._open(self._current)

    def failed_over(self) -> None:
        self._current = (self._current + 1) % len(self.addresses)

    async def close(self) -> None:
        for s in self._stubs:
            if s is not None:
                await s.channel.close()
        self._stubs = [None] * len(self.addresses)


class _Stalled:
    """An attempt that got no answer in time, shaped as an unavailable call."""

    def __init__(self, where: str, seconds: float) -> None:
        self.where, self.seconds = where, seconds

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return f"{self.where} did not answer within {self.seconds:g}s"


def is_unavailable(e: BaseException) -> bool:
    return isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE
