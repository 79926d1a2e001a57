#!/usr/bin/env bash
# Provisions VM N of the Vagrant cluster (run as root inside the VM by the Vagrantfile):
# installs overlay with deploy/install.sh, writes this VM's controller and agent configs,
# and enables + starts both units. With --root DIR --no-systemctl it only writes files
# under DIR, which is how the tests check it without a VM.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: vagrant/provision.sh --id N [--members M] [--net A.B.C] [--from DIR] [--root DIR] [--no-systemctl]

  --id N          this VM's number, 1..: host name vmN, underlay IP A.B.C.(10+N),
                  controller member N when N <= M
  --members M     controller members, on VMs 1..M (default 3; 1, 3 or 5)
  --net A.B.C     the private network's first three octets (default 192.168.56)
  --from DIR      the built binaries (default: the repository's target/release)
  --tls DIR       the cluster PKI made by overlayctl cert: ca.pem, vmN.pem and
                  vmN-key.pem (role agent), on controller VMs also vmN-controller.pem
                  and vmN-controller-key.pem (role controller), and optionally
                  admin.pem and admin-key.pem (role admin, for overlayctl on the VM);
                  installed into /etc/overlay/tls. Without --tls the cluster runs
                  --insecure: plaintext and unauthenticated (a warning says so)
  --root DIR      write everything under DIR instead of /: no package installation,
                  no sysctl, and units are only enabled (systemctl --root), not started
  --no-systemctl  do not run systemctl at all
  -h, --help      this text
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
id=""
members=3
net="192.168.56"
from="$repo/target/release"
root=""
tls=""
systemctl=1

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --no-systemctl)
      systemctl=0
      shift
      ;;
    --id | --members | --net | --from | --root | --tls)
      [ $# -ge 2 ] || die "$1 needs a value (see --help)"
      case "$1" in
        --id) id="$2" ;;
        --members) members="$2" ;;
        --net) net="$2" ;;
        --from) from="$2" ;;
        --root) root="${2%/}" ;;
        --tls) tls="$2" ;;
      esac
      shift 2
      ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[ -n "$id" ] || die "--id N is required (see --help)"
