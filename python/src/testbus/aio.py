"""The asyncio API; :mod:`testbus` (synchronous) is the same, run on a loop of
its own.

::

    async with testbus.aio.Client() as client:
        async with client.create_test(hosts={"server": "nfs-server", "client": Role(count=2)}) as t:
            await t.hosts["server"].run("systemctl start nfs-server")
            server = t.hosts["server"].vars["ipv4addr"]
            results = await t.role("client").run(["mount", "-t", "nfs", f"{server}:/x", "/mnt"])

A test made here is *open*: it has no steps, and holds its hosts until it is
finished (leaving the ``async with`` block finishes it). Each ``run`` is one
``Tests.Exec``: the server makes one Process per member, exactly as it makes
a step's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

import grpc
import grpc.aio

from . import errors
from ._connection import Connection, Settings, is_unavailable
from .v1 import api_pb2, resources_pb2

__all__ = [
    "Client",
    "Test",
    "Host",
    "Group",
    "Process",
    "Role",
    "RunResult",
    "PIPE",
]

#: Phases in which a process has ended.
TERMINAL_PROCESS = {"Succeeded", "Failed", "Killed", "Lost"}
#: Phases in which a test has ended.
TERMINAL_TEST = {"Succeeded", "Failed", "Cancelled", "Error"}
OUTCOMES = ("pass", "fail", "skip")
_LABEL_TEST = "testbus.io/test"
_LABEL_EXEC = "testbus.io/exec"
_CREATED_BY = "testbus.io/python-create"
_CHUNK = 256 * 1024
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Command = Union[str, Sequence[str]]


class _Pipe:
    def __repr__(self) -> str:
        return "testbus.PIPE"


#: ``stdin=PIPE`` (with ``background=True``): the process reads what
#: :meth:`Process.send` sends, until :meth:`Process.close_stdin`.
PIPE = _Pipe()


@dataclass(frozen=True)
class Role:
    """What a role needs: capabilities, how many hosts (its members are
    ROLE0 .. ROLE{count-1} when ``count`` is given), a label selector
    (``"rack in (a,b)"``) or one named host."""

    capabilities: Sequence[str] = ()
    count: Optional[int] = None
    selector: str = ""
    host: str = ""


HostsArg = Union[Mapping[str, Union[Role, str, Sequence[str], Mapping[str, object]]], Sequence[object]]


def requirements(hosts: HostsArg) -> List[resources_pb2.HostRequirement]:
    """The claim ``hosts`` describes. A mapping of role name to a
    :class:`Role`, a capability, a list of capabilities or a mapping with
    ``capabilities``/``count``/``selector``/``host``; or a sequence of
    mappings that also name their ``role``. ``ValueError`` names the
    argument that is wrong."""
    if isinstance(hosts, Mapping):
        items = list(hosts.items())
    elif isinstance(hosts, (list, tuple)):
        items = []
        for i, h in enumerate(hosts):
            if not isinstance(h, Mapping) or not h.get("role"):
                raise ValueError(f"hosts[{i}]: a role name is required (a mapping with 'role')")
            rest = {k: v for k, v in h.items() if k != "role"}
            items.append((h["role"], rest))
    else:
        raise ValueError("hosts: expected a mapping of role to what it needs, or a sequence of mappings")
    if not items:
        raise ValueError("hosts: at least one role is required")
    out = []
    seen = set()
    for role, need in items:
        where = f"hosts[{role!r}]"
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}: a role name is required")
        if not _NAME.match(role) or role[-1].isdigit():
            raise ValueError(f"{where}: a role is a DNS label that does not end in a digit (its members do)")
        if role in seen:
            raise ValueError(f"{where}: given twice")
        seen.add(role)
        r = _role(where, need)
        if r.count is not None and (isinstance(r.count, bool) or not isinstance(r.count, int) or r.count < 1):
            raise ValueError(f"{where}.count: must be a positive whole number, not {r.count!r}")
        caps = [r.capabilities] if isinstance(r.capabilities, str) else list(r.capabilities)
        for c in caps:
            if not isinstance(c, str) or not c:
                raise ValueError(f"{where}.capabilities: {c!r} is not a capability name")
        req = resources_pb2.HostRequirement(role=role, capabilities=caps, selector=r.selector, host=r.host)
        if r.count is not None:
            req.count = r.count
        out.append(req)
    return out


def _role(where: str, need: object) -> Role:
    if isinstance(need, Role):
        return need
    if need is None or need == "":
        return Role()
    if isinstance(need, str):
        return Role(capabilities=(need,))
    if isinstance(need, Mapping):
        unknown = set(need) - {"capabilities", "count", "selector", "host"}
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r} (capabilities, count, selector, host)")
        caps = need.get("capabilities", ())
        return Role(
            capabilities=(caps,) if isinstance(caps, str) else tuple(caps),  # type: ignore[arg-type]
            count=need.get("count"),  # type: ignore[arg-type]
            selector=str(need.get("selector", "")),
            host=str(need.get("host", "")),
        )
    if isinstance(need, (list, tuple)):
        return Role(capabilities=tuple(need))
    raise ValueError(f"{where}: expected a Role, a capability, a list of capabilities or a mapping")


def duration(seconds: Optional[float], arg: str) -> str:
    """A positive number of seconds as the API writes durations (``"1.5s"``);
    ``""`` for None. ``ValueError`` names ``arg``."""
    if seconds is None:
        return ""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 10**9:
        raise ValueError(f"{arg}: must be a positive number of seconds, not {seconds!r}")
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _env(env: Optional[Mapping[str, str]], arg: str) -> Dict[str, str]:
    out = {}
    for k, v in (env or {}).items():
        if not isinstance(k, str) or not _ENV.match(k):
            raise ValueError(f"{arg}: {k!r} is not a variable name")
        if not isinstance(v, str) or "\0" in v:
            raise ValueError(f"{arg}[{k!r}]: must be a string without NUL")
        out[k] = v
    return out


def member_matches(member: str, role_or_member: str) -> bool:
    """Whether ``member`` is ``role_or_member`` or a member of that role
    (``client1`` of ``client``)."""
    if member == role_or_member:
        return True
    rest = member[len(role_or_member) :] if member.startswith(role_or_member) else ""
    return bool(rest) and rest.isdigit()


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@dataclass
class RunResult:
    """How a command ended on one host, as testinfra's and pytest-mh's
    results say it: ``rc``, ``stdout``, ``stderr`` and ``succeeded``."""

    command: List[str]
    process: str
    member: str
    host: str
    rc: Optional[int]
    stdout: str
    stderr: str
    succeeded: bool
    phase: str
    reason: str = ""
    message: str = ""
    signal: str = ""
    stdout_bytes: bytes = field(default=b"", repr=False)
    #: The server's output limit cut stdout (what is here is its start).
    stdout_truncated: bool = False

    @property
    def exit_code(self) -> Optional[int]:
        return self.rc

    def check(self) -> "RunResult":
        """Raises :class:`~testbus.errors.ProcessError` unless it succeeded."""
        if not self.succeeded:
            raise errors.ProcessError(self)
        return self


class Client:
    """A connection to the control plane (see :mod:`testbus._connection` for
    where it finds the server and credentials). Use it as an async context
    manager, or call :meth:`close`."""

    def __init__(
        self,
        server: Optional[str] = None,
        config: Optional[Union[str, os.PathLike]] = None,
        retry_for: float = 30.0,
    ) -> None:
        if isinstance(retry_for, bool) or not isinstance(retry_for, (int, float)) or not 0 < retry_for < 86400:
            raise ValueError(f"retry_for: must be a positive number of seconds, not {retry_for!r}")
        self.settings = Settings.resolve(server, config)
        self.conn = Connection(self.settings, retry_for=retry_for)
        self._watches: "set[_ProcessWatch]" = set()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for w in list(self._watches):
            await w.stop()
        await self.conn.close()

    @property
    def server(self) -> str:
        return self.conn.server

    def create_test(
        self,
        hosts: HostsArg,
        *,
        name: Optional[str] = None,
        files: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        pending_timeout: Optional[float] = None,
        priority: int = 0,
    ) -> "Test":
        """A test claiming ``hosts`` (see :func:`requirements`), made when it
        is entered (``async with``) or :meth:`Test.start`\\ ed. ``files`` maps
        absolute paths on every host to local files, put there once the
        hosts are claimed; ``timeout`` (seconds) bounds the whole test,
        ``pending_timeout`` its wait for hosts. Everything is checked here:
        a bad argument raises ``ValueError`` before anything is sent."""
        if name is None:
            name = _new_id("py-")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"name: {name!r} is not a DNS label (a-z, 0-9 and '-', at most 63)")
        if isinstance(priority, bool) or not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
            raise ValueError(f"priority: a whole number, not {priority!r}")
        spec = resources_pb2.TestSpec(
            hosts=requirements(hosts),
            env=_env(env, "env"),
            timeout=duration(timeout, "timeout"),
            pending_timeout=duration(pending_timeout, "pending_timeout"),
            priority=priority,
            open=True,
        )
        put = {}
        for remote, local in (files or {}).items():
            if not isinstance(remote, str) or not remote.startswith("/"):
                raise ValueError(f"files: {remote!r}: the path on the hosts must be absolute")
            if not Path(local).is_file():
                raise ValueError(f"files[{remote!r}]: {str(local)!r} is not a readable file")
            put[remote] = Path(local)
        for k, v in (labels or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"labels: {k!r}: keys and values are strings")
        # Says which create this is, so a create retried on another replica
        # finds the test its first attempt made instead of failing.
        meta = resources_pb2.ObjectMeta(
            name=name, labels=dict(labels or {}), annotations={_CREATED_BY: uuid.uuid4().hex}
        )
        return Test(self, resources_pb2.Test(metadata=meta, spec=spec), put)

    def test(self, name: str) -> "Test":
        """A test that exists already (running, or held after a failure):
        :meth:`Test.attach` reads it."""
        return Test(self, resources_pb2.Test(metadata=resources_pb2.ObjectMeta(name=name)), {})

    async def rerun(self, name: str, failed_only: bool = False, pool: Optional[str] = None) -> str:
        """Runs an ended test again with its original inputs (its spec, file
        digests and resolved environment), labelled
        ``testbus.io/rerun-of=NAME``; only the failed steps (and what they
        follow) with ``failed_only``; on a HostPool's guests with ``pool``.
        The new test's name."""
        req = api_pb2.RerunRequest(test=name, failed_only=failed_only, pool=pool or "")
        made = await self.conn.call(lambda s: s.tests.Rerun(req))
        return made.metadata.name

    async def upload(self, path: Union[str, os.PathLike]) -> str:
        """Uploads a local file as a blob unless the server has it; its digest."""
        data = Path(path).read_bytes()
        return await self.upload_bytes(data)

    async def upload_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        have = await self.conn.call(lambda s: s.blobs.Stat(api_pb2.StatBlobRequest(digest=digest)))
        if have.exists:
            return digest

        def chunks() -> Iterable[api_pb2.UploadRequest]:
            yield api_pb2.UploadRequest(digest=digest, data=data[:_CHUNK])
            for i in range(_CHUNK, len(data), _CHUNK):
                yield api_pb2.UploadRequest(data=data[i : i + _CHUNK])

        await self.conn.call(lambda s: s.blobs.Upload(chunks()))
        return digest

    async def read_output(self, process: str, follow: bool = False) -> AsyncIterator[api_pb2.OutputChunk]:
        """A process's output chunks, in order (both streams); with
        ``follow``, until it has ended. A broken stream is resumed where it
        broke, on the next replica if need be."""
        had = {0: 0, 1: 0}
        deadline = None
        while True:
            stream = self.conn.stubs().output.Read(api_pb2.ReadOutputRequest(process=process, follow=follow))
            try:
                async for chunk in stream:
                    deadline = None
                    if chunk.notice:
                        yield chunk
                        continue
                    # A resumed read starts over: skip what was delivered.
                    end = chunk.offset + len(chunk.data)
                    if end <= had[chunk.stream]:
                        continue
                    skip = max(0, had[chunk.stream] - chunk.offset)
                    if skip:
                        chunk = api_pb2.OutputChunk(
                            process=chunk.process,
                            stream=chunk.stream,
                            offset=chunk.offset + skip,
                            data=chunk.data[skip:],
                            time_unix_ms=chunk.time_unix_ms,
                        )
                    had[chunk.stream] = end
                    yield chunk
                return
            except grpc.aio.AioRpcError as e:
                if not is_unavailable(e):
                    raise errors.from_rpc(e) from None
                deadline = deadline or time.monotonic() + self.conn.retry_for
                if time.monotonic() >= deadline:
                    raise errors.Unavailable(f"reading the output of {process}: {e.details()}", e.code()) from None
                self.conn.failed_over()
                await asyncio.sleep(0.1)


