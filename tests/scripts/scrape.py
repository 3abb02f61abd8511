"""Scrapes a Prometheus endpoint and parses it with Prometheus's own
parser. Arguments: URL [CA CERT KEY] (CA alone: no client certificate).
Prints JSON: {"status": HTTP status, "samples": {name: [[labels, value]]}}.
"""
import json
import ssl
import sys
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

url, creds = sys.argv[1], sys.argv[2:]
ctx = None
if creds:
    ctx = ssl.create_default_context(cafile=creds[0])
    if len(creds) == 3:
        ctx.load_cert_chain(creds[1], creds[2])
try:
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        status, text = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    status, text = e.code, ""
samples = {}
if status == 200:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps({"status": status, "samples": samples}))
