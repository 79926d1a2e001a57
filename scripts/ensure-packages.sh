#!/bin/sh
# ensure-packages.sh PKG...: installs the Debian packages among PKG that are missing
# (one apt-get run; nothing when all are there). Shared by the test and bench scripts.
set -eu
missing=""
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "==> installing$missing" >&2
    apt-get update -qq
    # shellcheck disable=SC2086 # a list of package names
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
