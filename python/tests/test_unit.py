"""The package's own tests: no server needed (the integration tests are in
tests/integration and need a cluster, which tests/tests/python.rs starts)."""

import asyncio
import textwrap

import grpc
import pytest

import testbus
from testbus import aio, errors
from testbus._connection import Settings, parse_server
from testbus.pytest_plugin import result_path


def test_hosts_are_roles_capabilities_counts_and_selectors():
    reqs = aio.requirements(
        {
            "server": "nfs-server",
            "client": testbus.Role(["nfs-client", "kvm"], count=2),
            "db": {"capabilities": "pg", "selector": "rack in (a,b)"},
            "any": None,
        }
    )
    assert [(r.role, list(r.capabilities), r.count if r.HasField("count") else None) for r in reqs] == [
        ("server", ["nfs-server"], None),
        ("client", ["nfs-client", "kvm"], 2),
        ("db", ["pg"], None),
        ("any", [], None),
    ]
    assert reqs[2].selector == "rack in (a,b)"
    listed = aio.requirements([{"role": "a", "count": 3}])
    assert listed[0].role == "a" and listed[0].count == 3


@pytest.mark.parametrize(
    "hosts, says",
    [
        ({}, "hosts: at least one role"),
        ([{"count": 2}], "hosts[0]: a role name is required"),
        ({"": "cap"}, "a role name is required"),
        ({"client1": "cap"}, "does not end in a digit"),
        ({"Bad_Role": "cap"}, "DNS label"),
        ({"a": testbus.Role(count=0)}, "hosts['a'].count: must be a positive"),
        ({"a": {"count": -1}}, "hosts['a'].count"),
        ({"a": {"capabilites": ["x"]}}, "unknown key 'capabilites'"),
        ({"a": testbus.Role(["ok", ""])}, "hosts['a'].capabilities"),
        ("server", "hosts: expected a mapping"),
    ],
)
def test_a_bad_host_spec_names_the_argument(hosts, says):
    with pytest.raises(ValueError) as e:
        aio.requirements(hosts)
    assert says in str(e.value)


def test_bad_arguments_are_refused_before_anything_is_sent():
    client = aio.Client(server="http://127.0.0.1:1")  # nothing listens: nothing may be sent
    with pytest.raises(ValueError, match="^timeout: must be a positive"):
        client.create_test({"a": None}, timeout=0)
    with pytest.raises(ValueError, match="^timeout"):
        client.create_test({"a": None}, timeout=-5)
    with pytest.raises(ValueError, match="^pending_timeout"):
        client.create_test({"a": None}, pending_timeout=True)
    with pytest.raises(ValueError, match="^name"):
        client.create_test({"a": None}, name="Not A Name")
    with pytest.raises(ValueError, match="^env: '1X'"):
        client.create_test({"a": None}, env={"1X": "y"})
    with pytest.raises(ValueError, match="^files: 'rel/path'"):
        client.create_test({"a": None}, files={"rel/path": __file__})
    with pytest.raises(ValueError, match="not a readable file"):
        client.create_test({"a": None}, files={"/x": "/no/such/file"})
    with pytest.raises(ValueError, match="^retry_for"):
        aio.Client(server="http://127.0.0.1:1", retry_for=0)


def test_commands_are_argv_or_shell_lines():
    step, shown = aio._command(["echo", "a b"], {"K": "v"}, "/tmp", "in", 1.5)
    assert list(step.argv) == ["echo", "a b"] and not step.shell
    assert (step.env["K"], step.workdir, step.stdin, step.timeout) == ("v", "/tmp", "in", "1500ms")
    step, _ = aio._command("echo $HOME | wc -c", None, None, None, 60)
    assert list(step.argv) == ["echo $HOME | wc -c"] and step.shell and step.timeout == "60s"
    for bad in ([], "", "  ", [1, 2]):
        with pytest.raises(ValueError, match="^command"):
            aio._command(bad, None, None, None, None)
    with pytest.raises(ValueError, match="^timeout"):
        aio._command(["true"], None, None, None, 0)


def test_members_belong_to_their_role():
    assert aio.member_matches("client1", "client")
    assert aio.member_matches("client", "client")
    assert not aio.member_matches("clients", "client")
    assert not aio.member_matches("client1", "client1x")
    assert not aio.member_matches("server", "client")


def test_server_addresses_as_testbusctl_takes_them():
    [a] = parse_server("https://cp.example:7780")
    assert (a.target, a.tls) == ("cp.example:7780", True)
    [a] = parse_server("10.0.0.1:7780")
    assert (a.target, a.tls) == ("10.0.0.1:7780", False)
    both = parse_server("https://a:1, https://b:2")
    assert [x.target for x in both] == ["a:1", "b:2"]
    [s] = parse_server("unix+tls:/run/relay.sock")
    assert (s.target, s.tls, s.name_override) == ("unix:/run/relay.sock", True, "testbus-control-plane")
    for bad, says in [("ftp://x:1", "expected HOST:PORT"), ("unix:", "needs a socket path"), (",", "no address")]:
        with pytest.raises(ValueError, match=says):
            parse_server(bad)