class _ProcessWatch:
    """The latest state of every process of one test, from one watch (a
    thousand concurrent commands cost one stream, not a thousand), and the
    waiters for each process's end. A broken watch is resumed from its last
    revision, on the next replica if need be; one that cannot be resumed for
    ``retry_for`` fails every waiter with Unavailable."""

    def __init__(self, client: Client, test: str) -> None:
        self.client = client
        self.test = test
        self.latest: Dict[str, resources_pb2.Process] = {}
        self.waiters: Dict[str, List[asyncio.Future]] = {}
        self.failed: Optional[BaseException] = None
        self.task: Optional[asyncio.Task] = None
        self.ready = asyncio.Event()

    def start(self) -> None:
        if self.failed is not None and not self.waiters:
            # A watch that gave up is tried again for the next wait.
            self.failed, self.task, self.ready = None, None, asyncio.Event()
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())
            self.client._watches.add(self)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
            self.task = None
        self.client._watches.discard(self)
        # Whoever still waits gets the process as it is now, or why not.
        for name, fs in list(self.waiters.items()):
            try:
                p = await self.client.conn.call(lambda s: s.processes.Get(api_pb2.GetRequest(name=name)), 5)  # noqa: B023
                outcome: Optional[BaseException] = None
            except errors.TestbusError as e:
                outcome = e
            for f in fs:
                if f.done():
                    continue
                if outcome is None and p.status.phase in TERMINAL_PROCESS:
                    f.set_result(p)
                else:
                    f.set_exception(outcome or errors.Conflict(f"process {name} still runs, but its test has ended"))
        self.waiters.clear()

    def _update(self, p: resources_pb2.Process, deleted: bool = False) -> None:
        self.latest[p.metadata.name] = p
        if deleted and p.status.phase not in TERMINAL_PROCESS:
            for f in self.waiters.pop(p.metadata.name, []):
                if not f.done():
                    f.set_exception(errors.NotFound(f"process {p.metadata.name} was deleted before it ended"))
        elif p.status.phase in TERMINAL_PROCESS:
            for f in self.waiters.pop(p.metadata.name, []):
                if not f.done():
                    f.set_result(p)

    def _fail(self, e: BaseException) -> None:
        self.failed = e
        for fs in self.waiters.values():
            for f in fs:
                if not f.done():
                    f.set_exception(e)
        self.waiters.clear()
        self.ready.set()

    async def _run(self) -> None:
        conn = self.client.conn
        selector = f"{_LABEL_TEST}={self.test}"
        rv = ""
        deadline: Optional[float] = None
        while True:
            try:
                if not rv:
                    listed = await conn.call(lambda s: s.processes.List(api_pb2.ListRequest(label_selector=selector)))
                    for p in listed.items:
                        self._update(p)
                    rv = listed.resource_version
                    self.ready.set()
                stream = conn.stubs().processes.Watch(
                    api_pb2.WatchRequest(resource_version=rv, label_selector=selector)
                )
                await stream.initial_metadata()
                if not stream.done():
                    deadline = None  # connected: a later break gets its own retry_for
                async for ev in stream:
                    if ev.type == "Compacted":
                        rv = ""
                        break
                    if ev.resource_version:
                        rv = ev.resource_version
                    if ev.type in ("Added", "Modified", "Deleted") and ev.object.metadata.name:
                        self._update(ev.object, deleted=ev.type == "Deleted")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.OUT_OF_RANGE:
                    # A replica behind the revision it was asked to resume
                    # from: list again.
                    rv = ""
                    await asyncio.sleep(0.1)
                    continue
                if not is_unavailable(e):
                    self._fail(errors.from_rpc(e))
                    return
                deadline = deadline or time.monotonic() + conn.retry_for
                if time.monotonic() >= deadline:
                    self._fail(errors.Unavailable(f"watching the processes of test {self.test}: {e.details()}"))
                    return
                conn.failed_over()
                await asyncio.sleep(0.1)
            except errors.TestbusError as e:
                self._fail(e)
                return

    async def ended(self, name: str, timeout: Optional[float]) -> resources_pb2.Process:
        self.start()
        await self.ready.wait()
        if self.failed:
            raise self.failed
        p = self.latest.get(name)
        if p is not None and p.status.phase in TERMINAL_PROCESS:
            return p
        f = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(name, []).append(f)
        try:
            return await asyncio.wait_for(asyncio.shield(f), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"process {name} still runs after {timeout:g}s") from None


