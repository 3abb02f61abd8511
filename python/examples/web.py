"""What the example tests run on their hosts: a web server that tells the
clients where it listens (``testbus.send``) once it does, and clients that
wait for that (``testbus.recv``) and fetch a page. Each is a Python
program given to ``python3 -c``."""

SERVER = """
import http.server, os, sys, testbus
addr = sys.argv[1]
srv = http.server.HTTPServer((addr, 0), http.server.SimpleHTTPRequestHandler)
testbus.send("url", f"http://{addr}:{srv.server_address[1]}/")
for _ in range(int(sys.argv[2])):
    srv.handle_request()
"""

CLIENT = """
import urllib.request, testbus
url = testbus.recv("url", sender="server", timeout=60)
print(urllib.request.urlopen(url, timeout=30).status)
"""
