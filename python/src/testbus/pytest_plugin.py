"""The pytest plugin (registered as ``testbus`` through the ``pytest11`` entry
point).

A test declares the hosts it needs with a marker, and asks for each role by
name, as pytest-mh does::

    @pytest.mark.topology(server="nfs-server", client=testbus.Role(["nfs-client"], count=2))
    def test_mount(server, client):
        server.run("exportfs -a")
        client.run(["mount", f"{server.vars['ipv4addr']}:/export", "/mnt"])   # on both clients

A role with ``count`` is a :class:`~testbus.Group` (``client0``,
``client1``); one without is a :class:`~testbus.Host`. The fixtures
``testbus_client`` (session) and ``testbus_test`` (the claimed test) are
there too. The test's id gets the topology's name (``test_mount[nfs]`` with
``name="nfs"``, else its roles joined by ``+``).

Tests with the same topology share one claim for the session (one testbus
test, finished at the end); where the claimed hosts are pool guests, each
pytest test gets clean ones (its claim is finished after it). Each pytest
test's outcome is recorded in the shared test as a result named after its
node id, so ``testbusctl results -o junit`` and ``pytest --junitxml`` agree.
A claim that cannot be satisfied is the test's setup error, with the reason.
Under pytest-xdist each worker claims its own hosts.

Options: ``--testbus-server`` and ``--testbus-config`` (else the variables
and config file ``testbusctl`` uses), ``--testbus-timeout`` (seconds a shared
claim may live, default 3600).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Dict, Generator, Iterator, List, Tuple

import pytest

from .aio import Role, requirements
from .client import Client, Group, Host, Test

_MARKER = "topology"
_POOL_LABEL = "testbus.io/pool"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbus")
    group.addoption("--testbus-server", default=None, help="control plane address (else as testbusctl finds it)")
    group.addoption("--testbus-config", default=None, help="testbusctl config file (else $TESTBUS_CONFIG)")
    group.addoption(
        "--testbus-timeout", type=float, default=3600.0, help="seconds a shared claim may live (default 3600)"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(name=None, **roles): the hosts the test needs, by role: a capability, a list of them, "
        "a mapping (capabilities, count, selector, host) or a testbus.Role",
    )


class _Placeholder:
    """Stands for a role until the claim is made (parametrize needs a value)."""

    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"<testbus role {self.role}>"


def _topology(marker: pytest.Mark) -> Tuple[str, Dict[str, Any]]:
    if marker.args:
        raise pytest.UsageError(f"@pytest.mark.{_MARKER} takes keyword arguments only (role=what it needs)")
    roles = {k: v for k, v in marker.kwargs.items() if k != "name"}
    if not roles:
        raise pytest.UsageError(f"@pytest.mark.{_MARKER}: name at least one role")
    name = marker.kwargs.get("name") or "+".join(roles)
    return str(name), roles


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker(_MARKER)
    if marker is None or marker.args:
        # Positional arguments are another plugin's (pytest-mh's) topology.
        return
    name, roles = _topology(marker)
    try:
        requirements(roles)
    except ValueError as e:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: @pytest.mark.{_MARKER}: {e}") from None
    wanted = [r for r in roles if r in metafunc.fixturenames]
    if wanted:
        metafunc.parametrize(wanted, [tuple(_Placeholder(r) for r in wanted)], ids=[name])


class _Claims:
    """The session's claims, one per topology: made on first use, finished
    at the session's end (or after each test, on pool guests)."""

    def __init__(self, client: Client, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.tests: Dict[str, Test] = {}
        self.pool_guests: Dict[str, bool] = {}

    def get(self, key: str, roles: Dict[str, Any], label: str) -> Test:
        t = self.tests.get(key)
        if t is not None:
            try:
                running = t.phase == "Running"
            except Exception:  # gone (deleted, expired) or unreachable: claim anew
                running = False
            if not running:
                self.tests.pop(key)
                t = None
        if t is None:
            # Never wait for hosts while holding others: two sessions (xdist
            # workers) each holding one topology and waiting for another
            # would wait for ever. Tests are ordered by topology, so a
            # claim is made again only where the order cannot group them.
            self.finish_all()
            t = self.client.create_test(
                roles, timeout=self.timeout, labels={"testbus.io/pytest-topology": _label(label)}
            )
            t.start()
            self.tests[key] = t
            self.pool_guests[key] = any(h.aio.labels.get(_POOL_LABEL) for h in t.hosts.values())
        return t

    def after(self, key: str) -> None:
        if self.pool_guests.get(key):
            t = self.tests.pop(key, None)
            if t is not None:
                try:
                    t.finish()
                except Exception:  # already ended (timed out): the guest goes back anyway
                    pass

    def finish_all(self) -> None:
        for t in self.tests.values():
            try:
                t.finish()
            except Exception:  # the session ends anyway; the test times out
                pass
        self.tests.clear()


def _label(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]", "-", s)[:63].strip("-_.")
    return s or "topology"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: List[pytest.Item]) -> None:
    """Tests of one topology run one after the other (in the order the
    first of each was collected), so each topology is claimed once."""
    first: Dict[str, int] = {}
    for i, item in enumerate(items):
        m = item.get_closest_marker(_MARKER)
        first.setdefault(repr(sorted(m.kwargs.items())) if m else "", i)

    def order(pair: Tuple[int, pytest.Item]) -> Tuple[int, int]:
        m = pair[1].get_closest_marker(_MARKER)
        return first[repr(sorted(m.kwargs.items())) if m else ""], pair[0]

    items[:] = [item for _, item in sorted(enumerate(items), key=order)]


