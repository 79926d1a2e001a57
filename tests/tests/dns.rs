//! The embedded DNS at 127.0.0.11, checked with real clients (`dig`, `getent`) inside
//! endpoint namespaces of a three-host lab. Needs root and
//! `cargo build --workspace --bins`; skipped without root.
//!
//! Forwarding: each agent reads the lab's resolv.conf, which names the lab's "outside"
//! address ([`OUTSIDE_IP`], on the underlay switch); the forwarding cases run a fake
//! upstream resolver there ([`FakeUpstream`]), so nothing leaves the lab.
//!
//! The cases share one lab and run in order (later cases use endpoints made by the
//! first); each is isolated by `catch_unwind`, every wait is bounded, and the test fails
//! at the end listing every case that failed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use overlay_tests::lab::{in_netns, run_cases, wait_for, Case, Lab, OUTSIDE_IP};

const T: Duration = Duration::from_secs(20);

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `dig @127.0.0.11 EXTRA...` inside `ns`; the full output.
fn dig(lab: &Lab, ns: &str, extra: &[&str]) -> String {
    let mut args = vec!["dig", "+time=1", "+tries=2", "@127.0.0.11"];
    args.extend_from_slice(extra);
    stdout(&lab.exec(ns, &args))
}

/// `dig +short` answers, one per line.
fn short(lab: &Lab, ns: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["+short"];
    args.extend_from_slice(extra);
    dig(lab, ns, &args).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

/// The `status:` of a full dig output (`NOERROR`, `NXDOMAIN`, …).
fn status(out: &str) -> Option<String> {
    let rest = out.split("status: ").nth(1)?;
    Some(rest.split(',').next()?.trim().to_string())
}

/// The `ANSWER: N` count of a full dig output.
fn answer_count(out: &str) -> Option<u32> {
    let rest = out.split("ANSWER: ").nth(1)?;
    rest.split(',').next()?.trim().parse().ok()
}

fn ip_in(lab: &Lab, name: &str, network: &str) -> Result<String> {
    Ok(lab.attachment(name, network)?.0)
}

/// Networks `dna` (a1@h1, a2@h2 aliases web+pool, a3@h3 alias pool, gw@h3), `dnb`
/// (b1@h2, gw), `dnc` (c1@h1, isolated); `dna` routes `dnb`'s subnet via gw.
fn setup(lab: &mut Lab) -> Result<()> {
    lab.ctl_ok(&["network", "create", "dna", "--subnet", "10.0.11.0/24"])?;
    lab.ctl_ok(&["network", "create", "dnb", "--subnet", "10.0.12.0/24"])?;
    lab.ctl_ok(&["network", "create", "dnc", "--subnet", "10.0.13.0/24"])?;
    let a1 = lab.endpoint("a1", 1, "dna", &[])?;
    lab.endpoint("a2", 2, "dna", &["--alias", "web", "--alias", "pool"])?;
    lab.endpoint("a3", 3, "dna", &["--alias", "pool"])?;
    lab.endpoint("b1", 2, "dnb", &[])?;
    let gw = lab.endpoint("gw", 3, "dna", &[])?;
    lab.ctl_ok(&["network", "connect", "dnb", &gw])?;
    lab.ctl_ok(&["route", "add", "dna", "10.0.12.0/24", "--via", &gw])?;
    lab.endpoint("c1", 1, "dnc", &[])?;
    let a2 = lab.ep("a2");
    let a2_ip = ip_in(lab, &a2, "dna")?;
    lab.ping_ok(&a1, &a2_ip, T)?;
    wait_for(T, "a1's dns server to answer for a2", || {
        (short(lab, &a1, &[&a2]) == [a2_ip.clone()]).then_some(())
    })?;
    Ok(())
}

/// Name (UDP and TCP), alias and NAME.NETWORK across hosts, and through getent (libc
/// reading the endpoint's resolv.conf).
fn name_alias_network(lab: &mut Lab) -> Result<()> {
    let a1 = lab.ep("a1");
    let a2 = lab.ep("a2");
    let a2_ip = ip_in(lab, &a2, "dna")?;
    let want = vec![a2_ip.clone()];
    ensure!(short(lab, &a1, &[&a2]) == want, "a2 over udp");
    ensure!(short(lab, &a1, &["+tcp", &a2]) == want, "a2 over tcp");
    ensure!(short(lab, &a1, &["web"]) == want, "alias web");
    ensure!(short(lab, &a1, &["WEB."]) == want, "alias, other case, trailing dot");
    ensure!(short(lab, &a1, &[&format!("{a2}.dna")]) == want, "NAME.NETWORK");
    ensure!(short(lab, &a1, &["+tcp", "web.dna"]) == want, "ALIAS.NETWORK over tcp");
    let out = dig(lab, &a1, &[&a2]);
    ensure!(out.contains("flags: qr aa"), "local answers are authoritative: {out}");
    // libc, through /etc/netns/a1/resolv.conf (bind-mounted by `ip netns exec`).
    let g = stdout(&lab.exec(&a1, &["getent", "hosts", &a2]));
    ensure!(g.split_whitespace().next() == Some(a2_ip.as_str()), "getent hosts a2: {g:?}");
    let g = stdout(&lab.exec(&a1, &["getent", "ahostsv4", "web"]));
    ensure!(g.contains(&a2_ip), "getent ahostsv4 web: {g:?}");
    // And the other way round, from host 2 to host 1.
    let a1_ip = ip_in(lab, &a1, "dna")?;
    ensure!(short(lab, &a2, &[&a1]) == [a1_ip], "a2 resolves a1");
    Ok(())
}

/// An alias held by two endpoints returns both, and the first answer rotates.
fn shared_alias(lab: &mut Lab) -> Result<()> {
    let a1 = lab.ep("a1");
    let want: BTreeSet<String> =
        [ip_in(lab, &lab.ep("a2"), "dna")?, ip_in(lab, &lab.ep("a3"), "dna")?].into();
    let mut firsts = BTreeSet::new();
    for _ in 0..6 {
        let got = short(lab, &a1, &["pool"]);
        let set: BTreeSet<String> = got.iter().cloned().collect();
        ensure!(set == want && got.len() == 2, "pool: {got:?}, want {want:?}");
        firsts.insert(got[0].clone());
    }
    ensure!(firsts.len() == 2, "first answer never rotated over 6 queries: {firsts:?}");
    Ok(())
}

/// PTR for endpoint addresses: NAME.NETWORK.
fn ptr(lab: &mut Lab) -> Result<()> {
    let a1 = lab.ep("a1");
    let a2 = lab.ep("a2");
    let a2_ip = ip_in(lab, &a2, "dna")?;
    let got = short(lab, &a1, &["-x", &a2_ip]);
    ensure!(got == [format!("{a2}.dna.")], "PTR {a2_ip}: {got:?}");
    let got = short(lab, &a1, &["+tcp", "-x", &a2_ip]);
    ensure!(got == [format!("{a2}.dna.")], "PTR {a2_ip} over tcp: {got:?}");
    let g = stdout(&lab.exec(&a1, &["getent", "hosts", &a2_ip]));
    ensure!(g.contains(&format!("{a2}.dna")), "getent hosts {a2_ip}: {g:?}");
    // Reverse of an unused address inside an overlay subnet: ours, so NXDOMAIN.
    let out = dig(lab, &a1, &["-x", "10.0.11.250"]);
    ensure!(status(&out).as_deref() == Some("NXDOMAIN"), "PTR unused overlay address: {out}");
    Ok(())
}

/// AAAA (and MX) for an existing name: NOERROR with no answers.
fn nodata(lab: &mut Lab) -> Result<()> {
    let a1 = lab.ep("a1");
    let a2 = lab.ep("a2");
    for (qtype, name) in [("AAAA", a2.clone()), ("AAAA", "web".into()), ("MX", a2.clone())] {
        let out = dig(lab, &a1, &[&name, qtype]);
        ensure!(
            status(&out).as_deref() == Some("NOERROR") && answer_count(&out) == Some(0),
            "{qtype} {name}: {out}"
        );
    }
    Ok(())
}

/// Names of endpoints on networks the asker is not on (and cannot route to): NXDOMAIN.
fn isolation(lab: &mut Lab) -> Result<()> {
    let a1 = lab.ep("a1");
    let c1 = lab.ep("c1");
    let a2 = lab.ep("a2");
    for (from, name) in [
        (a1.clone(), c1.clone()),
        (a1.clone(), format!("{c1}.dnc")),
        (c1.clone(), a2.clone()),
        (c1.clone(), "web".into()),
        (c1.clone(), format!("{a2}.dna")),
        // b1 is reachable from dna only by NAME.NETWORK (through the route), not bare.
        (a1.clone(), lab.ep("b1")),
        // a2's host carries no endpoint of dnc, so it knows c1 by name only (issue 14).
        (a2.clone(), c1.clone()),
        (a2.clone(), format!("{c1}.dnc")),
    ] {
        let out = dig(lab, &from, &[&name]);
        ensure!(status(&out).as_deref() == Some("NXDOMAIN"), "{from} asking {name}: {out}");
    }
    // Nor does the reverse of a1's address leak to c1.
    let out = dig(lab, &c1, &["-x", &ip_in(lab, &a1, "dna")?]);
    ensure!(status(&out).as_deref() == Some("NXDOMAIN"), "c1 PTR of a1: {out}");
    Ok(())
}

/// Across the gateway route (dna -> dnb only): `b1.dnb` resolves from dna (and its PTR
/// too); dnb has no route back, so `a1.dna` stays hidden from b1.
fn across_gateway(lab: &mut Lab) -> Result<()> {
    let a1 = lab.ep("a1");
    let b1 = lab.ep("b1");
    let b1_ip = ip_in(lab, &b1, "dnb")?;
    // (No ping: dnb has no route back, so replies would not return; DNS needs none.)
    let qualified = format!("{b1}.dnb");
    wait_for(Duration::from_secs(5), "b1.dnb to resolve from a1", || {
        (short(lab, &a1, &[&qualified]) == [b1_ip.clone()]).then_some(())
    })?;
    let got = short(lab, &a1, &["-x", &b1_ip]);
    ensure!(got == [format!("{b1}.dnb.")], "PTR of b1 from a1: {got:?}");
    let out = dig(lab, &b1, &[&format!("{a1}.dna")]);
    ensure!(status(&out).as_deref() == Some("NXDOMAIN"), "a1.dna from b1 (no route): {out}");
    Ok(())
}

/// A new endpoint resolves within about a second of being pingable; once removed, its
/// address leaves the shared alias and its PTR is NXDOMAIN (all names asked stay ours,
/// so nothing is forwarded).
fn lifecycle(lab: &mut Lab) -> Result<()> {
    let a1 = lab.ep("a1");
    let n1 = lab.endpoint("n1", 3, "dna", &["--alias", "pool"])?;
    let n1_ip = ip_in(lab, &n1, "dna")?;
    lab.ping_ok(&a1, &n1_ip, T)?;
    let pingable = Instant::now();
    wait_for(Duration::from_millis(1500), "n1 to resolve after being pingable", || {
        (short(lab, &a1, &["+tries=1", &n1]) == [n1_ip.clone()]).then_some(())
    })
    .with_context(|| format!("{:?} after ping", pingable.elapsed()))?;
    eprintln!("n1 resolved {:?} after it was pingable", pingable.elapsed());
    wait_for(Duration::from_secs(2), "pool to include n1", || {
        short(lab, &a1, &["pool"]).contains(&n1_ip).then_some(())
    })?;
    lab.ctl_ok(&["endpoint", "rm", &n1])?;
    let removed = Instant::now();
    wait_for(Duration::from_secs(5), "n1 to leave pool and its PTR", || {
        let pool = short(lab, &a1, &["pool"]);
        let out = dig(lab, &a1, &["-x", &n1_ip]);
        (pool.len() == 2 && !pool.contains(&n1_ip) && status(&out).as_deref() == Some("NXDOMAIN"))
            .then_some(())
    })?;
    eprintln!("n1 stopped resolving {:?} after endpoint rm", removed.elapsed());
    Ok(())
}

/// Garbage over UDP and TCP does not kill the server.
fn malformed(lab: &mut Lab) -> Result<()> {
    let a1 = lab.ep("a1");
    let a2 = lab.ep("a2");
    let a2_ip = ip_in(lab, &a2, "dna")?;
    // Deterministic pseudo-random bytes (xorshift), plus some pointed shapes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut packets: Vec<Vec<u8>> = (0..20).map(|i| rnd(1 + i * 37 % 600)).collect();
    packets.push(vec![]);
    packets.push(vec![0x12]);
    // Header claiming one question, none present.
    packets.push(vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    // A compression pointer to itself.
    packets.push(vec![0xab, 0xce, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1]);
    // A label running past the end.
    packets.push(vec![0xab, 0xcf, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'a', b'b']);
    // A response (QR set) rather than a query.
    packets.push(vec![0xab, 0xd0, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0]);
    // 64 KiB of junk (the largest UDP payload).
    packets.push(rnd(65_000));
    let log_path = lab.dir.join("agent1.log");
    let log_len = std::fs::metadata(&log_path).map(|m| m.len() as usize).unwrap_or(0);
    in_netns(&a1, || -> Result<()> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        for p in &packets {
            // Sending may fail for sizes the loopback refuses; that is fine.
            let _ = s.send_to(p, "127.0.0.11:53");
        }
        for p in packets.iter().take(5) {
            if let Ok(mut c) =
                TcpStream::connect_timeout(&"127.0.0.11:53".parse()?, Duration::from_secs(1))
            {
                // A length prefix promising more than is sent, then close.
                let mut framed = vec![0xff, 0xff];
                framed.extend_from_slice(p);
                let _ = c.write_all(&framed);
            }
        }
        // A TCP connection left open and silent must not block others.
        let idle = TcpStream::connect_timeout(&"127.0.0.11:53".parse()?, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(200));
        drop(idle);
        Ok(())
    })??;
    // One try each: a server that died and was restarted by the next reconcile pass
    // would not count.
    ensure!(short(lab, &a1, &["+tries=1", &a2]) == [a2_ip.clone()], "udp answer after garbage");
    ensure!(short(lab, &a1, &["+tries=1", "+tcp", &a2]) == [a2_ip], "tcp answer after garbage");
    let log = std::fs::read(&log_path).unwrap_or_default();
    let log = String::from_utf8_lossy(log.get(log_len..).unwrap_or_default());
    let restarted = log.lines().any(|l| {
        l.contains(a1.as_str())
            && (l.contains("dns server failed")
                || l.contains("dns server stopped")
                || l.contains("dns server listening"))
    });
    ensure!(!restarted, "a1's dns server died or restarted after garbage:\n{log}");
    Ok(())
}

/// The name the fake upstream knows, and its address (answer data only: nothing is ever
/// sent to it).
const UPSTREAM_NAME: &str = "upstream.example";
const UPSTREAM_ADDR: [u8; 4] = [203, 0, 113, 7];

/// What the fake upstream saw and how it behaves.
#[derive(Default)]
struct Upstream {
    stop: AtomicBool,
    /// Swallow queries instead of answering (an unreachable or overloaded resolver).
    silent: AtomicBool,
    /// `(source, lower-case name)` of every query received, UDP and TCP.
    queries: Mutex<Vec<(SocketAddr, String)>>,
}

/// A stand-in for the hosts' resolver on [`OUTSIDE_IP`]:53 (UDP and TCP) in the switch
/// namespace: `upstream.example.` has A 203.0.113.7 (and no other type), every other
/// name is NXDOMAIN. Stops, closing its sockets, when dropped.
struct FakeUpstream {
    state: Arc<Upstream>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeUpstream {
    fn start(lab: &Lab) -> Result<FakeUpstream> {
        let addr: SocketAddr = format!("{OUTSIDE_IP}:53").parse()?;
        let (udp, tcp) = in_netns(&lab.switch_ns(), || -> std::io::Result<_> {
            Ok((UdpSocket::bind(addr)?, TcpListener::bind(addr)?))
        })??;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        tcp.set_nonblocking(true)?;
        let state = Arc::new(Upstream::default());
        let (s1, s2) = (state.clone(), state.clone());
        let threads = vec![
            std::thread::spawn(move || serve_udp(&udp, &s1)),
            std::thread::spawn(move || serve_tcp(&tcp, &s2)),
        ];
        Ok(FakeUpstream { state, threads })
    }

    fn queries(&self) -> Vec<(SocketAddr, String)> {
        self.state.queries.lock().map(|q| q.clone()).unwrap_or_default()
    }

    fn set_silent(&self, silent: bool) {
        self.state.silent.store(silent, Ordering::SeqCst);
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Upstream {
    /// Records `query` from `from`; the response to send, if any.
    fn handle(&self, from: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
        let (name, qtype, question_end) = parse_question(query)?;
        if let Ok(mut q) = self.queries.lock() {
            q.push((from, name.clone()));
        }
        if self.silent.load(Ordering::SeqCst) {
            return None;
        }
        let known = name == format!("{UPSTREAM_NAME}.");
        let answers = u16::from(known && qtype == 1);
        let rcode = if known { 0 } else { 3 };
        let mut out = Vec::with_capacity(question_end + 16);
        out.extend_from_slice(&query[..2]);
        // QR, opcode QUERY, RD echoed; RA; no EDNS in the answer (ARCOUNT 0).
        out.extend_from_slice(&[0x80 | (query[2] & 0x01), 0x80 | rcode, 0, 1, 0, answers as u8]);
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&query[12..question_end]);
        if answers == 1 {
            // Pointer to the question name, A, IN, TTL 60, 4 bytes.
            out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            out.extend_from_slice(&UPSTREAM_ADDR);
        }
        Some(out)
    }
}

/// `(name with a trailing dot, qtype, end of the question)` of a one-question query.
fn parse_question(p: &[u8]) -> Option<(String, u16, usize)> {
    if p.len() < 12 || p[2] & 0x80 != 0 || p[4..6] != [0, 1] {
        return None;
    }
    let mut name = String::new();
    let mut at = 12;
    loop {
        let len = usize::from(*p.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = p.get(at..at + len)?;
        name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
        name.push('.');
        at += len;
    }
    let qtype = u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]);
    p.get(at + 2..at + 4)?;
    Some((name, qtype, at + 4))
}

fn serve_udp(sock: &UdpSocket, state: &Upstream) {
    let mut buf = [0u8; 4096];
    while !state.stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
        if let Some(resp) = state.handle(from, &buf[..n]) {
            let _ = sock.send_to(&resp, from);
        }
    }
}

fn serve_tcp(listener: &TcpListener, state: &Upstream) {
    while !state.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, from)) => {
                let _ = serve_tcp_conn(conn, from, state);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return,
        }
    }
}

