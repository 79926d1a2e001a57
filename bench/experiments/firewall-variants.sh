#!/bin/sh
# What the host firewall costs the VXLAN data plane, on a hand-built pair of "hosts"
# (namespaces xqfw-*: vxlan + bridge + veth, as overlay-bench's baseline), in shuffled
# alternated rounds of iperf3 (4 s each). Not run in CI; root, iperf3, nft. Usage:
#   bench/experiments/firewall-variants.sh [ROUNDS]
# Variants, each as a fraction of "bare" in the same run:
#   bare      the kernel's bridge path, no netfilter at all (overlay-bench's baseline)
#   shortcut  known unicast skips the bridge (a netdev table like agent/src/shortcut.rs)
#   guard     shortcut + only the data-plane guard (one input chain, no conntrack)
#   agent     shortcut + the agent's host table (agent/src/firewall.rs, one network)
#   nocttrack shortcut + the agent's chains without conntrack users (no masquerade,
#             no `ct state`): the notrack chains and the input chain alone
# The tables below follow firewall.rs's render() for one non-internal network; keep them
# in step if it changes (its unit test prints the current text).
set -eu
ROUNDS=${1:-10}
P=xqfw
cleanup() { pkill -f "iperf3 -s -D --bind 10.200.0.2" 2>/dev/null || true
  for n in h1 h2 e1 e2; do ip netns del $P-$n 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
cleanup
for n in h1 h2 e1 e2; do ip netns add $P-$n; done
ip link add u1 netns $P-h1 type veth peer name u2 netns $P-h2
for i in 1 2; do
  h=$P-h$i; e=$P-e$i
  ip -n $h addr add 10.99.0.$i/24 dev u$i; ip -n $h link set u$i up; ip -n $h link set lo up
  ip -n $h link add br0 type bridge
  ip -n $h link add vx0 type vxlan id 42 local 10.99.0.$i dstport 4789 nolearning
  ip -n $h link set vx0 master br0; ip -n $h link set vx0 mtu 1450 up; ip -n $h link set br0 up
  ip link add p$i netns $h type veth peer name eth0 netns $e
  ip -n $h link set p$i master br0 mtu 1450 up
  ip -n $e link set eth0 address 02:00:00:00:00:0$i mtu 1450 up; ip -n $e link set lo up
  ip -n $e addr add 10.200.0.$i/24 dev eth0
done
ip -n $P-e1 neigh replace 10.200.0.2 lladdr 02:00:00:00:00:02 dev eth0 nud permanent
ip -n $P-e2 neigh replace 10.200.0.1 lladdr 02:00:00:00:00:01 dev eth0 nud permanent
bridge -n $P-h1 fdb append 02:00:00:00:00:02 dev vx0 dst 10.99.0.2 self permanent
bridge -n $P-h2 fdb append 02:00:00:00:00:01 dev vx0 dst 10.99.0.1 self permanent
bridge -n $P-h1 fdb add 02:00:00:00:00:02 dev vx0 master static
bridge -n $P-h2 fdb add 02:00:00:00:00:01 dev vx0 master static

shortcut() { # on|off
  for i in 1 2; do
    h=$P-h$i; o=$((3-i))
    ip netns exec $h nft delete table netdev xqfw 2>/dev/null || true
    [ "$1" = on ] || continue
    ip netns exec $h nft -f - <<NFT
table netdev xqfw {
  map l2 { type ether_addr : iface_index; elements = { 02:00:00:00:00:0$i : "p$i", 02:00:00:00:00:0$o : "vx0" } }
  chain from_port { type filter hook ingress device "p$i" priority 0; pkttype { broadcast, multicast } return; fwd to ether daddr map @l2; }
  chain from_vx { type filter hook ingress device "vx0" priority 0; fwd to ether daddr map @l2; }
}
NFT
  done
}
SETS='
	set hosts { type ipv4_addr; elements = { 10.99.0.1, 10.99.0.2 } }
	set data_ports { type inet_service; elements = { 4789 } }
	set control_addrs { type ipv4_addr; elements = { 10.99.0.1, 10.99.0.2 } }
	set control_ports { type inet_service; elements = { 7400, 9100 } }
	set gateway_macs { type ether_addr; elements = { 02:aa:aa:aa:aa:aa } }
	set bridged { type ifname . ifname; elements = { "br0" . "br0" } }
	set gateways { type ifname . ipv4_addr; elements = { "br0" . 10.200.0.254 } }'
GUARD='
	chain input { type filter hook input priority filter; policy accept;
		udp dport @data_ports ip saddr != @hosts counter drop
		meta nfproto ipv6 udp dport @data_ports counter drop
	}'
NOTRACK='
	chain prerouting { type filter hook prerouting priority raw; policy accept;
		udp dport @data_ports notrack
		iifname "ovb-*" ether daddr != @gateway_macs notrack
	}
	chain output { type filter hook output priority raw; policy accept;
		udp dport @data_ports notrack
	}'
input() { # $1: the ct rule of from_endpoints, or nothing
  printf '%s\n' "
	chain input { type filter hook input priority filter; policy accept;
		iifname \"ovb-*\" jump from_endpoints
		udp dport @data_ports ip saddr != @hosts counter drop
		meta nfproto ipv6 udp dport @data_ports counter drop
	}
	chain from_endpoints {
		$1
		iifname . ip daddr @gateways icmp type echo-request accept
		counter drop
	}
	chain forward { type filter hook forward priority filter; policy accept;
		iifname . oifname @bridged accept
		iifname \"ovb-*\" ip daddr @control_addrs meta l4proto { tcp, udp } th dport @control_ports counter drop
		iifname \"ovb-*\" ip daddr @hosts udp dport @data_ports counter drop
	}"
}
MASQ='
	chain postrouting { type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.200.0.0/24 oifname != "ovb-*" masquerade
	}'
table() { # variant
  for i in 1 2; do ip netns exec $P-h$i nft delete table inet overlay 2>/dev/null || true; done
  case $1 in
    bare|shortcut) return ;;
    guard) body="$SETS$GUARD" ;;
    agent) body="$SETS$NOTRACK$(input 'ct state established,related accept')$MASQ" ;;
    nocttrack) body="$SETS$NOTRACK$(input '')" ;;
  esac
  for i in 1 2; do printf 'table inet overlay {%s\n}\n' "$body" | ip netns exec $P-h$i nft -f -; done
}
measure() {
  c0=$(awk '/^cpu /{print $2+$3+$4+$6+$7+$8}' /proc/stat)
  bps=$(ip netns exec $P-e1 iperf3 -c 10.200.0.2 -t 4 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])')
  c1=$(awk '/^cpu /{print $2+$3+$4+$6+$7+$8}' /proc/stat)
  echo "$1 $bps $((c1 - c0))"
}
ip netns exec $P-e2 iperf3 -s -D --bind 10.200.0.2 >/dev/null; sleep 0.5
out=$(mktemp)
for r in $(seq "$ROUNDS"); do
  for v in $(printf '%s\n' bare shortcut guard agent nocttrack | shuf); do
    if [ $v = bare ]; then shortcut off; else shortcut on; fi
    for i in 1 2; do ip netns exec $P-h$i sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true; done
    table $v; measure $v | tee -a "$out" >&2
  done
done
python3 - "$out" <<'PYEOF'
import collections, statistics as st, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    v, bps, ticks = line.split()
    runs[v].append((float(bps), float(bps) / max(float(ticks), 1.0)))
med = {v: (st.median(b for b, _ in r), st.median(c for _, c in r)) for v, r in runs.items()}
print(f"{'variant':10} {'Gbit/s':>7} {'/ bare':>7} {'per CPU s / bare':>17}")
for v in ["bare", "shortcut", "guard", "agent", "nocttrack"]:
    g, c = med[v]
    print(f"{v:10} {g/1e9:7.2f} {g/med['bare'][0]:7.2f} {c/med['bare'][1]:17.2f}")
PYEOF
rm -f "$out"
