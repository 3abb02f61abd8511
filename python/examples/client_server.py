#!/usr/bin/env python3
"""A client–server test written with the testbus API: one server, two
clients; the server serves a page, each client fetches it.

    TESTBUS_CONFIG=~/.config/testbus/config.yaml python3 examples/client_server.py

The hosts run ``PYTHON`` (default: this interpreter, which works where the
hosts share this machine's files; in a lab, ``python3`` with the testbus
package installed on each host).
"""

import os
import sys

import testbus
from testbus import Role

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from web import CLIENT, SERVER  # noqa: E402

PYTHON = os.environ.get("PYTHON", sys.executable)


def main() -> int:
    with testbus.Client() as client:
        with client.create_test({"server": None, "client": Role(count=2)}, timeout=300) as t:
            server = t.hosts["server"]
            web = server.run([PYTHON, "-c", SERVER, server.vars["ipv4addr"], "2"], background=True)
            for r in t.role("client").run([PYTHON, "-c", CLIENT]):
                print(f"{r.member} on {r.host}: HTTP {r.stdout.strip()}")
                t.result(f"fetch.{r.member}", "pass" if r.stdout == "200\n" else "fail", r.stdout.strip())
            web.wait(timeout=60, check=True)
        print(f"test {t.name}: {t.phase}")
        return 0 if t.phase == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
