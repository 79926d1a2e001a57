//! Two or three planes on loopback: datagrams flow between hosts with certificates from
//! one CA, and nothing flows to or from a host that cannot prove who it is.

mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{deliver, ip, node, node_with, Node, PORT};
use overlay_quic::pki::{Ca, Identity, Role, Subject};
use overlay_quic::{max_datagram_for_mtu, Counters};

const PATIENCE: Duration = Duration::from_secs(10);

#[test]
fn planes_from_one_ca_exchange_datagrams_both_ways() {
    let ca = Ca::generate().expect("ca");
    let (a, b) = ("127.77.1.1", "127.77.1.2");
    let h1 = node(&ca, "h1", a, &[(b, "h2")]);
    let h2 = node(&ca, "h2", b, &[(a, "h1")]);

    // Both dial at once: each side ends up sending on whichever connection it has.
    assert!(h1.plane.send(ip(b), b"first from h1"));
    assert!(h2.plane.send(ip(a), b"first from h2"));
    assert!(deliver(&h1, b, &h2, b"hello h2", PATIENCE), "h1 -> h2");
    assert!(deliver(&h2, a, &h1, b"hello h1", PATIENCE), "h2 -> h1");
    let (from, _) = h1.rx.try_iter().next().unwrap_or((ip(b), vec![]));
    assert_eq!(from, ip(b));

    // The advertised size is what QUIC carries on a 1500-byte underlay.
    let max = max_datagram_for_mtu(common::MTU);
    assert_eq!(max, 1434);
    assert_eq!(h1.plane.max_datagram(ip(b)), Some(max));
    assert_eq!(h1.plane.max_datagram(ip("127.77.1.9")), None);
    let largest = vec![0xab; max];
    assert!(deliver(&h1, b, &h2, &largest, PATIENCE), "largest datagram");
    assert!(!h1.plane.send(ip(b), &vec![0; max + 1]), "too large is refused");
    assert!(!h1.plane.send(ip("127.77.1.9"), b"nobody"), "unknown peer is refused");

    let c = h1.plane.counters();
    assert_eq!(c.rejected_peers, 0, "{c:?}");
    assert!(c.connections >= 1 && c.sent >= 3 && c.received >= 1 && c.dropped >= 2, "{c:?}");
}

#[test]
fn reconnects_after_the_peer_restarts() {
    let ca = Ca::generate().expect("ca");
    let (a, b) = ("127.77.7.1", "127.77.7.2");
    let h1 = node(&ca, "h1", a, &[(b, "h2")]);
    let h2 = node(&ca, "h2", b, &[(a, "h1")]);
    assert!(deliver(&h1, b, &h2, b"before", PATIENCE));
    drop(h2);
    let h2 = node(&ca, "h2", b, &[(a, "h1")]);
    assert!(deliver(&h1, b, &h2, b"after", PATIENCE), "h1 dials the restarted h2");
    assert!(deliver(&h2, a, &h1, b"back", PATIENCE));
    assert_eq!(h1.plane.counters().rejected_peers, 0);
}

#[test]
fn reconnects_after_the_peer_crashed() {
    let ca = Ca::generate().expect("ca");
    let (a, b) = ("127.77.8.1", "127.77.8.2");
    let h1 = node(&ca, "h1", a, &[(b, "h2")]);
    let issued = ca.issue(&Subject::new("h2", Role::Agent)).expect("issue");
    let identity = Identity::from_issued(&ca, &issued).expect("identity");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let h2 = node_with(identity.clone(), b, &[(a, "h1")], Some(runtime.handle().clone()));
    assert!(deliver(&h1, b, &h2, b"before", PATIENCE));
    // The plane's tasks vanish without a word to h1, as in a crash.
    runtime.shutdown_timeout(Duration::from_secs(1));
    drop(h2);
    let h2 = node_with(identity, b, &[(a, "h1")], None);
    // Well before h1's connection to the old h2 would time out (30 s): the new h2 resets it.
    assert!(deliver(&h1, b, &h2, b"after", Duration::from_secs(5)), "{:?}", h1.plane.counters());
}

/// Sends from `rogue` to the honest host and back for a while; neither side may receive
/// anything. Returns the honest plane's counters.
fn nothing_flows(honest: &Node, honest_addr: &str, rogue: &Node, rogue_addr: &str) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        rogue.plane.send(ip(honest_addr), b"injected");
        honest.plane.send(ip(rogue_addr), b"for h2 only");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(honest.rx.try_iter().count(), 0, "honest host received from the rogue");
    assert_eq!(rogue.rx.try_iter().count(), 0, "rogue received from the honest host");
    let c = honest.plane.counters();
    eprintln!("honest {c:?}, rogue {:?}", rogue.plane.counters());
    assert!(c.rejected_peers >= 2, "rejected both ways: {c:?}");
    assert_eq!((c.received, c.connections), (0, 0), "{c:?}");
    c
}

