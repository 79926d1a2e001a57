//! Addresses that come and go across hosts, end to end (three hosts, real processes,
//! real traffic; needs root and `cargo build --workspace --bins`; skipped without root):
//!
//! * serial allocation: a freed address waits while unused ones remain;
//! * an address freed and given again (`network disconnect`, then `--ip`), and an
//!   endpoint removed and created again on another host with the same `--ip`: peers
//!   that talked to the old one reach the new one at once — no stale ARP or FDB entry;
//! * `network disconnect` from an endpoint's last network: it stays, with loopback only
//!   (and its DNS server), until connected again or removed;
//! * multicast and broadcast reach endpoints on other hosts, and only in their network.
//!
//! "At once" without timing luck: the peers' ARP timers are stretched (a new request at
//! most every 30 s, reachable entries trusted for a minute), so a stale cache could not
//! heal within the bounded waits used here; only right entries pass.
//!
//! Runs once per data plane (kernel VXLAN, `--encap udp`), each in its own lab.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use overlay_tests::lab::{in_netns, run_cases, wait_for, Case, Lab};

const T: Duration = Duration::from_secs(20);
/// Bound for "reachable at once": the agents' reaction time, far below what the
/// stretched ARP timers would need to heal a stale entry.
const AT_ONCE: Duration = Duration::from_secs(8);
const NET: &str = "addrs";
const OTHER: &str = "elsewhere";

thread_local! {
    static UDP: Cell<bool> = const { Cell::new(false) };
}

fn create_network(lab: &Lab, name: &str, subnet: &str) -> Result<()> {
    let mut args = vec!["network", "create", name, "--subnet", subnet];
    if UDP.with(Cell::get) {
        args.extend_from_slice(&["--encap", "udp"]);
    }
    lab.ctl_ok(&args).map(drop)
}

