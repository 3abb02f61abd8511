#!/bin/sh
# Imperative scripting, the way classic shell suites drive hosts one by one:
# claim a server and a client (an open test), copy a config file to the
# client, run commands on each, record a small tree of results, finish, and
# print the report.
#
#   TESTBUS_SERVER=... manifests/examples/scripted-client-server.sh [TEST-NAME]
set -eu
T=${1:-scripted-$$}
tmp=$(mktemp -d)
finished=no
cleanup() {
  [ "$finished" = yes ] || testbusctl finish "$T" --failed >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

testbusctl create test "$T" --claim server --claim client --timeout 10m --wait-claimed

server_ip=$(testbusctl getenv "$T" host_server_ipv4addr)
testbusctl setenv "$T" SERVER_IP="$server_ip"
printf 'server = %s\nport = 7100\n' "$server_ip" > "$tmp/client.conf"
testbusctl cp "$tmp/client.conf" "$T/client:/tmp/$T-client.conf"

testbusctl exec "$T" --role server -- sh -c 'echo "server $TESTBUS_HOST ready"'

if testbusctl exec "$T" --role client -- grep -q "server = \${SERVER_IP}" "/tmp/$T-client.conf"; then
  testbusctl result "$T" config.delivered pass
else
  testbusctl result "$T" config.delivered fail --message "the client has no config naming the server"
fi

name=$(testbusctl exec "$T" --role client -- sh -c 'echo $TESTBUS_HOST')
if [ -n "$name" ]; then
  testbusctl result "$T" users.verify-name pass --message "client is $name"
else
  testbusctl result "$T" users.verify-name fail
fi

testbusctl cp "$T/client:/tmp/$T-client.conf" "$tmp/back.conf"
if cmp -s "$tmp/client.conf" "$tmp/back.conf"; then
  testbusctl result "$T" config.round-trip pass
else
  testbusctl result "$T" config.round-trip fail
fi
testbusctl exec "$T" -- rm -f "/tmp/$T-client.conf"
testbusctl result "$T" optional.ipv6 skip --message "not tested here"

finished=yes
testbusctl finish "$T"
testbusctl results "test/$T"
