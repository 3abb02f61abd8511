"""The synchronous API: :mod:`testbus.aio`'s objects, each call run on an
event loop of the client's own (a daemon thread), so it works the same
from plain scripts, pytest and threads.

::

    with testbus.Client() as client, client.create_test(hosts={"server": "nfs-server", "client": Role(count=2)}) as t:
        t.hosts["server"].run("systemctl start nfs-server")
        for r in t.role("client").run(["mount", "server:/export", "/mnt"]):
            print(r.member, r.rc)
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Coroutine, Dict, Iterator, List, Mapping, Optional, TypeVar, Union

from . import aio
from .aio import Command, HostsArg, Role, RunResult

__all__ = ["Client", "Test", "Host", "Group", "Process", "Role", "RunResult"]

T = TypeVar("T")


class _Loop:
    """An event loop on a daemon thread; :meth:`run` waits for a coroutine
    on it. Ctrl-C while waiting cancels the coroutine, then propagates."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="testbus-client", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("a synchronous testbus call from inside its own event loop: use testbus.aio")
        settled = threading.Event()

        async def guarded() -> T:
            try:
                return await coro
            finally:
                settled.set()

        fut = asyncio.run_coroutine_threadsafe(guarded(), self.loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            # The coroutine's own cleanup (a test cancelled, its hosts let
            # go) runs before Ctrl-C goes on, for a bounded time.
            fut.cancel()
            settled.wait(timeout=30)
            raise

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


class Client:
    """A connection to the control plane: ``server`` (else
    ``$TESTBUS_SERVER``, the config file's, the local socket, or
    ``https://127.0.0.1:7780``), credentials from ``config`` (else
    ``$TESTBUS_CONFIG`` or ``~/.config/testbus/config.yaml``), as
    ``testbusctl``. Calls fail over between the addresses of a list and
    retry an unreachable server for ``retry_for`` seconds before raising
    :class:`~testbus.errors.Unavailable`."""

    def __init__(
        self,
        server: Optional[str] = None,
        config: Optional[Union[str, os.PathLike]] = None,
        retry_for: float = 30.0,
    ) -> None:
        self.aio = aio.Client(server, config, retry_for)
        self._loop = _Loop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._loop.run(self.aio.close())
        finally:
            self._loop.close()

    @property
    def server(self) -> str:
        return self.aio.server

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)

    def create_test(self, hosts: HostsArg, **kwargs: Any) -> "Test":
        """See :meth:`testbus.aio.Client.create_test`: ``name``, ``files``,
        ``env``, ``labels``, ``timeout``, ``pending_timeout``, ``priority``.
        Use it with ``with``, or call :meth:`Test.start` and
        :meth:`Test.finish`."""
        return Test(self, self.aio.create_test(hosts, **kwargs))

    def rerun(self, name: str, failed_only: bool = False, pool: Optional[str] = None) -> str:
        """See :meth:`testbus.aio.Client.rerun`; the new test's name."""
        return self._run(self.aio.rerun(name, failed_only, pool))

    def test(self, name: str) -> "Test":
        """A test that exists already, read now."""
        t = Test(self, self.aio.test(name))
        self._run(t.aio.attach())
        return t


