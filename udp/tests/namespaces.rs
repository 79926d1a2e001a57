//! The UDP data plane between two hosts in network namespaces (root only; skipped
//! otherwise): ping both ways, the exact MTU, a 64 MiB TCP transfer (GSO chunks and
//! checksums), broadcast, an encrypted network over a stand-in secure transport, and
//! datagrams from an unknown source or on the wrong transport dropped and counted.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::{in_ns, Lab, NetSpec};
use overlay_udp::header::Header;

const PLAIN: NetSpec = NetSpec { vni: 42, subnet: "10.99.0", encrypted: false };
const SECRET: NetSpec = NetSpec { vni: 43, subnet: "10.98.0", encrypted: true };

fn ping(lab: &Lab, from: usize, vni: u32, extra: &[&str]) -> std::process::Output {
    let to = lab.ep_ip(3 - from, vni).to_string();
    let mut args = vec!["ping", "-c", "2", "-i", "0.2", "-W", "2"];
    args.extend_from_slice(extra);
    args.push(&to);
    lab.exec(&lab.ep_ns(from, vni), &args).expect("ping runs")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// An Ethernet frame carrying UDP `payload` to `dst_ip:port`, in an overlay datagram.
fn crafted(vni: u32, dst_mac: [u8; 6], dst_ip: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = Header::plain(vni).encode().to_vec();
    d.extend_from_slice(&dst_mac);
    d.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x08, 0x00]);
    let ip_at = d.len();
    let total = (20 + 8 + payload.len()) as u16;
    d.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    d[ip_at + 2..ip_at + 4].copy_from_slice(&total.to_be_bytes());
    d.extend_from_slice(&[10, 99, 0, 77]);
    d.extend_from_slice(&dst_ip.octets());
    overlay_udp::csum::finish(&mut d[ip_at..ip_at + 20], 0, 10).expect("ip header");
    d.extend_from_slice(&4000u16.to_be_bytes());
    d.extend_from_slice(&port.to_be_bytes());
    d.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    d
}

/// Sends `datagram` from namespace `ns` to host 2's engine.
fn send_from(ns: &str, datagram: &[u8]) {
    let to = SocketAddr::new(IpAddr::V4(Lab::underlay_ip(2)), overlay_udp::DEFAULT_PORT);
    in_ns(ns, || UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(datagram, to)))
        .expect("namespace")
        .expect("send");
}

fn recv_one(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

/// A deterministic pseudo-random byte stream.
fn fill(buf: &mut [u8], state: &mut u64) {
    for b in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
    }
}

/// Sends `total` bytes endpoint 1 → endpoint 2 over TCP; returns (sent, received) CRCs.
fn tcp_transfer(lab: &Lab, vni: u32, total: usize) -> (u32, u32) {
    let server_addr = SocketAddr::new(IpAddr::V4(lab.ep_ip(2, vni)), 5001);
    let listener = in_ns(&lab.ep_ns(2, vni), || TcpListener::bind(server_addr))
        .expect("namespace")
        .expect("listen");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => crc.update(&buf[..n]),
                Err(e) => panic!("server read: {e}"),
            }
        }
        crc.finalize()
    });
    let sent = in_ns(&lab.ep_ns(1, vni), || {
        let mut s =
            TcpStream::connect_timeout(&server_addr, Duration::from_secs(5)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            fill(&mut buf[..n], &mut state);
            s.write_all(&buf[..n]).expect("client write");
            crc.update(&buf[..n]);
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        crc.finalize()
    })
    .expect("namespace");
    (sent, server.join().expect("server thread"))
}