/// One length-prefixed query, one response.
fn serve_tcp_conn(mut conn: TcpStream, from: SocketAddr, state: &Upstream) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)?;
    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut query)?;
    if let Some(resp) = state.handle(from, &query) {
        let mut framed = (resp.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&resp);
        conn.write_all(&framed)?;
    }
    Ok(())
}

/// The header flags of a full dig output (`qr rd ra`, …).
fn flags(out: &str) -> Vec<String> {
    let rest = out.split("flags: ").nth(1).unwrap_or("");
    rest.split(';').next().unwrap_or("").split_whitespace().map(str::to_string).collect()
}

/// Names that are not ours go to the resolver of the agent's resolv.conf, from the
/// host's underlay address, over UDP and TCP; its answers (and its NXDOMAIN) come back
/// unchanged and not authoritative; libc in the endpoint gets them too.
fn forward(lab: &mut Lab) -> Result<()> {
    let up = FakeUpstream::start(lab)?;
    let want = vec![std::net::Ipv4Addr::from(UPSTREAM_ADDR).to_string()];
    let a1 = lab.ep("a1");
    let a2 = lab.ep("a2");
    // The first forwarded answer is waited for (bounded): under a loaded CI machine it
    // was seen to miss dig's 2 s budget once; every later query must answer at once.
    wait_for(Duration::from_secs(10), "the first forwarded answer", || {
        (short(lab, &a1, &[UPSTREAM_NAME]) == want).then_some(())
    })?;
    ensure!(short(lab, &a1, &[UPSTREAM_NAME]) == want, "{UPSTREAM_NAME} over udp from a1");
    ensure!(short(lab, &a1, &["+tcp", UPSTREAM_NAME]) == want, "{UPSTREAM_NAME} over tcp");
    ensure!(short(lab, &a2, &["UPSTREAM.example."]) == want, "{UPSTREAM_NAME} from a2 (h2)");
    let out = dig(lab, &a1, &[UPSTREAM_NAME]);
    ensure!(status(&out).as_deref() == Some("NOERROR"), "status: {out}");
    ensure!(!flags(&out).contains(&"aa".to_string()), "forwarded answers are not ours: {out}");
    let out = dig(lab, &a1, &["nosuch.example"]);
    ensure!(status(&out).as_deref() == Some("NXDOMAIN"), "upstream NXDOMAIN passed on: {out}");
    let out = dig(lab, &a1, &[UPSTREAM_NAME, "AAAA"]);
    ensure!(
        status(&out).as_deref() == Some("NOERROR") && answer_count(&out) == Some(0),
        "upstream NODATA passed on: {out}"
    );
    let g = stdout(&lab.exec(&a1, &["getent", "hosts", UPSTREAM_NAME]));
    ensure!(g.split_whitespace().next() == Some(want[0].as_str()), "getent hosts: {g:?}");
    // Sent from the asker's host namespace (its underlay address), not from the endpoint.
    let sources: BTreeSet<IpAddr> = up.queries().iter().map(|(from, _)| from.ip()).collect();
    let hosts: BTreeSet<IpAddr> =
        [Lab::host_ip(1).parse()?, Lab::host_ip(2).parse()?].into_iter().collect();
    ensure!(sources == hosts, "queries came from {sources:?}, want {hosts:?}");
    Ok(())
}

