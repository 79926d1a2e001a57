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
./scripts/ensure-packages.sh iperf3 nebula iputils-ping
exec ./bench/build-and-run.sh overlay-encap-bench "$@"