#[test]
fn two_hosts_over_udp() {
    if !common::can_run() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let lab = Lab::start(&[PLAIN, SECRET], 2).expect("lab");
    let vni = PLAIN.vni;

    // Ping both ways (the first ARP is a broadcast).
    for from in [1, 2] {
        let out = ping(&lab, from, vni, &[]);
        assert!(out.status.success(), "ping from {from}: {}", text(&out));
    }

    // The largest unfragmented packet passes; one byte more fails at the sender.
    let out = ping(&lab, 1, vni, &["-M", "do", "-s", "1422"]);
    assert!(out.status.success(), "DF ping 1422: {}", text(&out));
    let out = ping(&lab, 1, vni, &["-M", "do", "-s", "1423"]);
    assert!(!out.status.success(), "DF ping 1423 passed");
    assert!(text(&out).to_lowercase().contains("message too long"), "{}", text(&out));

    // Broadcast reaches the other host.
    let bcast_rx = in_ns(&lab.ep_ns(2, vni), || UdpSocket::bind("0.0.0.0:5002"))
        .expect("namespace")
        .expect("bind");
    bcast_rx.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    in_ns(&lab.ep_ns(1, vni), || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_broadcast(true)?;
        s.send_to(b"hello all", "10.99.0.255:5002")
    })
    .expect("namespace")
    .expect("broadcast");
    assert_eq!(recv_one(&bcast_rx).as_deref(), Some(&b"hello all"[..]));

    // 64 MiB of TCP arrive intact: GSO super-frames in fragments, checksums.
    let before = lab.engines[1].counters()[&vni];
    let (sent, got) = tcp_transfer(&lab, vni, 64 << 20);
    assert_eq!(sent, got, "TCP stream corrupted");
    let after = lab.engines[1].counters()[&vni];
    assert!(after.rx_bytes - before.rx_bytes > 64 << 20, "{after:?}");
    assert_eq!(troubles(&after), troubles(&before), "{after:?}");

    // The encrypted network works through the secure transport, in 1400-byte datagrams.
    let out = ping(&lab, 1, SECRET.vni, &["-M", "do", "-s", "1422"]);
    assert!(out.status.success(), "encrypted ping: {}", text(&out));
    let (sent, got) = tcp_transfer(&lab, SECRET.vni, 8 << 20);
    assert_eq!(sent, got, "encrypted TCP stream corrupted");

    // A valid datagram from a known host reaches the endpoint (control) ...
    let target = in_ns(&lab.ep_ns(2, vni), || UdpSocket::bind("10.99.0.2:5003"))
        .expect("namespace")
        .expect("bind");
    target.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let dg = |p: &[u8]| crafted(vni, Lab::ep_mac(2, vni), lab.ep_ip(2, vni), 5003, p);
    send_from(&lab.host_ns(1), &dg(b"from h1"));
    assert_eq!(recv_one(&target).as_deref(), Some(&b"from h1"[..]));

    // ... the same from an address that is not a host of the network is dropped.
    let before = lab.engines[1].counters()[&vni];
    send_from(&lab.outsider_ns(), &dg(b"spoofed"));
    target.set_read_timeout(Some(Duration::from_millis(700))).expect("timeout");
    assert_eq!(recv_one(&target), None, "spoofed frame reached the endpoint");
    let after = lab.engines[1].counters()[&vni];
    assert_eq!(after.dropped_unknown_source, before.dropped_unknown_source + 1);

    // An encrypted network's datagram on the plain socket is dropped, even from a peer.
    let before = lab.engines[1].counters()[&SECRET.vni];
    let secret =
        crafted(SECRET.vni, Lab::ep_mac(2, SECRET.vni), lab.ep_ip(2, SECRET.vni), 5003, b"x");
    send_from(&lab.host_ns(1), &secret);
    std::thread::sleep(Duration::from_millis(300));
    let after = lab.engines[1].counters()[&SECRET.vni];
    assert_eq!(after.dropped_wrong_transport, before.dropped_wrong_transport + 1);

    // Unknown VNIs and garbage are counted engine-wide.
    let e = lab.engines[1].engine_counters();
    send_from(&lab.host_ns(1), &Header::plain(999).encode());
    send_from(&lab.host_ns(1), b"junk");
    std::thread::sleep(Duration::from_millis(300));
    let e2 = lab.engines[1].engine_counters();
    assert_eq!(e2.dropped_unknown_vni, e.dropped_unknown_vni + 1);
    assert_eq!(e2.dropped_malformed, e.dropped_malformed + 1);

    // A TAP deleted under the engine is detached (no busy loop) and recreated by the
    // next set_networks that still lists it.
    let h2 = lab.host_ns(2);
    common::run_ok(&["ip", "-n", &h2, "link", "del", &format!("ovu-{}", SECRET.vni)]).expect("del");
    std::thread::sleep(Duration::from_millis(300));
    let cpu = cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_seconds() - cpu;
    assert!(spent < 0.2, "engine spun {spent} s of CPU in 1 s after its TAP vanished");
    let (e, all) = (lab.engines[1].clone(), lab.networks(2));
    in_ns(&h2, move || e.set_networks(all)).expect("namespace").expect("set");
    common::run_ok(&["ip", "-n", &h2, "link", "show", &format!("ovu-{}", SECRET.vni)])
        .expect("recreated");

    // Removing a network closes its queues and keeps the others working.
    let keep: Vec<_> = lab.networks(2).into_iter().filter(|n| n.vni == vni).collect();
    let e = lab.engines[1].clone();
    in_ns(&h2, move || e.set_networks(keep)).expect("namespace").expect("set");
    assert_eq!(lab.engines[1].counters().keys().copied().collect::<Vec<_>>(), vec![vni]);
    let out = ping(&lab, 1, vni, &[]);
    assert!(out.status.success(), "ping after reconfiguration: {}", text(&out));
}

/// CPU time this process has used (user + system), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime (fields 14 and 15) are the 12th and 13th after the command name.
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).expect("stat field");
    (ticks(11) + ticks(12)) / 100.0
}

/// Over an IPv6 underlay every full-size frame exceeds one datagram (the overhead is
/// 20 bytes more than IPv4's): it crosses in fragments, and still nothing IP-fragments.
#[test]
fn ipv6_underlay() {
    if !common::can_run() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let lab = Lab::start_with(&[PLAIN], 1, true).expect("lab");
    let vni = PLAIN.vni;
    for from in [1, 2] {
        let out = ping(&lab, from, vni, &["-M", "do", "-s", "1422"]);
        assert!(out.status.success(), "DF ping 1422 from {from}: {}", text(&out));
    }
    let before = lab.engines[1].counters()[&vni];
    let (sent, got) = tcp_transfer(&lab, vni, 16 << 20);
    assert_eq!(sent, got, "TCP stream over IPv6 corrupted");
    let after = lab.engines[1].counters()[&vni];
    assert_eq!(troubles(&after), troubles(&before), "{after:?}");
}

/// Counters that must not move while traffic flows normally. (Writes to a TAP fail
/// while the agent has not brought it up yet, so the lab start may count errors.)
fn troubles(c: &overlay_udp::VniCounters) -> u64 {
    c.dropped_malformed + c.dropped_unknown_source + c.dropped_reassembly + c.errors
}
