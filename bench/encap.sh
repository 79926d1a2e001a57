#!/bin/sh
# Encapsulation benchmark of issue 5 on a throwaway namespace lab (root): iperf3 TCP and
# ping for the bare underlay, kernel VXLAN, --encap udp, --encap udp --encrypted and
# Nebula between the same two host namespaces. Not run in CI.
# Usage: bench/encap.sh [--debug] [--time S] [--runs N] [--pings N] [--nebula-mtu N]
# Installs the Debian packages it needs (iperf3, nebula, iputils-ping) when missing,
# builds the workspace (release by default) and runs overlay-encap-bench, which prints
# one table.
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "error: run as root: the benchmark creates network namespaces" >&2
    exit 1
fi
missing=""
for p in iperf3 nebula iputils-ping; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "==> installing$missing" >&2
    apt-get update -qq
    # shellcheck disable=SC2086 # a list of package names
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
profile=release
if [ "${1:-}" = "--debug" ]; then profile=debug; shift; fi
if [ "$profile" = release ]; then
    cargo build --release --workspace --bins
else
    cargo build --workspace --bins
fi
dir="${CARGO_TARGET_DIR:-target}/$profile"
exec "$dir/overlay-encap-bench" "$@"
