#!/usr/bin/env bash
# The embedded default: a 3-host overlay cluster in network namespaces on this machine
# (an underlay switch, 3 hosts, 3 controllers, 3 agents). Usage: lab.sh up|down|status
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "error: run as root: the lab creates network namespaces" >&2
  exit 1
fi
if [ "${1:-}" != "down" ] && [ "${1:-}" != "status" ]; then
  echo "==> building overlay (first build takes a few minutes)"
  cargo build --workspace --bins --quiet
fi
exec ./target/debug/overlay-lab "$@"