/// Makes `ns`'s ARP slow to heal: one request per resolution, 30 s apart, and reachable
/// entries trusted for a minute.
fn stretch_arp(lab: &Lab, ns: &str) -> Result<()> {
    for kv in [
        "net.ipv4.neigh.eth0.retrans_time_ms=30000",
        "net.ipv4.neigh.eth0.mcast_solicit=1",
        "net.ipv4.neigh.eth0.ucast_solicit=1",
        "net.ipv4.neigh.eth0.base_reachable_time_ms=60000",
    ] {
        let o = lab.exec(ns, &["sysctl", "-q", "-w", kv]);
        ensure!(o.status.success(), "{ns}: sysctl {kv}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// The MAC `ns` has cached for `ip`, if any.
fn cached_mac(lab: &Lab, ns: &str, ip: &str) -> Option<String> {
    let v = lab.ip_json(ns, &["neigh", "show", ip]).ok()?;
    v.as_array()?.first()?["lladdr"].as_str().map(str::to_string)
}

/// p1 (h1) and p3 (h3), peers with stretched ARP timers, in network `addrs` (a /28, so
/// allocation wraps soon) and `elsewhere` (for isolation).
fn setup(lab: &mut Lab) -> Result<()> {
    create_network(lab, NET, "10.0.9.0/28")?;
    create_network(lab, OTHER, "10.0.19.0/28")?;
    for (short, host) in [("p1", 1), ("p3", 3)] {
        let p = lab.endpoint(short, host, NET, &[])?;
        stretch_arp(lab, &p)?;
    }
    Ok(())
}

/// Serial allocation, then an address freed by `network disconnect` (of the endpoint's
/// last network) and given again with `--ip` on another host: the peer that talked to
/// the old holder reaches the new one at once. The disconnected endpoint keeps its
/// namespace with loopback only, and its DNS server, until connected again.
fn freed_and_reused(lab: &mut Lab) -> Result<()> {
    let p1 = lab.ep("p1");
    let x1 = lab.endpoint("x1", 2, NET, &[])?;
    let (x1_ip, x1_mac) = lab.attachment(&x1, NET)?;
    lab.ping_ok(&p1, &x1_ip, T)?;
    ensure!(cached_mac(lab, &p1, &x1_ip).as_deref() == Some(x1_mac.as_str()), "p1 caches x1");

    lab.ctl_ok(&["network", "disconnect", NET, &x1])?;
    let v = lab.ctl_json(&["endpoint", "inspect", &x1])?;
    ensure!(v["attachments"].as_array().is_some_and(|a| a.is_empty()), "x1 attachments: {v}");
    wait_for(T, "x1 to keep only loopback", || {
        let links = lab.ip_json(&x1, &["link", "show"]).ok()?;
        let names: Vec<&str> =
            links.as_array()?.iter().filter_map(|l| l["ifname"].as_str()).collect();
        (names == ["lo"]).then_some(())
    })?;
    // Its DNS server still answers, with no address for p1 once the pass that removed
    // eth0 has also published the records: NXDOMAIN while this host still knows p1's
    // network, REFUSED once it no longer carries it (an unknown name, which an endpoint
    // with no network may not forward).
    let mut last = String::new();
    wait_for(AT_ONCE, "dns inside x1 with no network to give no address for p1", || {
        let o = lab.exec(&x1, &["dig", "+time=1", "+tries=2", "@127.0.0.11", &p1]);
        last = String::from_utf8_lossy(&o.stdout).into_owned();
        (last.contains("status: NXDOMAIN") || last.contains("status: REFUSED")).then_some(())
    })
    .with_context(|| format!("last answer: {last}"))?;

    // Serial: the next endpoint does not get the freed address.
    let x2 = lab.endpoint("x2", 3, NET, &[])?;
    let (x2_ip, _) = lab.attachment(&x2, NET)?;
    ensure!(x2_ip != x1_ip, "the freed {x1_ip} was handed out again at once");
    // Asked for by name, on another host: reachable at once from p1, whose cache still
    // holds the old holder's entry (the MAC follows the address: it is the same).
    let x3 = lab.endpoint("x3", 3, NET, &["--ip", &x1_ip])?;
    let (_, x3_mac) = lab.attachment(&x3, NET)?;
    ensure!(x3_mac == x1_mac, "the MAC follows the address: {x3_mac} vs {x1_mac}");
    lab.ping_ok(&p1, &x1_ip, AT_ONCE)?;
    ensure!(cached_mac(lab, &p1, &x1_ip) == Some(x3_mac), "p1's cache for {x1_ip}");

    // Connected again: eth0 comes back with a fresh address; then removed.
    lab.ctl_ok(&["network", "connect", NET, &x1])?;
    let (again, _) = lab.attachment(&x1, NET)?;
    ensure!(again != x1_ip, "x1 got its old address back while others were free");
    lab.wait_addr(&x1, &again)?;
    lab.ping_ok(&p1, &again, T)?;
    for e in [&x1, &x2, &x3] {
        lab.ctl_ok(&["endpoint", "rm", e])?;
    }
    Ok(())
}

/// An endpoint removed and created again on another host with the same `--ip`:
/// reachable at once from a peer on a third host and from one on its new host (whose
/// bridge had learned its MAC behind the uplink).
fn moved_to_another_host(lab: &mut Lab) -> Result<()> {
    let (p1, p3) = (lab.ep("p1"), lab.ep("p3"));
    let ip = "10.0.9.12";
    let m = lab.endpoint("m", 2, NET, &["--ip", ip])?;
    lab.ping_ok(&p1, ip, T)?;
    lab.ping_ok(&p3, ip, T)?;
    lab.ctl_ok(&["endpoint", "rm", &m])?;
    wait_for(T, "m to be gone from h2", || {
        (!std::path::Path::new(&format!("/var/run/netns/{m}")).exists()).then_some(())
    })?;
    let m2 = lab.endpoint("m2", 3, NET, &["--ip", ip])?;
    lab.ping_ok(&p1, ip, AT_ONCE).context("from a third host")?;
    lab.ping_ok(&p3, ip, AT_ONCE).context("from its new host")?;
    lab.ctl_ok(&["endpoint", "rm", &m2])?;
    Ok(())
}

/// A UDP socket in `ns` bound to 0.0.0.0:`port`, reading with a short timeout.
fn listener(ns: &str, port: u16) -> Result<UdpSocket> {
    let s = in_netns(ns, || UdpSocket::bind(("0.0.0.0", port)))??;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s)
}

/// Sends `payload` from `ns` to `to` every 200 ms until each of `receivers` got it (true)
/// or `timeout` passes; returns which ones got it.
fn deliver(
    ns: &str,
    to: SocketAddr,
    broadcast: bool,
    receivers: &[&UdpSocket],
    timeout: Duration,
) -> Result<Vec<bool>> {
    let sender = in_netns(ns, || UdpSocket::bind("0.0.0.0:0"))??;
    sender.set_broadcast(broadcast)?;
    let payload = b"overlay-addresses-test";
    let mut got = vec![false; receivers.len()];
    let start = Instant::now();
    while start.elapsed() < timeout && got.iter().any(|g| !g) {
        sender.send_to(payload, to)?;
        for (i, r) in receivers.iter().enumerate() {
            let mut buf = [0u8; 64];
            while let Ok((n, _)) = r.recv_from(&mut buf) {
                got[i] |= &buf[..n] == payload;
            }
        }
    }
    Ok(got)
}

/// A multicast group joined on h2 and h3 receives what h1 sends to it; a broadcast
/// reaches every endpoint of the network on every host. Neither reaches an endpoint
/// of another network that listens the same way.
fn multicast_and_broadcast(lab: &mut Lab) -> Result<()> {
    let p1 = lab.ep("p1");
    let r1 = lab.endpoint("r1", 1, NET, &[])?;
    let r2 = lab.endpoint("r2", 2, NET, &[])?;
    let r3 = lab.endpoint("r3", 3, NET, &[])?;
    let o2 = lab.endpoint("o2", 2, OTHER, &[])?;
    let group = Ipv4Addr::new(239, 255, 7, 1);
    let join = |ns: &str, net: &str, port: u16| -> Result<UdpSocket> {
        let s = listener(ns, port)?;
        let (ip, _) = lab.attachment(ns, net)?;
        s.join_multicast_v4(&group, &ip.parse()?)?;
        Ok(s)
    };
    let (m2, m3, mo) = (join(&r2, NET, 5000)?, join(&r3, NET, 5000)?, join(&o2, OTHER, 5000)?);
    let got = deliver(&p1, SocketAddr::from((group, 5000)), false, &[&m2, &m3], T)?;
    ensure!(got == [true, true], "multicast from h1 to the group on h2, h3: {got:?}");
    let got = deliver(&p1, SocketAddr::from((group, 5000)), false, &[&mo], Duration::from_secs(1))?;
    ensure!(got == [false], "multicast crossed into network {OTHER}");

    let (b1, b2, b3, bo) =
        (listener(&r1, 5001)?, listener(&r2, 5001)?, listener(&r3, 5001)?, listener(&o2, 5001)?);
    let subnet_broadcast = SocketAddr::from(([10, 0, 9, 15], 5001));
    let got = deliver(&p1, subnet_broadcast, true, &[&b1, &b2, &b3], T)?;
    ensure!(got == [true, true, true], "broadcast to r1 (same host), r2, r3: {got:?}");
    let got = deliver(&p1, subnet_broadcast, true, &[&bo], Duration::from_secs(1))?;
    ensure!(got == [false], "broadcast crossed into network {OTHER}");
    for e in [&r1, &r2, &r3, &o2] {
        lab.ctl_ok(&["endpoint", "rm", e])?;
    }
    Ok(())
}

const CASES: &[(&str, Case)] = &[
    ("setup", setup),
    ("freed_and_reused", freed_and_reused),
    ("moved_to_another_host", moved_to_another_host),
    ("multicast_and_broadcast", multicast_and_broadcast),
];

#[test]
fn addresses_vxlan() {
    UDP.with(|u| u.set(false));
    run_cases(CASES);
}

#[test]
fn addresses_udp() {
    UDP.with(|u| u.set(true));
    run_cases(CASES);
}
