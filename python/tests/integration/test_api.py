"""The Python API against real daemons (started by tests/tests/python.rs)."""

import asyncio
import os
import sys
import time

import pytest

import testbus
from testbus import Role, aio

TWO = {"server": None, "client": Role(count=2)}


@pytest.fixture(scope="module")
def client():
    with testbus.Client() as c:
        yield c


def test_commands_give_rc_stdout_stderr_and_raise_on_failure(client):
    with client.create_test(TWO, env={"GREETING": "hi"}) as t:
        assert sorted(t.hosts) == ["client0", "client1", "server"]
        server = t.hosts["server"]
        r = server.run(["sh", "-c", "echo $GREETING from $TESTBUS_ROLE; echo oops >&2"])
        assert (r.rc, r.stdout, r.stderr, r.succeeded) == (0, "hi from server\n", "oops\n", True)
        r = server.run("printf '%s' \"$(cat)\" | tr a-z A-Z; pwd", stdin="abc", cwd="/tmp", env={"X": "1"})
        assert r.stdout == "ABC/tmp\n"
        with pytest.raises(testbus.ProcessError) as e:
            server.run(["sh", "-c", "echo partial; echo broken >&2; exit 3"])
        assert (e.value.rc, e.value.stdout, e.value.stderr) == (3, "partial\n", "broken\n")
        assert "exit code 3" in str(e.value)
        r = server.run(["sh", "-c", "exit 4"], check=False)
        assert (r.rc, r.succeeded) == (4, False)
        missing = server.run(["no-such-command-here"], check=False)
        assert missing.rc == 127 and not missing.succeeded
        slow = server.run(["sleep", "30"], timeout=1, check=False)
        assert slow.reason == "TimedOut" and not slow.succeeded
        # A group runs on every member at once.
        results = t.role("client").run("echo $TESTBUS_ROLE")
        assert sorted(r.stdout for r in results) == ["client0\n", "client1\n"]
        assert server.vars["hostname"] and t.env["host_server_hostname"] == server.vars["hostname"]
        t.setenv(MODE="fast")
        assert t.hosts["client1"].run("echo $MODE").stdout == "fast\n"
        t.result("api.commands", "pass", "all said")
    assert t.phase == "Succeeded"


def test_background_processes_wait_stream_and_terminate(client):
    with client.create_test({"a": None}) as t:
        a = t.hosts["a"]
        p = a.run(
            "trap 'echo term; exit 9' TERM; i=0; while :; do echo line$i; i=$((i+1)); sleep 0.05; done",
            background=True,
        )
        assert isinstance(p, testbus.Process)
        seen = []
        for line in p.lines():
            seen.append(line)
            if len(seen) == 3:
                break
        assert seen == ["line0", "line1", "line2"]
        assert p.active and p.succeeded is None
        with pytest.raises(TimeoutError):
            p.wait(timeout=0.2)
        r = p.terminate(grace=5)
        assert r.phase == "Killed" and r.signal == "SIGTERM" and "term\n" in r.stdout
        assert not p.active and p.succeeded is False
        quick = a.run(["sh", "-c", "echo done; exit 2"], background=True)
        r = quick.wait(timeout=30)
        assert (r.rc, r.stdout, quick.exit_code) == (2, "done\n", 2)
        assert "done" in quick.output
        # Left running: leaving the block stops it, then finishes the test.
        left = a.run(["sleep", "600"], background=True)
    assert t.phase == "Succeeded"
    assert left.wait(timeout=30).phase == "Killed"


def test_files_go_both_ways(client, tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(range(256)) * 100)
    src.chmod(0o750)
    with client.create_test(TWO, files={"/tmp/pyfile-" + str(os.getpid()): str(src)}) as t:
        put = "/tmp/pyfile-" + str(os.getpid())
        assert t.hosts["client1"].run(["stat", "-c", "%a %s", put]).stdout == "750 25600\n"
        t.cp(str(src), f"client:/tmp/cp-{os.getpid()}")
        back = tmp_path / "back.bin"
        t.cp(f"client0:/tmp/cp-{os.getpid()}", str(back))
        assert back.read_bytes() == src.read_bytes()
        assert t.hosts["server"].get_file(put) == src.read_bytes()
        with pytest.raises(ValueError, match="client has 2 members"):
            t.cp(f"client:/tmp/cp-{os.getpid()}", str(back))
        with pytest.raises(ValueError, match="exactly one"):
            t.cp(str(src), str(back))
        t.role("client").run(["rm", "-f", put, f"/tmp/cp-{os.getpid()}"])
        t.hosts["server"].run(["rm", "-f", put])