[[ "$id" =~ ^[1-9][0-9]*$ ]] && [ "$id" -le 200 ] || die "--id $id: expected a number 1..200"
[[ "$members" =~ ^[135]$ ]] || die "--members $members: expected 1, 3 or 5"
[[ "$net" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "--net $net: expected three octets like 192.168.56"
if [ -n "$root" ]; then
  mkdir -p "$root" || die "--root $root: cannot create it"
  root="$(cd "$root" && pwd)"
elif [ "$(id -u)" -ne 0 ]; then
  die "provisioning this machine needs root (or write into a directory with --root DIR)"
fi

name="vm$id"
ip="$net.$((10 + id))"
if [ -n "$tls" ]; then
  for f in ca.pem "$name.pem" "$name-key.pem"; do
    [ -f "$tls/$f" ] || die "--tls $tls: $f is missing (overlayctl cert issue $name --role agent --ip $ip --ca-dir DIR --out $tls)"
  done
  if [ "$id" -le "$members" ]; then
    for f in "$name-controller.pem" "$name-controller-key.pem"; do
      [ -f "$tls/$f" ] || die "--tls $tls: $f is missing (overlayctl cert issue $name-controller --role controller --ip $ip --ca-dir DIR --out $tls)"
    done
  fi
  scheme=https
else
  echo "warning: no --tls: this cluster runs --insecure (plaintext, unauthenticated)" >&2
  scheme=http
fi
port=7400
peers=""
urls=""
for m in $(seq 1 "$members"); do
  peers="${peers:+$peers,}$m=$net.$((10 + m)):$port"
  urls="${urls:+$urls,}$scheme://$net.$((10 + m)):$port"
done

echo "==> provisioning $name ($ip)${root:+ under $root}"
if [ -z "$root" ] && ! command -v nft >/dev/null; then
  # The agent's host firewall (isolation, egress, control- and data-plane guards) is
  # nft(8); without it the agent attaches no endpoint and shows the host degraded.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2
fi
"$repo/deploy/install.sh" --from "$from" --destdir "$root"

etc="$root/etc/overlay"
mkdir -p "$etc"
# These configs belong to provisioning: re-provisioning rewrites them.
if [ "$id" -le "$members" ]; then
  cat >"$etc/controller.toml" <<EOF
# Written by vagrant/provision.sh for $name. Every key is documented in
# /usr/local/share/doc/overlay/controller.toml.
id = $id
listen = "$ip:$port"
peers = "$peers"
data_dir = "/var/lib/overlay/controller"
EOF
  if [ -n "$tls" ]; then
    install -D -m 0644 "$tls/ca.pem" "$etc/tls/ca.pem"
    install -D -m 0644 "$tls/$name-controller.pem" "$etc/tls/controller.pem"
    install -D -m 0600 "$tls/$name-controller-key.pem" "$etc/tls/controller-key.pem"
    cat >>"$etc/controller.toml" <<EOF
tls_ca = "/etc/overlay/tls/ca.pem"
tls_cert = "/etc/overlay/tls/controller.pem"
# Handed to the unit's dynamic user by systemd (LoadCredential in the unit).
tls_key = "/run/credentials/overlay-controller.service/tls-key"
EOF
    echo "  installed  $etc/tls/{controller.pem,controller-key.pem}"
  else
    echo 'insecure = true' >>"$etc/controller.toml"
  fi
  chmod 0644 "$etc/controller.toml"
  echo "  wrote      $etc/controller.toml (member $id of $members)"
fi
cat >"$etc/agent.toml" <<EOF
# Written by vagrant/provision.sh for $name. Every key is documented in
# /usr/local/share/doc/overlay/agent.toml.
name = "$name"
underlay_ip = "$ip"
controller = "$urls"
data_dir = "/var/lib/overlay/agent"
EOF
if [ -n "$tls" ]; then
  install -D -m 0644 "$tls/ca.pem" "$etc/tls/ca.pem"
  install -D -m 0644 "$tls/$name.pem" "$etc/tls/$name.pem"
  install -D -m 0600 "$tls/$name-key.pem" "$etc/tls/$name-key.pem"
  cat >>"$etc/agent.toml" <<EOF
tls_ca = "/etc/overlay/tls/ca.pem"
tls_cert = "/etc/overlay/tls/$name.pem"
tls_key = "/etc/overlay/tls/$name-key.pem"
EOF
  echo "  installed  $etc/tls/{ca.pem,$name.pem,$name-key.pem}"
  if [ -f "$tls/admin.pem" ] && [ -f "$tls/admin-key.pem" ]; then
    install -D -m 0644 "$tls/admin.pem" "$etc/tls/admin.pem"
    install -D -m 0600 "$tls/admin-key.pem" "$etc/tls/admin-key.pem"
    echo "  installed  $etc/tls/{admin.pem,admin-key.pem} (root only)"
  fi
else
  echo 'insecure = true' >>"$etc/agent.toml"
fi
chmod 0644 "$etc/agent.toml"
echo "  wrote      $etc/agent.toml"
# overlayctl on the VM talks to the cluster without flags (as admin, when root).
mkdir -p "$root/etc/profile.d"
{
  echo "export OVERLAY_CONTROLLER=$urls"
  if [ -n "$tls" ]; then
    echo "export OVERLAY_TLS_CA=/etc/overlay/tls/ca.pem"
    echo "export OVERLAY_TLS_CERT=/etc/overlay/tls/admin.pem"
    echo "export OVERLAY_TLS_KEY=/etc/overlay/tls/admin-key.pem"
  fi
} >"$root/etc/profile.d/overlay.sh"
echo "  wrote      $root/etc/profile.d/overlay.sh"

if [ -z "$root" ]; then
  sysctl --system >/dev/null
fi
if [ "$systemctl" = 1 ] && [ -n "$root" ]; then
  # Offline: only the [Install] symlinks under DIR.
  units=(overlay-agent)
  if [ "$id" -le "$members" ]; then units+=(overlay-controller); fi
  systemctl --root="$root" enable "${units[@]}"
elif [ "$systemctl" = 1 ]; then
  systemctl daemon-reload
  if [ "$id" -le "$members" ]; then
    systemctl enable --now overlay-controller
  fi
  systemctl enable --now overlay-agent
  echo "==> $name: overlay-controller and overlay-agent enabled and started"
fi