@pytest.fixture(scope="session")
def testbus_client(pytestconfig: pytest.Config) -> Iterator[Client]:
    """The session's :class:`~testbus.Client`."""
    client = Client(pytestconfig.getoption("testbus_server"), pytestconfig.getoption("testbus_config"))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def _testbus_claims(testbus_client: Client, pytestconfig: pytest.Config) -> Iterator[_Claims]:
    claims = _Claims(testbus_client, pytestconfig.getoption("testbus_timeout"))
    try:
        yield claims
    finally:
        claims.finish_all()


@pytest.fixture
def testbus_test(request: pytest.FixtureRequest, _testbus_claims: _Claims) -> Iterator[Test]:
    """The claimed test of this test's ``@pytest.mark.topology`` (shared by
    every test of the session with the same topology)."""
    marker = request.node.get_closest_marker(_MARKER)
    if marker is None:
        raise pytest.UsageError(f"{request.node.nodeid}: testbus_test needs @pytest.mark.{_MARKER}(role=...)")
    name, roles = _topology(marker)
    key = repr(sorted((r.role, list(r.capabilities), r.count, r.selector, r.host) for r in requirements(roles)))
    t = _testbus_claims.get(key, roles, name)
    request.node._testbus = t
    try:
        yield t
    finally:
        _testbus_claims.after(key)


def _for_role(t: Test, role: str) -> Any:
    h = t.aio.hosts.get(role)
    if h is not None and not any(m != role and m.startswith(role) and m[len(role) :].isdigit() for m in t.aio.hosts):
        return Host(t, h)
    return Group(t, t.aio.role(role))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """After the test's own fixtures: its claim (a claim that cannot be
    made is the test's setup error), and each role argument replaced by
    its Host or Group."""
    yield
    funcargs = getattr(item, "funcargs", {})
    roles = {k: v for k, v in funcargs.items() if isinstance(v, _Placeholder)}
    if not roles and item.get_closest_marker(_MARKER) is None:
        return
    t = item._request.getfixturevalue("testbus_test")  # type: ignore[attr-defined]
    for k, v in roles.items():
        funcargs[k] = _for_role(t, v.role)


def result_path(nodeid: str) -> str:
    """The testbus result path of a pytest node id:
    ``tests/test_nfs.py::TestX::test_mount[nfs]`` is
    ``tests.test_nfs.TestX.test_mount[nfs]`` (the last segment is the
    JUnit name, the rest its class, as pytest's own JUnit XML has them)."""
    # Parameters first: an id may hold "::" or "." of its own.
    head, bracket, params = nodeid.partition("[")
    path, _, rest = head.partition("::")
    module = path[:-3] if path.endswith(".py") else path
    parts: List[str] = [p for p in module.split("/") if p]
    names = rest.split("::") if rest else []
    if bracket:
        last = names.pop() if names else ""
        names.append(last + "[" + params.replace(".", "_"))
    clean = [re.sub(r"[^A-Za-z0-9_\-\[\]+=:,@]", "_", p) or "_" for p in parts + names]
    out = ".".join(clean)
    if len(out) > 253:
        # Cut, and told apart from other cut ids by a digest of the whole.
        digest = hashlib.sha256(nodeid.encode()).hexdigest()[:12]
        out = out[:240].rstrip(".") + "-" + digest
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    t = getattr(item, "_testbus", None)
    if t is None:
        return
    if report.when == "call" or (report.when == "setup" and report.skipped):
        verdict = "pass" if report.passed else "skip" if report.skipped else "fail"
        message = ""
        if report.failed:
            message = str(report.longrepr)[-2000:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        try:
            t.result(result_path(item.nodeid), verdict, message)
        except Exception as e:  # the report stands; say why testbus lacks it
            item.warn(pytest.PytestWarning(f"testbus: cannot record the result of {item.nodeid}: {e}"))


__all__ = ["Role", "result_path"]
