#!/usr/bin/env bash
# Installs overlay on this host: binaries, systemd units, example configs (never over
# existing ones), the sysctl drop-in and the README. Idempotent: run it again to upgrade.
# It does not start anything; see --help.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: deploy/install.sh [--from DIR] [--prefix DIR] [--destdir DIR] [--unitdir DIR]

Installs, under DESTDIR:
  PREFIX/bin/{overlay-controller,overlay-agent,overlayctl}      mode 0755
  /usr/lib/cni/overlay-cni, /opt/cni/bin/overlay-cni   the CNI plugin, 0755 (both
                                           directories runtimes look in by default)
  UNITDIR/{overlay-controller,overlay-agent}.service            mode 0644
  /etc/overlay/{controller,agent}.toml     examples, only if absent  0644
  /etc/sysctl.d/99-overlay.conf            ip_forward, ARP table size 0644
  PREFIX/share/doc/overlay/                README and example configs 0644

Options (PREFIX and DESTDIR are also read from the environment, as with `make install`):
  --from DIR     the built binaries (default: target/release if it holds all four,
                 else target/debug)
  --prefix DIR   installation prefix, absolute (default /usr/local); ExecStart= in the
                 units is rewritten to match
  --destdir DIR  stage everything under DIR instead of / (packaging, tests)
  --unitdir DIR  where units go (default /etc/systemd/system)
  -h, --help     this text

Existing files in /etc/overlay are kept, so re-running upgrades binaries and units but
keeps your settings. Afterwards, on a real host:
  edit /etc/overlay/controller.toml and /etc/overlay/agent.toml
  sysctl --system
  systemctl daemon-reload
  systemctl enable --now overlay-controller   # on the 1, 3 or 5 controller hosts
  systemctl enable --now overlay-agent        # on every host
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
from=""
prefix="${PREFIX:-/usr/local}"
destdir="${DESTDIR:-}"
unitdir="/etc/systemd/system"

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --from | --prefix | --destdir | --unitdir)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)"
      case "$1" in
        --from) from="$2" ;;
        --prefix) prefix="$2" ;;
        --destdir) destdir="$2" ;;
        --unitdir) unitdir="$2" ;;
      esac
      shift 2
      ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

binaries=(overlay-controller overlay-agent overlayctl overlay-cni)

has_all() {
  local b
  for b in "${binaries[@]}"; do
    [ -f "$1/$b" ] || return 1
  done
}

case "$prefix" in
  /*) prefix="${prefix%/}" ;;
  *) die "--prefix $prefix: must be an absolute path" ;;
esac
case "$unitdir" in
  /*) ;;
  *) die "--unitdir $unitdir: must be an absolute path" ;;
esac
if [ -z "$from" ]; then
  if has_all "$root/target/release"; then
    from="$root/target/release"
  else
    from="$root/target/debug"
  fi
fi
[ -d "$from" ] || die "--from $from: no such directory (build with \`cargo build --release\`)"
for b in "${binaries[@]}"; do
  [ -f "$from/$b" ] || die "$from/$b is missing (build with \`cargo build --release\`, or pass --from DIR)"
done
if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
  die "installing into / needs root (or stage it with --destdir DIR)"
fi
destdir="${destdir%/}"

# put SRC DEST MODE: installs SRC as DEST, saying whether anything changed.
put() {
  local src="$1" dest="$destdir$2" mode="$3"
  if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
    echo "  unchanged  $dest"
    return
  fi
  install -D -m "$mode" "$src" "$dest"
  echo "  installed  $dest"
}

# keep SRC DEST: installs SRC as DEST only when DEST does not exist (configs).
keep() {
  local src="$1" dest="$destdir$2"
  if [ -e "$dest" ]; then
    echo "  kept       $dest (yours; the example is in $prefix/share/doc/overlay)"
    return
  fi
  install -D -m 0644 "$src" "$dest"
  echo "  installed  $dest (example: edit it)"
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "==> installing overlay from $from (prefix $prefix${destdir:+, under $destdir})"
for b in overlay-controller overlay-agent overlayctl; do
  put "$from/$b" "$prefix/bin/$b" 0755
done
# The CNI plugin goes where container runtimes look for plugins: /usr/lib/cni (Debian's
# and Fedora's podman, CRI-O) and /opt/cni/bin (containerd, nerdctl, kubelet).
for dir in /usr/lib/cni /opt/cni/bin; do
  put "$from/overlay-cni" "$dir/overlay-cni" 0755
done
for unit in overlay-controller.service overlay-agent.service; do
  sed "s|/usr/local/|$prefix/|g" "$here/$unit" >"$tmp/$unit"
  put "$tmp/$unit" "$unitdir/$unit" 0644
done
for conf in controller.toml agent.toml; do
  keep "$here/$conf" "/etc/overlay/$conf"
  put "$here/$conf" "$prefix/share/doc/overlay/$conf" 0644
done
put "$here/99-overlay.conf" /etc/sysctl.d/99-overlay.conf 0644
put "$root/README.md" "$prefix/share/doc/overlay/README.md" 0644
# The agent's host firewall (isolation, egress, control-plane and data-plane guards) is
# applied with nft(8); without it the agent attaches no endpoint and shows its host
# degraded. Checked here and said, not installed (that is the package manager's job).
if command -v nft >/dev/null 2>&1; then
  echo "==> nft found for the agent's host firewall: $(nft --version 2>/dev/null | head -n1)"
else
  echo "warning: nft (package nftables) is missing on this machine: overlay-agent needs it for its host firewall, and without it attaches no endpoint (its host shows degraded). Install it: apt-get install nftables (Debian, Ubuntu) or dnf install nftables (Fedora, RHEL)." >&2
fi
echo "==> done. Next: edit /etc/overlay/*.toml, then sysctl --system; systemctl daemon-reload;"
echo "    systemctl enable --now overlay-controller (controller hosts) overlay-agent (every host)"