def test_the_config_file_is_testbusctls(tmp_path, monkeypatch):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        textwrap.dedent(
            """\
            server: https://a:7780,https://b:7780
            certificateAuthority: CA
            clientCertificate: CERT
            clientKey: KEY
            """
        )
    )
    monkeypatch.delenv("TESTBUS_SERVER", raising=False)
    monkeypatch.setenv("TESTBUS_CONFIG", str(cfg))
    s = Settings.resolve()
    assert (s.server, s.certificate_authority, s.client_key) == ("https://a:7780,https://b:7780", b"CA", b"KEY")
    monkeypatch.setenv("TESTBUS_SERVER", "https://c:1")
    assert Settings.resolve().server == "https://c:1"
    assert Settings.resolve(server="http://d:2").server == "http://d:2"
    cfg.write_text("server: x\nclientCert: oops\n")
    with pytest.raises(errors.Invalid, match="config.yaml"):
        Settings.resolve()
    monkeypatch.setenv("TESTBUS_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(errors.Invalid, match="missing.yaml"):
        Settings.resolve()


class _Rpc(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_server_errors_become_typed_exceptions():
    e = errors.from_rpc(_Rpc(grpc.StatusCode.INVALID_ARGUMENT, "spec.hosts[0].role: required"))
    assert isinstance(e, errors.Invalid) and isinstance(e, ValueError)
    assert e.field == "spec.hosts[0].role" and e.message == "spec.hosts[0].role: required"
    assert errors.from_rpc(_Rpc(grpc.StatusCode.INVALID_ARGUMENT, "two words: x")).field is None
    assert isinstance(errors.from_rpc(_Rpc(grpc.StatusCode.NOT_FOUND, 'Test "x" not found')), LookupError)
    assert isinstance(errors.from_rpc(_Rpc(grpc.StatusCode.PERMISSION_DENIED, "viewer")), PermissionError)
    assert isinstance(errors.from_rpc(_Rpc(grpc.StatusCode.UNAUTHENTICATED, "no cert")), errors.PermissionDenied)
    assert isinstance(errors.from_rpc(_Rpc(grpc.StatusCode.ABORTED, "conflict")), errors.Conflict)
    assert isinstance(errors.from_rpc(_Rpc(grpc.StatusCode.UNAVAILABLE, "down")), ConnectionError)
    assert type(errors.from_rpc(_Rpc(grpc.StatusCode.INTERNAL, "store"))) is errors.TestbusError


def test_an_unreachable_server_is_unavailable_within_the_retry_bound():
    async def go():
        async with aio.Client(server="http://127.0.0.1:1,http://127.0.0.1:2", retry_for=0.5) as c:
            await c.conn.call(lambda s: s.tests.List(testbus.v1.api_pb2.ListRequest(), timeout=2))

    with pytest.raises(errors.Unavailable, match="after 0.5s"):
        asyncio.run(go())


def test_a_failed_command_says_all_of_it():
    r = aio.RunResult(
        ["sh", "-c", "exit 3"],
        "t-x1-a",
        "a",
        "host-0",
        3,
        "out",
        "e1\ne2\n",
        False,
        "Failed",
        "NonZeroExit",
        "exit code 3",
    )
    e = errors.ProcessError(r)
    assert (e.rc, e.stdout, e.stderr) == (3, "out", "e1\ne2\n")
    assert "exit code 3" in str(e) and "host-0" in str(e) and "e2" in str(e)
    with pytest.raises(errors.ProcessError):
        r.check()


def test_pytest_node_ids_are_result_paths():
    assert result_path("tests/test_nfs.py::test_mount[nfs]") == "tests.test_nfs.test_mount[nfs]"
    assert result_path("test_a.py::TestX::test_y") == "test_a.TestX.test_y"
    assert result_path("t.py::test_p[1.5-a b]") == "t.test_p[1_5-a_b]"


def test_long_or_odd_node_ids_stay_valid_and_distinct():
    assert result_path("t.py::test_x[a::b]") == "t.test_x[a::b]"
    long_a = result_path("tests/" + "d/" * 100 + "t.py::test_a")
    long_b = result_path("tests/" + "d/" * 100 + "t.py::test_b")
    assert len(long_a) <= 253 and long_a != long_b and ".." not in long_a and not long_a.endswith(".")


def test_more_bad_arguments_name_themselves():
    client = aio.Client(server="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="^priority"):
        client.create_test({"a": None}, priority="high")
    with pytest.raises(ValueError, match="^labels"):
        client.create_test({"a": None}, labels={"k": 1})
    with pytest.raises(ValueError, match="^timeout"):
        client.create_test({"a": None}, timeout=float("inf"))
    with pytest.raises(ValueError, match="^stdin: bytes that are not UTF-8"):
        aio._command(["cat"], None, None, b"\xff", None)
    with pytest.raises(ValueError, match="^stdin: PIPE needs background"):
        aio._command(["cat"], None, None, testbus.PIPE, None)
    with pytest.raises(ValueError, match="^roles"):
        testbus.sync("b", roles="server")
    with pytest.raises(ValueError, match="^value"):
        testbus.send("k", 5)
    with pytest.raises(ValueError, match="^retry_for"):
        aio.Client(server="http://127.0.0.1:1", retry_for=True)
