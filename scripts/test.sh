#!/usr/bin/env bash
# Runs the whole test suite, as root, on a fresh Debian/Ubuntu machine: installs the
# Debian packages the tests need, builds every binary (the end-to-end tests run them as
# real processes in network namespaces), then runs the unit, multi-process and
# multi-host tests. Fails loudly on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "error: run as root: the end-to-end tests create network namespaces" >&2
  exit 1
fi

# podman, runc, busybox-static, containernetworking-plugins (portmap) and iptables (which
# portmap drives): the real-container test, tests/tests/cni.rs.
packages=(iproute2 iputils-ping bind9-dnsutils iperf3 tcpdump nftables procps systemd ruby git
  podman runc busybox-static containernetworking-plugins iptables)
./scripts/ensure-packages.sh "${packages[@]}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build (binaries for the end-to-end tests)"
cargo build --workspace --bins --locked
echo "==> cargo test"
cargo test --workspace --locked -- --test-threads=2
