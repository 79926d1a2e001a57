#!/usr/bin/env bash
# Throughput and latency of overlay-dns against aardvark-dns (podman's embedded DNS),
# both serving the same 200 names inside one throw-away network namespace, measured
# with `dnsperf -c 4 -l 10`. Not run in CI. Needs root.
#
#   sudo dns/bench/dnsperf.sh            # DURATION=10 CLIENTS=4 NAMES=200 by default
#
# Setup: apt-get install -y dnsperf aardvark-dns bind9-dnsutils
# SERVER_THREADS (default 2) sets the tokio worker threads of our server.
#
# aardvark answers only clients whose source address is a container of its config, so
# dnsperf sends to it from 10.89.0.2 ("client"); both addresses live on the
# namespace's lo. All traffic stays inside the namespace (its resolv.conf points at
# its own loopback, so nothing can leak to the host's resolvers).
set -euo pipefail

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-4}
NAMES=${NAMES:-200}
AARDVARK=${AARDVARK:-/usr/lib/podman/aardvark-dns}
NS=ovdns-bench-$$
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

die() { echo "error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
command -v dnsperf >/dev/null || die "dnsperf missing: apt-get install -y dnsperf"
[ -x "$AARDVARK" ] || die "$AARDVARK missing: apt-get install -y aardvark-dns"
command -v dig >/dev/null || die "dig missing: apt-get install -y bind9-dnsutils"

echo "building bench_server (release)..." >&2
(cd "$ROOT" && cargo build --quiet --release -p overlay-dns --example bench_server)
SERVER=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/examples/bench_server
[ -x "$SERVER" ] || die "bench_server not built at $SERVER"

WORK=$(mktemp -d)
OURS_PID=
cleanup() {
    [ -n "$OURS_PID" ] && kill "$OURS_PID" 2>/dev/null && wait "$OURS_PID" 2>/dev/null
    [ -f "$WORK/aardvark/aardvark.pid" ] && kill "$(cat "$WORK/aardvark/aardvark.pid")" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "/etc/netns/$NS" "$WORK"
}
trap cleanup EXIT

ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" ip addr add 10.89.0.1/16 dev lo
ip netns exec "$NS" ip addr add 10.89.0.2/16 dev lo
mkdir -p "/etc/netns/$NS"
echo "nameserver 127.0.0.1" >"/etc/netns/$NS/resolv.conf"

# The same records for both: ep$i at 10.89.1.0 + i (see testutil::bench_catalog).
addr() { local n=$((256 + $1)); echo "10.89.$((n / 256)).$((n % 256))"; }
for i in $(seq 0 $((NAMES - 1))); do echo "ep$i A"; done >"$WORK/queries"
mkdir "$WORK/aardvark"
{
    echo "10.89.0.1"
    echo "client 10.89.0.2  client"
    for i in $(seq 0 $((NAMES - 1))); do echo "ep$i $(addr "$i")  ep$i"; done
} >"$WORK/aardvark/bench"

"$SERVER" --netns "/var/run/netns/$NS" --listen 127.0.0.11:53 --names "$NAMES" --threads "${SERVER_THREADS:-2}" >"$WORK/ours.log" 2>&1 &
OURS_PID=$!
# aardvark forks; the parent returns once the child serves
ip netns exec "$NS" "$AARDVARK" --config "$WORK/aardvark" -p 53 run

for _ in $(seq 50); do grep -q ready "$WORK/ours.log" && break; sleep 0.1; done
grep -q ready "$WORK/ours.log" || die "bench_server did not start: $(cat "$WORK/ours.log")"

# Both must give the same answer before we time them.
last=$((NAMES - 1))
want=$(addr "$last")
got_ours=$(ip netns exec "$NS" dig +short +time=2 +tries=1 @127.0.0.11 "ep$last")
got_aard=$(ip netns exec "$NS" dig +short +time=2 +tries=1 -b 10.89.0.2 @10.89.0.1 "ep$last")
[ "$got_ours" = "$want" ] || die "overlay-dns answered '$got_ours' for ep$last, want $want"
[ "$got_aard" = "$want" ] || die "aardvark-dns answered '$got_aard' for ep$last, want $want"

run() { # name, dnsperf args...
    local name=$1
    shift
    ip netns exec "$NS" dnsperf -d "$WORK/queries" -c "$CLIENTS" -l "$DURATION" "$@" >"$WORK/$name.out" 2>&1 ||
        die "dnsperf against $name failed: $(cat "$WORK/$name.out")"
    codes=$(sed -n 's/.*Response codes: *//p' "$WORK/$name.out")
    case "$codes" in
    "NOERROR "*"(100.00%)") ;;
    *) echo "warning: $name: not all answers NOERROR: $codes" >&2 ;;
    esac
}
qps() { awk '/Queries per second/ {print $4}' "$WORK/$1.out"; }
lat() { awk '/Average Latency/ {printf "%.1f", $4 * 1000000}' "$WORK/$1.out"; }
lost() { awk '/Queries lost/ {print $3}' "$WORK/$1.out"; }

echo "running dnsperf -c $CLIENTS -l $DURATION against each ($NAMES names)..." >&2
run overlay-dns -s 127.0.0.11
run aardvark-dns -s 10.89.0.1 -a 10.89.0.2

printf '%-14s %14s %16s %8s\n' server "queries/s" "avg latency us" lost
for s in overlay-dns aardvark-dns; do
    printf '%-14s %14s %16s %8s\n' "$s" "$(qps "$s")" "$(lat "$s")" "$(lost "$s")"
done
awk -v a="$(qps overlay-dns)" -v b="$(qps aardvark-dns)" \
    -v la="$(lat overlay-dns)" -v lb="$(lat aardvark-dns)" \
    'BEGIN { printf "ratio: %.2fx queries/s, %.2fx latency (overlay-dns / aardvark-dns)\n", a / b, la / lb }'
