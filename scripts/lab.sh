#!/usr/bin/env bash
# The embedded default: a 3-host overlay cluster in network namespaces on this machine
# (an underlay switch, 3 hosts, 3 controllers, 3 agents).
#   lab.sh up            build, then start the lab (or check the running one); idempotent
#   lab.sh status        processes and hosts
#   lab.sh ctl ARGS...   overlayctl ARGS against the lab
#   lab.sh down          remove every namespace, device and process the lab made
# Builds into $CARGO_TARGET_DIR when set (default ./target).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "error: run as root: the lab creates network namespaces" >&2
  exit 1
fi
lab="${CARGO_TARGET_DIR:-target}/debug/overlay-lab"
if [ "${1:-}" = "up" ]; then
  # What the lab runs (nft for the agents) and what the README's walk-through uses.
  need=()
  command -v ip >/dev/null || need+=(iproute2)
  command -v nsenter >/dev/null || need+=(util-linux)
  command -v nft >/dev/null || need+=(nftables)
  command -v ping >/dev/null || need+=(iputils-ping)
  command -v dig >/dev/null || need+=(bind9-dnsutils)
  if [ "${#need[@]}" -gt 0 ]; then
    echo "==> installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  fi
  echo "==> building overlay (cargo build; the first build takes a few minutes)"
  cargo build --workspace --bins --quiet
elif [ ! -x "$lab" ]; then
  echo "error: $lab is missing: run ./scripts/lab.sh up first" >&2
  exit 1
fi
exec "$lab" "$@"
