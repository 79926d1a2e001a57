#!/usr/bin/env bash
# The README walk-through across the Vagrant VMs, checked: a frontend and an internal
# backend network, s1 on vm1, s2 on vm2, a gateway endpoint gw on vm3 in both networks,
# routes through it, names through the embedded DNS; then an encrypted network (QUIC
# between the hosts, certificates from provisioning). Cleans up after itself.
#
#   cd vagrant && vagrant up && ./smoke.sh
#   ./smoke.sh --lab      # the same against `./scripts/lab.sh up` on this machine
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
mode=vagrant
keep=0
for arg in "$@"; do
  case "$arg" in
    --lab) mode=lab ;;
    --keep) keep=1 ;;
    -h | --help)
      echo "usage: vagrant/smoke.sh [--lab] [--keep]"
      echo "  --lab   run against the namespace lab (./scripts/lab.sh up) instead of the VMs"
      echo "  --keep  leave the networks and endpoints in place"
      exit 0
      ;;
    *)
      echo "error: unknown argument $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

if [ "$mode" = lab ]; then
  hosts=(h1 h2 h3)
  [ -e /run/overlay-lab.json ] || {
    echo "error: no lab is up: run ./scripts/lab.sh up first" >&2
    exit 1
  }
  # Host N of the lab is network namespace ovtlabhN on this machine.
  on() {
    local n="$1"
    shift
    nsenter --net="/run/netns/ovtlabh$n" -- "$@"
  }
  ctl() { "$repo/scripts/lab.sh" ctl "$@"; }
else
  hosts=(vm1 vm2 vm3)
  on() {
    local n="$1"
    shift
    (cd "$here" && vagrant ssh "vm$n" -c "sudo $(printf '%q ' "$@")" -- -q)
  }
  # provision.sh put the controllers and the admin TLS files in /etc/profile.d; sudo
  # drops them, so source it.
  ctl() { on 1 bash -c '. /etc/profile.d/overlay.sh && exec overlayctl "$@"' overlayctl "$@"; }
fi

step() { echo "==> $*"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
# retry SECONDS CMD...: until CMD succeeds (the agents converge within seconds).
retry() {
  local until=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$until" ] || return 1
    sleep 1
  done
}
ready_hosts() { ctl -o json host ls | grep -o '"status": *"ready"' | wc -l; }
cleanup() {
  for e in s1 s2 gw e1 e2; do ctl endpoint rm "$e" >/dev/null 2>&1 || true; done
  for n in frontend backend secure; do ctl network rm "$n" >/dev/null 2>&1 || true; done
}

step "three hosts ready"
retry 60 test "$(ready_hosts)" -eq 3 || fail "hosts not ready: $(ctl host ls)"
ctl host ls
cleanup

step "networks, endpoints on three hosts, a gateway, routes"
ctl network create frontend --subnet 10.0.1.0/24
ctl network create backend --subnet 10.0.2.0/24 --internal
ctl endpoint create s1 --host "${hosts[0]}" --network frontend
ctl endpoint create s2 --host "${hosts[1]}" --network backend
ctl endpoint create gw --host "${hosts[2]}" --network frontend
ctl network connect backend gw
ctl route add frontend 10.0.2.0/24 --via gw
ctl route add backend 10.0.1.0/24 --via gw
s2_ip="$(ctl -o json endpoint inspect s2 | grep -o '"ip": *"[0-9.]*"' | head -1 | grep -o '[0-9.]*' | tail -1)"
[ -n "$s2_ip" ] || fail "no address for s2"

step "s1 (${hosts[0]}) reaches gw (${hosts[2]}) by name"
retry 30 on 1 ip netns exec s1 ping -c 1 -W 1 gw || fail "s1 cannot ping gw"
step "gw reaches s2 (${hosts[1]}) by name on backend"
retry 30 on 3 ip netns exec gw ping -c 1 -W 1 s2 || fail "gw cannot ping s2"
step "s1 reaches s2 at $s2_ip through gw (TTL 63)"
# One hop: the reply left s2 with TTL 64 and was forwarded once, by gw.
routed_once() {
  local out
  out="$(on 1 ip netns exec s1 ping -c 1 -W 1 "$s2_ip")" && [[ "$out" == *"ttl=63"* ]]
}
retry 30 routed_once || fail "s1 does not reach $s2_ip through gw with TTL 63"
step "s1 cannot resolve s2 (no shared network)"
if on 1 ip netns exec s1 getent hosts s2 >/dev/null; then fail "s1 resolved s2"; fi

step "an encrypted network: e1 (${hosts[0]}) reaches e2 (${hosts[1]}) over QUIC"
ctl network create secure --subnet 10.0.3.0/24 --encap udp --encrypted
ctl endpoint create e1 --host "${hosts[0]}" --network secure
ctl endpoint create e2 --host "${hosts[1]}" --network secure
retry 30 on 1 ip netns exec e1 ping -c 1 -W 1 e2 || fail "e1 cannot ping e2"

if [ "$keep" = 0 ]; then
  step "cleaning up"
  cleanup
fi
echo "smoke: all checks passed"
