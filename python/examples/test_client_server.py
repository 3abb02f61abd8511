"""The client–server test of client_server.py, written with the pytest
plugin: the marker claims the hosts, each role is a fixture.

    pytest examples/test_client_server.py            # -n 2 with pytest-xdist
"""

import os
import sys

import pytest

import testbus

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from web import CLIENT, SERVER  # noqa: E402

PYTHON = os.environ.get("PYTHON", sys.executable)
WEB = dict(name="web", server=None, client=testbus.Role(count=2))


@pytest.mark.topology(**WEB)
def test_clients_fetch_a_page_from_the_server(server, client):
    web = server.run([PYTHON, "-c", SERVER, server.vars["ipv4addr"], "2"], background=True)
    assert [r.stdout for r in client.run([PYTHON, "-c", CLIENT])] == ["200\n", "200\n"]
    web.wait(timeout=60, check=True)


@pytest.mark.topology(**WEB)
def test_the_same_hosts_serve_the_next_test(server, client, testbus_test):
    # Same topology, same claim: no new hosts were claimed for this test.
    assert sorted(testbus_test.hosts) == ["client0", "client1", "server"]
    assert len(client) == 2
    assert server.run(["true"]).succeeded


@pytest.mark.topology(name="solo", box=None)
def test_a_single_host(box):
    r = box.run("uname -s")
    assert r.stdout == "Linux\n"