#[test]
fn certificate_from_another_ca_is_rejected_both_ways() {
    let (ours, theirs) = (Ca::generate().expect("ca"), Ca::generate().expect("ca"));
    let (a, b) = ("127.77.2.1", "127.77.2.2");
    let h1 = node(&ours, "h1", a, &[(b, "h2")]);
    // The right name at the right address, signed by the wrong CA.
    let rogue = node(&theirs, "h2", b, &[(a, "h1")]);
    nothing_flows(&h1, a, &rogue, b);
}

#[test]
fn certificate_for_another_host_is_rejected_both_ways() {
    let ca = Ca::generate().expect("ca");
    let (a, b, c) = ("127.77.3.1", "127.77.3.2", "127.77.3.3");
    let h1 = node(&ca, "h1", a, &[(b, "h2"), (c, "h3")]);
    // A genuine certificate for h3, used from h2's address.
    let rogue = node(&ca, "h3", b, &[(a, "h1")]);
    nothing_flows(&h1, a, &rogue, b);

    // From h3's own address the same kind of certificate is fine.
    let h3 = node(&ca, "h3", c, &[(a, "h1")]);
    assert!(deliver(&h3, a, &h1, b"h3 for real", PATIENCE));
}

#[test]
fn address_of_no_known_host_is_refused() {
    let ca = Ca::generate().expect("ca");
    let (a, b) = ("127.77.4.1", "127.77.4.2");
    let h1 = node(&ca, "h1", a, &[]);
    let h2 = node(&ca, "h2", b, &[(a, "h1")]);
    assert!(!deliver(&h2, a, &h1, b"from a stranger", Duration::from_secs(2)));
    assert!(h1.plane.counters().rejected_peers >= 1, "{:?}", h1.plane.counters());
}

/// Forwards UDP between the two planes, which both believe the relay's address is the
/// other host, and records every byte that passes.
struct Relay {
    seen: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Relay {
    fn start(relay: &str, a: &str, b: &str) -> Relay {
        let socket = UdpSocket::bind((ip(relay), PORT)).expect("bind relay");
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let (a, b) = ((ip(a), PORT).into(), (ip(b), PORT).into());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                let to = if from == a { b } else { a };
                if let Ok(mut seen) = seen2.lock() {
                    seen.extend_from_slice(&buf[..n]);
                }
                let _ = socket.send_to(&buf[..n], to);
            }
        });
        Relay { seen, stop, thread: Some(thread) }
    }

    fn bytes(&self) -> Vec<u8> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn no_plaintext_on_the_wire() {
    let ca = Ca::generate().expect("ca");
    let (a, b, relay) = ("127.77.5.1", "127.77.5.2", "127.77.5.3");
    let relay = Relay::start(relay, a, b);
    let h1 = node(&ca, "h1", a, &[("127.77.5.3", "h2")]);
    let h2 = node(&ca, "h2", b, &[("127.77.5.3", "h1")]);
    let secret = b"OVERLAY-SECRET-PAYLOAD".repeat(40);

    assert!(deliver(&h1, "127.77.5.3", &h2, &secret, PATIENCE), "h1 -> h2 through the relay");
    assert!(deliver(&h2, "127.77.5.3", &h1, &secret, PATIENCE), "h2 -> h1 through the relay");
    for _ in 0..100 {
        h1.plane.send(ip("127.77.5.3"), &secret);
    }
    thread::sleep(Duration::from_millis(200));

    let wire = relay.bytes();
    assert!(wire.len() > 100 * secret.len(), "relay saw only {} bytes", wire.len());
    for needle in [&b"OVERLAY-SECRET-PAYLOAD"[..], b"SECRET", b"PAYLOAD"] {
        let found = wire.windows(needle.len()).any(|w| w == needle);
        assert!(!found, "{:?} seen in clear on the wire", String::from_utf8_lossy(needle));
    }
}

#[test]
fn bad_configuration_is_named() {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use overlay_quic::pki::Identity;
    use overlay_quic::{QuicConfig, QuicError, QuicPlane};

    let ca = Ca::generate().expect("ca");
    let identity =
        Identity::from_issued(&ca, &ca.issue(&Subject::new("h1", Role::Agent)).expect("issue"))
            .expect("id");
    let start = |addr: &str, mtu| {
        let cfg = QuicConfig::new(SocketAddr::new(ip(addr), PORT), identity.clone(), mtu);
        QuicPlane::start(cfg, Arc::new(|_| None), Arc::new(|_, _| {})).err()
    };
    let small = start("127.77.6.1", 1000).map(|e| e.to_string()).unwrap_or_default();
    assert!(small.starts_with("invalid underlay MTU 1000"), "{small}");
    // An address of no local interface.
    match start("192.0.2.1", 1500) {
        Some(e @ QuicError::Bind { .. }) => {
            assert!(e.to_string().contains(&format!("192.0.2.1:{PORT}")), "{e}")
        }
        other => panic!("{other:?}"),
    }
}