/// The overlay's own names — found or NXDOMAIN, forward and reverse — are answered
/// locally: the upstream never hears of them. An unknown single label is forwarded.
fn local_not_forwarded(lab: &mut Lab) -> Result<()> {
    let up = FakeUpstream::start(lab)?;
    let a1 = lab.ep("a1");
    let a2 = lab.ep("a2");
    let c1 = lab.ep("c1");
    let a2_ip = ip_in(lab, &a2, "dna")?;
    ensure!(short(lab, &a1, &[&a2]) == [a2_ip.clone()], "a2");
    ensure!(short(lab, &a1, &["+tcp", "web.dna"]) == [a2_ip.clone()], "web.dna over tcp");
    for (name, qtype, want) in [
        (a2.clone(), "AAAA", "NOERROR"),
        (c1.clone(), "A", "NXDOMAIN"),
        (format!("{c1}.dnc"), "A", "NXDOMAIN"),
        (lab.ep("b1"), "A", "NXDOMAIN"),
    ] {
        let out = dig(lab, &a1, &[&name, qtype]);
        ensure!(status(&out).as_deref() == Some(want), "{qtype} {name}: {out}");
        ensure!(flags(&out).contains(&"aa".to_string()), "{name} answered by us: {out}");
    }
    // Asked on a host that knows c1 by name only (it carries no endpoint of dnc).
    for name in [c1.clone(), format!("{c1}.dnc")] {
        let out = dig(lab, &a2, &[&name]);
        ensure!(status(&out).as_deref() == Some("NXDOMAIN"), "{name} from a2: {out}");
        ensure!(flags(&out).contains(&"aa".to_string()), "{name} from a2 answered by us: {out}");
    }
    ensure!(short(lab, &a1, &["-x", &a2_ip]) == [format!("{a2}.dna.")], "PTR a2");
    let out = dig(lab, &a1, &["-x", "10.0.11.250"]);
    ensure!(status(&out).as_deref() == Some("NXDOMAIN"), "PTR of an unused address: {out}");
    let g = stdout(&lab.exec(&a1, &["getent", "hosts", &a2]));
    ensure!(g.split_whitespace().next() == Some(a2_ip.as_str()), "getent hosts a2: {g:?}");
    let q = up.queries();
    ensure!(q.is_empty(), "the overlay's own names reached the upstream: {q:?}");
    // Contrast: an unknown single label is not ours, so it is forwarded.
    let out = dig(lab, &a1, &["nosuchlabel"]);
    ensure!(status(&out).as_deref() == Some("NXDOMAIN"), "nosuchlabel: {out}");
    let q = up.queries();
    ensure!(q.iter().all(|(_, n)| n == "nosuchlabel.") && !q.is_empty(), "forwarded: {q:?}");
    Ok(())
}

