#!/bin/sh
# Shows the files this process was given.
set -e
echo "motd at $MOTD: $(cat "$MOTD")"
echo "stdin: $(cat)"
[ -x "$CHECK" ] && echo "check.sh is executable"