class Test:
    """An open test: its claimed hosts by member (:attr:`hosts`) and role
    (:meth:`role`), its environment, results and end. Entering it (``async
    with``) creates it and waits until it holds its hosts; leaving it stops
    every process it started and finishes it: Failed if the block raised,
    Cancelled on KeyboardInterrupt or cancellation, else as its results
    say."""

    __test__ = False  # not a pytest test class

    def __init__(self, client: Client, obj: resources_pb2.Test, files: Mapping[str, Path]) -> None:
        self.client = client
        self.obj = obj
        self.name = obj.metadata.name
        self._files = dict(files)
        self._watch = _ProcessWatch(client, self.name)
        self._started: List[str] = []
        self.hosts: Dict[str, Host] = {}

    def __repr__(self) -> str:
        return f"<testbus Test {self.name} {self.obj.status.phase or 'unsent'}>"

    async def __aenter__(self) -> "Test":
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, exc: Optional[BaseException], tb: object) -> None:
        await self.close(exc)

    async def start(self) -> "Test":
        """Creates the test and waits until it holds its hosts;
        :class:`~testbus.errors.ClaimError` if it cannot run on the hosts
        that exist or ends while pending."""
        conn = self.client.conn
        try:
            await conn.call(lambda s: s.tests.Create(self.obj))
        except errors.Conflict as e:
            mine = self.obj.metadata.annotations.get(_CREATED_BY)
            there = await conn.call(lambda s: s.tests.Get(api_pb2.GetRequest(name=self.name)))
            if e.code != grpc.StatusCode.ALREADY_EXISTS or there.metadata.annotations.get(_CREATED_BY) != mine:
                raise errors.Conflict(f"test {self.name}: {e.message}", e.code) from None
        try:
            await self._claimed()
            await self._load_hosts()
            if self._files:
                await self._put_files()
        except BaseException as e:
            await self._end_quietly(e)
            raise
        return self

    async def attach(self) -> "Test":
        """Reads a test that exists (see :meth:`Client.test`)."""
        self.obj = await self.client.conn.call(lambda s: s.tests.Get(api_pb2.GetRequest(name=self.name)))
        await self._load_hosts()
        return self

    async def _claimed(self) -> None:
        conn = self.client.conn
        selector = f"metadata.name={self.name}"
        while True:
            t = await conn.call(lambda s: s.tests.Get(api_pb2.GetRequest(name=self.name)))
            rv = t.metadata.resource_version
            if self._holds_hosts(t):
                return
            try:
                stream = conn.stubs().tests.Watch(api_pb2.WatchRequest(resource_version=rv, field_selector=selector))
                async for ev in stream:
                    if ev.type == "Deleted":
                        raise errors.ClaimError(f"test {self.name} was deleted while it waited for hosts", "Deleted")
                    if ev.type in ("Added", "Modified") and self._holds_hosts(ev.object):
                        return
            except grpc.aio.AioRpcError as e:
                if not is_unavailable(e):
                    raise errors.from_rpc(e) from None
                conn.failed_over()
                await asyncio.sleep(0.1)

    def _holds_hosts(self, t: resources_pb2.Test) -> bool:
        """True once it runs (``self.obj`` is then the running test), False
        while it waits; raises :class:`~testbus.errors.ClaimError` once it
        cannot run."""
        self.obj = t
        phase = t.status.phase
        if phase == "Running":
            return True
        if phase in TERMINAL_TEST:
            raise errors.ClaimError(
                f"test {self.name} ended ({phase}) before it held its hosts: {t.status.message}",
                t.status.reason or phase,
            )
        for c in t.status.conditions:
            if c.type == "Scheduled" and c.reason == "Unsatisfiable":
                raise errors.ClaimError(f"test {self.name} cannot run ({c.reason}): {c.message}", c.reason)
        return False

    async def _load_hosts(self) -> None:
        status = self.obj.status
        claims = sorted(status.claims.items())
        conn = self.client.conn

        async def labels(host: str) -> Dict[str, str]:
            try:
                h = await conn.call(lambda s: s.hosts.Get(api_pb2.GetRequest(name=host)))
            except errors.TestbusError:
                return {}
            return dict(h.metadata.labels)

        got = await asyncio.gather(*(labels(h) for _, h in claims))
        hosts = {}
        for (member, host), host_labels in zip(claims, got, strict=True):
            prefix = f"host_{member}_"
            vars_ = {k[len(prefix) :]: v for k, v in status.host_vars.items() if k.startswith(prefix)}
            hosts[member] = Host(self, member, host, vars_, host_labels)
        self.hosts = hosts

    async def _put_files(self) -> None:
        refs = []
        for remote, local in self._files.items():
            digest = await self.client.upload(local)
            refs.append(resources_pb2.FileRef(digest=digest, path=remote, mode=f"{local.stat().st_mode & 0o777:04o}"))
        procs = await self._exec([], resources_pb2.Step(argv=["true"], files=refs))
        results = await asyncio.gather(*(self._result(p, ["true"]) for p in procs))
        for r in results:
            if not r.succeeded:
                raise errors.ProcessError(r)

    def role(self, name: str) -> "Group":
        """The members of role ``name`` (or the one member so named), run on
        together."""
        members = [h for m, h in self.hosts.items() if member_matches(m, name)]
        if not members:
            known = ", ".join(self.hosts)
            raise ValueError(f"role: test {self.name} has no role or member {name!r} (members: {known})")
        return Group(self, name, members)

    async def refresh(self) -> resources_pb2.Test:
        self.obj = await self.client.conn.call(lambda s: s.tests.Get(api_pb2.GetRequest(name=self.name)))
        return self.obj

    async def env(self) -> Dict[str, str]:
        """The test's variables: the claim's ``host_<member>_<var>`` and the
        spec's and ``setenv``'s (which win)."""
        t = await self.refresh()
        out = dict(t.status.host_vars)
        out.update(t.status.env)
        return out

    async def setenv(self, values: Optional[Mapping[str, str]] = None, **more: str) -> None:
        """Adds variables every later command gets."""
        env = _env({**(values or {}), **more}, "setenv")
        await self.client.conn.call(lambda s: s.tests.SetEnv(api_pb2.SetEnvRequest(test=self.name, env=env)))

    async def result(self, name: str, outcome: str, message: str = "") -> None:
        """Records a result at the dotted path ``name``: pass, fail or skip."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome: {outcome!r} must be one of pass, fail, skip")
        if not isinstance(name, str) or not name:
            raise ValueError("name: a result needs a name (a dotted path such as users.verify-name)")
        req = api_pb2.RecordResultRequest(test=self.name, path=name, outcome=outcome, message=message)
        await self.client.conn.call(lambda s: s.tests.RecordResult(req))

    async def finish(self, failed: bool = False, message: str = "", wait: float = 60.0) -> str:
        """Ends the test (Failed if ``failed`` or a recorded result failed,
        else Succeeded), waits up to ``wait`` seconds for its hosts to be
        released, and returns its final phase."""
        req = api_pb2.FinishRequest(test=self.name, failed=failed, message=message)
        return await self._end(req, wait)

    async def cancel(self, message: str = "", wait: float = 60.0) -> str:
        """Ends the test Cancelled."""
        req = api_pb2.FinishRequest(test=self.name, cancel=True, message=message)
        return await self._end(req, wait)

    async def _end(self, req: api_pb2.FinishRequest, wait: float) -> str:
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
            raise ValueError(f"wait: a number of seconds, not {wait!r}")
        try:
            await self.client.conn.call(lambda s: s.tests.Finish(req))
        except errors.Conflict as e:
            # A Finish retried on another replica meets its own first try.
            if "is finishing" not in e.message:
                raise
        deadline = time.monotonic() + wait
        while True:
            t = await self.refresh()
            if t.status.phase in TERMINAL_TEST or time.monotonic() >= deadline:
                await self._watch.stop()
                return t.status.phase
            await asyncio.sleep(0.05)

    async def close(self, exc: Optional[BaseException] = None) -> None:
        """What leaving the block does: stop what still runs, then finish
        (failed on ``exc``, cancelled on KeyboardInterrupt/cancellation)."""
        await self._end_quietly(exc, raise_errors=exc is None)

    async def _end_quietly(self, exc: Optional[BaseException], raise_errors: bool = False) -> None:
        try:
            running = [
                n
                for n in self._started
                if self._watch.latest.get(n) is None or self._watch.latest[n].status.phase not in TERMINAL_PROCESS
            ]
            await asyncio.gather(*(self._stop(n, 0.0) for n in running), return_exceptions=True)
            if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
                await self.cancel("interrupted")
            elif exc is not None:
                await self.finish(failed=True, message=f"{type(exc).__name__}: {exc}"[:4000])
            else:
                await self.finish()
        except errors.Conflict:
            # Already ended (timed out, cancelled, deleted): nothing to finish.
            await self._watch.stop()
        except Exception:
            await self._watch.stop()
            if raise_errors:
                raise

    async def _exec(self, on: Sequence[str], command: resources_pb2.Step) -> List[resources_pb2.Process]:
        """One ``Tests.Exec``. The command's name is chosen here, so a call
        retried on another replica finds what the first made instead of
        running it twice."""
        self._watch.start()
        command.name = _new_id("x")
        req = api_pb2.ExecRequest(test=self.name, on=list(on), command=command)
        try:
            made = list((await self.client.conn.call(lambda s: s.tests.Exec(req))).processes)
        except errors.Conflict as e:
            if e.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            sel = f"{_LABEL_TEST}={self.name},{_LABEL_EXEC}={command.name}"
            made = list(
                (await self.client.conn.call(lambda s: s.processes.List(api_pb2.ListRequest(label_selector=sel)))).items
            )
            want = [m for m in self.hosts if not on or any(member_matches(m, r) for r in on)]
            if not made:
                raise
            if len(made) != len(want):
                raise errors.Unavailable(
                    f"an exec retried after a lost connection was made on {len(made)} of {len(want)} members"
                ) from None
            made.sort(key=lambda p: p.spec.role)
        self._started.extend(p.metadata.name for p in made)
        return made

    async def _result(self, p: resources_pb2.Process, command: List[str], timeout: Optional[float] = None) -> RunResult:
        ended = await self._watch.ended(p.metadata.name, timeout)
        out, err = bytearray(), bytearray()
        async for chunk in self.client.read_output(p.metadata.name):
            if not chunk.notice:
                (err if chunk.stream == 1 else out).extend(chunk.data)
        s = ended.status
        return RunResult(
            command=command,
            process=p.metadata.name,
            member=p.spec.role,
            host=p.spec.host_name,
            rc=s.exit_code if s.HasField("exit_code") else None,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            succeeded=s.phase == "Succeeded",
            phase=s.phase,
            reason=s.reason,
            message=s.message,
            signal=s.signal,
            stdout_bytes=bytes(out),
            stdout_truncated=s.stdout_truncated,
        )

    async def _stop(self, name: str, grace: float) -> None:
        def stop(spec: resources_pb2.ProcessSpec) -> None:
            spec.stop = True
            spec.stop_reason = "stopped by its test's Python client"
            spec.stop_grace = duration(grace, "grace") if grace > 0 else "0s"

        await _change_spec(self.client.conn, name, lambda spec: spec.stop, stop)

    async def cp(self, src: str, dst: str) -> None:
        """Copies a local file to ``MEMBER_OR_ROLE:/abs/path`` (every member
        of a role), or ``MEMBER:/abs/path`` to a local file."""
        remote_src, remote_dst = _remote(src), _remote(dst)
        if (remote_src is None) == (remote_dst is None):
            raise ValueError("cp: exactly one of src and dst must be MEMBER:/PATH")
        if remote_dst is not None:
            who, path = remote_dst
            local = Path(src)
            if not local.is_file():
                raise ValueError(f"src: {src!r} is not a readable file")
            if path.endswith("/"):
                path += local.name
            await self.role(who).put_file(local, path)
        else:
            assert remote_src is not None
            who, path = remote_src
            group = self.role(who)
            if len(group.members) != 1:
                raise ValueError(f"src: {who} has {len(group.members)} members; name one")
            Path(dst).write_bytes(await group.members[0].get_file(path))


async def _change_spec(
    conn: "Connection",
    name: str,
    done: "Callable[[resources_pb2.ProcessSpec], bool]",
    change: "Callable[[resources_pb2.ProcessSpec], None]",
) -> None:
    """Read-modify-write of a Process's spec, again when it changed
    meanwhile; nothing once ``done`` says so or the process has ended."""
    while True:
        p = await conn.call(lambda s: s.processes.Get(api_pb2.GetRequest(name=name)))
        if done(p.spec) or p.status.phase in TERMINAL_PROCESS:
            return
        change(p.spec)
        try:
            await conn.call(lambda s: s.processes.Update(p))  # noqa: B023 (awaited at once)
            return
        except errors.Conflict as e:
            if e.code != grpc.StatusCode.ABORTED:
                raise


def _remote(s: str) -> Optional["tuple[str, str]"]:
    who, sep, path = s.partition(":")
    if sep and who and _NAME.match(who) and path.startswith("/"):
        return who, path
    return None


def _command(
    cmd: Command,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    stdin: Optional[Union[str, bytes, _Pipe]],
    timeout: Optional[float],
    background: bool = False,
) -> "tuple[resources_pb2.Step, List[str]]":
    if isinstance(cmd, str):
        if not cmd.strip():
            raise ValueError("command: empty")
        step = resources_pb2.Step(argv=[cmd], shell=True)
        shown = [cmd]
    else:
        argv = list(cmd)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("command: a non-empty list of strings, or a shell command line")
        step = resources_pb2.Step(argv=argv)
        shown = argv
    step.env.update(_env(env, "env"))
    step.timeout = duration(timeout, "timeout")
    if cwd is not None:
        step.workdir = str(cwd)
    if isinstance(stdin, _Pipe):
        if not background:
            raise ValueError("stdin: PIPE needs background=True (send to the Process it returns)")
        step.stdin_stream = True
    elif isinstance(stdin, bytes):
        try:
            step.stdin = stdin.decode()
        except UnicodeDecodeError:
            raise ValueError("stdin: bytes that are not UTF-8 (give them as a file, or stdin=PIPE and send)") from None
    elif isinstance(stdin, str):
        step.stdin = stdin
    elif stdin is not None:
        raise ValueError(f"stdin: a str, bytes or testbus.PIPE, not {type(stdin).__name__}")
    return step, shown


class Host:
    """One claimed member: its name in the test (``client0``), its host, and
    the variables it published (``vars["ipv4addr"]``)."""

    def __init__(
        self, test: Test, member: str, host: str, vars: Mapping[str, str], labels: Optional[Mapping[str, str]] = None
    ) -> None:
        self.test = test
        self.name = member
        self.host = host
        self.vars = dict(vars)
        #: The host's labels (``testbus.io/pool`` on a pool's guest).
        self.labels = dict(labels or {})

    def __repr__(self) -> str:
        return f"<testbus Host {self.name} on {self.host}>"

    async def run(
        self,
        command: Command,
        *,
        check: bool = True,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[Union[str, bytes, _Pipe]] = None,
        background: bool = False,
    ) -> Union[RunResult, "Process"]:
        """Runs ``command`` (a list: argv; a string: a shell command line)
        here. Returns its :class:`RunResult`, raising
        :class:`~testbus.errors.ProcessError` if it did not succeed unless
        ``check=False``; with ``background=True`` returns a :class:`Process`
        at once."""
        step, shown = _command(command, env, cwd, stdin, timeout, background)
        (p,) = await self.test._exec([self.name], step)
        proc = Process(self.test, p, shown)
        if background:
            return proc
        return await proc.wait(check=check)

    async def put_file(self, local: Union[str, os.PathLike], path: str, mode: Optional[int] = None) -> None:
        await Group(self.test, self.name, [self]).put_file(local, path, mode)

    async def get_file(self, path: str) -> bytes:
        """The bytes of a file on this host (read with ``cat``)."""
        r = await self.run(["cat", "--", path], check=False)
        assert isinstance(r, RunResult)
        if not r.succeeded:
            raise errors.ProcessError(r)
        if r.stdout_truncated:
            raise errors.TestbusError(f"{path} on {self.name}: larger than the server's output limit")
        return r.stdout_bytes


class Group:
    """Several members (a role) that commands run on together."""

    def __init__(self, test: Test, name: str, members: List[Host]) -> None:
        self.test = test
        self.name = name
        self.members = members

    def __repr__(self) -> str:
        return f"<testbus Group {self.name}: {', '.join(h.name for h in self.members)}>"

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    async def run(
        self,
        command: Command,
        *,
        check: bool = True,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[Union[str, bytes, _Pipe]] = None,
        background: bool = False,
    ) -> Union[List[RunResult], List["Process"]]:
        """Runs ``command`` on every member at once (one request); the
        results in member order. With ``check``, raises the first failure's
        :class:`~testbus.errors.ProcessError` once all have ended."""
        step, shown = _command(command, env, cwd, stdin, timeout, background)
        made = await self.test._exec([h.name for h in self.members], step)
        procs = [Process(self.test, p, shown) for p in made]
        if background:
            return procs
        results = await asyncio.gather(*(p.wait() for p in procs))
        if check:
            for r in results:
                r.check()
        return list(results)

    async def put_file(self, local: Union[str, os.PathLike], path: str, mode: Optional[int] = None) -> None:
        """Writes a local file at ``path`` (absolute) on every member."""
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"path: {path!r} must be an absolute path")
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777):
            raise ValueError(f"mode: a file mode such as 0o644, not {mode!r}")
        local = Path(local)
        digest = await self.test.client.upload(local)
        m = f"{(local.stat().st_mode if mode is None else mode) & 0o777:04o}"
        step = resources_pb2.Step(argv=["true"], files=[resources_pb2.FileRef(digest=digest, path=path, mode=m)])
        made = await self.test._exec([h.name for h in self.members], step)
        for r in await asyncio.gather(*(self.test._result(p, ["true"]) for p in made)):
            r.check()


class Process:
    """A command started with ``background=True``."""

    def __init__(self, test: Test, obj: resources_pb2.Process, command: List[str]) -> None:
        self.test = test
        self.obj = obj
        self.name = obj.metadata.name
        self.command = command
        self.member = obj.spec.role
        self.host = obj.spec.host_name
        self._sent = 0
        self._unsent = b""
        self._stdin_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<testbus Process {self.name} on {self.member}>"

    def _latest(self) -> resources_pb2.Process:
        return self.test._watch.latest.get(self.name, self.obj)

    @property
    def phase(self) -> str:
        return self._latest().status.phase or "Pending"

    @property
    def active(self) -> bool:
        """Whether it has not ended yet (as last seen)."""
        return self.phase not in TERMINAL_PROCESS

    @property
    def succeeded(self) -> Optional[bool]:
        """Whether it succeeded; None while it runs."""
        return None if self.active else self.phase == "Succeeded"

    @property
    def exit_code(self) -> Optional[int]:
        s = self._latest().status
        return s.exit_code if s.HasField("exit_code") else None

    async def wait(self, timeout: Optional[float] = None, check: bool = False) -> RunResult:
        """Waits for its end (``TimeoutError`` after ``timeout`` seconds);
        its result, raising :class:`~testbus.errors.ProcessError` on
        failure if ``check``."""
        if timeout is not None:
            duration(timeout, "timeout")
        r = await self.test._result(self.obj, self.command, timeout)
        return r.check() if check else r

    async def terminate(self, grace: float = 2.0) -> RunResult:
        """SIGTERM to all it started, SIGKILL after ``grace`` seconds; its
        result once it has ended."""
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0 or grace > 600:
            raise ValueError(f"grace: 0 to 600 seconds, not {grace!r}")
        await self.test._stop(self.name, grace)
        return await self.wait()

    async def send(self, data: Union[str, bytes]) -> None:
        """Writes ``data`` to its stdin (started with ``stdin=PIPE``); in
        order, each byte once, whichever replica takes it."""
        if isinstance(data, str):
            chunk = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            chunk = bytes(data)
        else:
            raise ValueError(f"data: str or bytes, not {type(data).__name__}")
        if not chunk and not self._unsent:
            return
        async with self._stdin_lock:
            # Bytes a failed append may or may not have stored go again: the
            # server keeps each offset once.
            self._unsent += chunk
            truncated = False
            while self._unsent:
                piece = self._unsent[: _CHUNK * 4]
                req = api_pb2.OutputChunk(
                    process=self.name, stream=api_pb2.OUTPUT_STREAM_STDIN, offset=self._sent, data=piece
                )
                answer = await self.test.client.conn.call(lambda s: s.output.Append(req))  # noqa: B023
                done = max(0, min(len(piece), answer.length - self._sent))
                self._sent += done
                self._unsent = self._unsent[done:]
                truncated = truncated or answer.truncated
                if done < len(piece) and not answer.truncated:
                    raise errors.Conflict(
                        f"stdin of {self.name}: the server holds {answer.length} bytes, not {self._sent + len(piece)}"
                    )
            if truncated:
                raise errors.TestbusError(
                    f"stdin of {self.name}: the server's output limit is reached; later bytes are not kept"
                )

    async def close_stdin(self) -> None:
        """Ends its stdin: it reads end of file once it has read what was
        sent."""

        def close(spec: resources_pb2.ProcessSpec) -> None:
            spec.stdin_closed = True

        async with self._stdin_lock:
            await _change_spec(self.test.client.conn, self.name, lambda spec: spec.stdin_closed, close)

    async def output(self) -> str:
        """Its standard output so far."""
        out = bytearray()
        async for chunk in self.test.client.read_output(self.name):
            if not chunk.notice and chunk.stream == 0:
                out.extend(chunk.data)
        return out.decode(errors="replace")

    async def lines(self, stream: str = "stdout") -> AsyncGenerator[str, None]:
        """Its output line by line as it comes (``"stdout"``, ``"stderr"`` or
        ``"both"``), until it ends."""
        want = {"stdout": {0}, "stderr": {1}, "both": {0, 1}}.get(stream)
        if want is None:
            raise ValueError(f"stream: {stream!r} must be stdout, stderr or both")
        partial: Dict[int, bytes] = {0: b"", 1: b""}
        async for chunk in self.test.client.read_output(self.name, follow=True):
            if chunk.notice or chunk.stream not in want:
                continue
            data = partial[chunk.stream] + chunk.data
            *whole, partial[chunk.stream] = data.split(b"\n")
            for line in whole:
                yield line.decode(errors="replace")
        for s in sorted(want):
            if partial[s]:
                yield partial[s].decode(errors="replace")