/// `dig` with one try and a patient timeout: the status and how long the answer took.
fn timed_dig(lab: &Lab, ns: &str, name: &str) -> (Option<String>, Duration, String) {
    let start = Instant::now();
    let out = stdout(&lab.exec(ns, &["dig", "+time=5", "+tries=1", "@127.0.0.11", name]));
    (status(&out), start.elapsed(), out)
}

/// An upstream that swallows queries, or none at all: the client gets SERVFAIL within
/// the 2 s budget, and local names keep resolving meanwhile.
fn upstream_down(lab: &mut Lab) -> Result<()> {
    let a1 = lab.ep("a1");
    let a2 = lab.ep("a2");
    let a2_ip = ip_in(lab, &a2, "dna")?;
    let up = FakeUpstream::start(lab)?;
    up.set_silent(true);
    let (st, took, out) = timed_dig(lab, &a1, UPSTREAM_NAME);
    eprintln!("silent upstream: {st:?} after {took:?}");
    ensure!(st.as_deref() == Some("SERVFAIL"), "silent upstream: {out}");
    ensure!(took < Duration::from_millis(2500), "SERVFAIL took {took:?}");
    ensure!(!up.queries().is_empty(), "the query never reached the silent upstream");
    let start = Instant::now();
    ensure!(short(lab, &a1, &["+tries=1", &a2]) == [a2_ip], "a2 while the upstream is silent");
    ensure!(
        start.elapsed() < Duration::from_millis(500),
        "local answer took {:?}",
        start.elapsed()
    );
    drop(up);
    let (st, took, out) = timed_dig(lab, &a1, UPSTREAM_NAME);
    eprintln!("no upstream: {st:?} after {took:?}");
    ensure!(st.as_deref() == Some("SERVFAIL"), "no upstream: {out}");
    ensure!(took < Duration::from_millis(2500), "SERVFAIL took {took:?}");
    Ok(())
}

#[test]
fn dns() {
    let cases: &[(&str, Case)] = &[
        ("setup", setup),
        ("name_alias_network", name_alias_network),
        ("shared_alias", shared_alias),
        ("ptr", ptr),
        ("nodata", nodata),
        ("isolation", isolation),
        ("across_gateway", across_gateway),
        ("lifecycle", lifecycle),
        ("malformed", malformed),
        ("forward", forward),
        ("local_not_forwarded", local_not_forwarded),
        ("upstream_down", upstream_down),
    ];
    run_cases(cases);
}