def test_an_exception_fails_the_test_and_an_interrupt_cancels_it(client):
    with pytest.raises(RuntimeError):
        with client.create_test({"a": None}) as failed:
            raise RuntimeError("broken on purpose")
    assert failed.phase == "Failed"
    assert "broken on purpose" in client.test(failed.name).aio.obj.status.message
    with pytest.raises(KeyboardInterrupt):
        with client.create_test({"a": None}) as cancelled:
            raise KeyboardInterrupt
    assert cancelled.phase == "Cancelled"


def test_a_claim_that_cannot_be_satisfied_says_why_instead_of_waiting(client):
    started = time.monotonic()
    with pytest.raises(testbus.ClaimError) as e:
        with client.create_test({"a": "no-such-capability"}):
            pass
    assert e.value.reason == "Unsatisfiable"
    assert "no-such-capability" in str(e.value)
    assert time.monotonic() - started < 60


def test_a_rerun_of_an_open_test_is_refused_with_the_reason(client):
    with client.create_test({"a": None}) as t:
        with pytest.raises(testbus.Conflict, match="has not ended"):
            client.rerun(t.name)
    with pytest.raises(testbus.Conflict, match="is open"):
        client.rerun(t.name)
    with pytest.raises(testbus.NotFound):
        client.rerun("no-such-test-here")


def test_server_errors_are_typed(client):
    with pytest.raises(testbus.NotFound):
        client.test("no-such-test-here")
    with client.create_test({"a": None}) as t:
        with pytest.raises(testbus.Conflict):
            client.create_test({"a": None}, name=t.name).start()
        with pytest.raises(ValueError, match="^outcome"):
            t.result("x", "maybe")
        with pytest.raises(testbus.Invalid) as e:
            t.result("not a path!", "pass")
        assert e.value.field == "path"


def test_replicas_fail_over_and_an_unreachable_server_is_unavailable(client):
    live = client.server
    host, port = live.removeprefix("https://").rsplit(":", 1)
    dead = f"https://{host}:{int(port) + 7}"
    with testbus.Client(server=f"{dead},{live}") as c2, c2.create_test({"a": None}) as t:
        assert t.hosts["a"].run(["true"]).succeeded
    started = time.monotonic()
    with testbus.Client(server=dead, retry_for=1) as c3:
        with pytest.raises(testbus.Unavailable):
            c3.create_test({"a": None}).start()
    assert time.monotonic() - started < 30


def test_in_test_helpers_sync_send_and_recv(client):
    py = sys.executable
    code = (
        "import sys, testbus\n"
        "me = sys.argv[1]\n"
        "testbus.sync('ready', roles=['server', 'client'], timeout=60)\n"
        "if me == 'server':\n"
        "    testbus.send('port', '8080')\n"
        "else:\n"
        "    print(testbus.recv('port', sender='server', timeout=60))\n"
    )
    with client.create_test(TWO) as t:
        procs = [h.run([py, "-c", code, m], background=True) for m, h in t.hosts.items()]
        results = [p.wait(timeout=120, check=True) for p in procs]
        assert sorted(r.stdout for r in results) == ["", "8080\n", "8080\n"]
        outside = testbus.in_test()
        assert outside is False


def test_the_asyncio_twin_runs_many_commands_at_once():
    async def go():
        async with aio.Client() as c, c.create_test({"a": None}) as t:
            a = t.hosts["a"]
            results = await asyncio.gather(*(a.run(["echo", str(i)]) for i in range(20)))
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(20)]
            p = await a.run(["sleep", "600"], background=True)
            r = await p.terminate(grace=0.5)
            assert r.phase == "Killed"

    asyncio.run(go())


def test_a_background_process_reads_what_is_sent_to_it(client):
    with client.create_test({"a": None}) as t:
        a = t.hosts["a"]
        p = a.run(["cat"], background=True, stdin=testbus.PIPE)
        p.send("hello\n")
        lines = p.lines()
        assert next(lines) == "hello"
        p.send(b"world\n")
        assert next(lines) == "world"
        p.close_stdin()
        r = p.wait(timeout=30)
        assert (r.rc, r.stdout) == (0, "hello\nworld\n")
        lines.close()
        with pytest.raises(testbus.Conflict):
            p.send("too late\n")
        plain = a.run(["sleep", "600"], background=True)
        with pytest.raises(testbus.Conflict, match="no streamed stdin"):
            plain.send("x")
        with pytest.raises(ValueError, match="PIPE needs background"):
            a.run(["cat"], stdin=testbus.PIPE)