class Test:
    """See :class:`testbus.aio.Test`."""

    __test__ = False  # not a pytest test class

    def __init__(self, client: Client, t: aio.Test) -> None:
        self.client = client
        self.aio = t

    def __repr__(self) -> str:
        return repr(self.aio)

    @property
    def name(self) -> str:
        return self.aio.name

    def __enter__(self) -> "Test":
        return self.start()

    def __exit__(self, exc_type: object, exc: Optional[BaseException], tb: object) -> None:
        self.client._run(self.aio.close(exc))

    def start(self) -> "Test":
        self.client._run(self.aio.start())
        return self

    @property
    def hosts(self) -> Dict[str, "Host"]:
        """The claimed members by name (``server``, ``client0``, ...)."""
        return {m: Host(self, h) for m, h in self.aio.hosts.items()}

    def role(self, name: str) -> "Group":
        return Group(self, self.aio.role(name))

    @property
    def env(self) -> Dict[str, str]:
        return self.client._run(self.aio.env())

    def setenv(self, values: Optional[Mapping[str, str]] = None, **more: str) -> None:
        self.client._run(self.aio.setenv(values, **more))

    def result(self, name: str, outcome: str, message: str = "") -> None:
        self.client._run(self.aio.result(name, outcome, message))

    def finish(self, failed: bool = False, message: str = "", wait: float = 60.0) -> str:
        return self.client._run(self.aio.finish(failed, message, wait))

    def cancel(self, message: str = "", wait: float = 60.0) -> str:
        return self.client._run(self.aio.cancel(message, wait))

    def cp(self, src: str, dst: str) -> None:
        self.client._run(self.aio.cp(src, dst))

    @property
    def phase(self) -> str:
        return self.client._run(self.aio.refresh()).status.phase


class _Wraps:
    """A synchronous face of one :mod:`testbus.aio` object of ``test``."""

    def __init__(self, test: "Test", obj: Any) -> None:
        self.test = test
        self.aio = obj

    def __repr__(self) -> str:
        return repr(self.aio)

    @property
    def name(self) -> str:
        return self.aio.name


class Host(_Wraps):
    """See :class:`testbus.aio.Host`."""

    aio: aio.Host

    @property
    def host(self) -> str:
        return self.aio.host

    @property
    def vars(self) -> Dict[str, str]:
        return self.aio.vars

    def run(self, command: Command, **kwargs: Any) -> Any:
        """See :meth:`testbus.aio.Host.run`: ``check``, ``timeout``, ``env``,
        ``cwd``, ``stdin``, ``background``."""
        r = self.test.client._run(self.aio.run(command, **kwargs))
        return Process(self.test, r) if isinstance(r, aio.Process) else r

    def put_file(self, local: Union[str, os.PathLike], path: str, mode: Optional[int] = None) -> None:
        self.test.client._run(self.aio.put_file(local, path, mode))

    def get_file(self, path: str) -> bytes:
        return self.test.client._run(self.aio.get_file(path))


class Group(_Wraps):
    """See :class:`testbus.aio.Group`."""

    aio: aio.Group

    @property
    def members(self) -> List[Host]:
        return [Host(self.test, h) for h in self.aio.members]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.aio.members)

    def run(self, command: Command, **kwargs: Any) -> List[Any]:
        r = self.test.client._run(self.aio.run(command, **kwargs))
        return [Process(self.test, p) if isinstance(p, aio.Process) else p for p in r]

    def put_file(self, local: Union[str, os.PathLike], path: str, mode: Optional[int] = None) -> None:
        self.test.client._run(self.aio.put_file(local, path, mode))


class Process(_Wraps):
    """See :class:`testbus.aio.Process`."""

    aio: aio.Process

    @property
    def active(self) -> bool:
        return self.aio.active

    @property
    def succeeded(self) -> Optional[bool]:
        return self.aio.succeeded

    @property
    def exit_code(self) -> Optional[int]:
        return self.aio.exit_code

    @property
    def output(self) -> str:
        return self.test.client._run(self.aio.output())

    def wait(self, timeout: Optional[float] = None, check: bool = False) -> RunResult:
        return self.test.client._run(self.aio.wait(timeout, check))

    def send(self, data: Union[str, bytes]) -> None:
        """See :meth:`testbus.aio.Process.send`."""
        self.test.client._run(self.aio.send(data))

    def close_stdin(self) -> None:
        self.test.client._run(self.aio.close_stdin())

    def terminate(self, grace: float = 2.0) -> RunResult:
        return self.test.client._run(self.aio.terminate(grace))

    def lines(self, stream: str = "stdout") -> Iterator[str]:
        agen = self.aio.lines(stream)
        run = self.test.client._run

        async def next_line() -> str:
            return await agen.__anext__()

        try:
            while True:
                try:
                    yield run(next_line())
                except StopAsyncIteration:
                    return
        finally:
            run(agen.aclose())
