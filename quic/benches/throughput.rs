//! One-way throughput of 1400-byte datagrams between two planes on loopback, sent from
//! one plain thread the way the UDP engine's TAP readers call `send`.
//!
//!     cargo bench -p overlay-quic --bench throughput [-- SECONDS [cubic|bbr]]
//!
//! Prints datagrams/s and Gbit/s received, and how many `send` calls were refused
//! (quinn's queue full: the sender outran the congestion window or the receiver).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ip, node_with, MTU, PORT};
use overlay_quic::pki::{Ca, Identity, Role, Subject};
use overlay_quic::{Congestion, QuicConfig, QuicPlane};

const SIZE: usize = 1400;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let congestion = match args.next().as_deref() {
        Some("bbr") => Congestion::Bbr,
        _ => Congestion::Cubic,
    };
    let ca = Ca::generate().expect("ca");
    let identity = |host: &str| {
        Identity::from_issued(&ca, &ca.issue(&Subject::new(host, Role::Agent)).expect("issue"))
            .expect("identity")
    };
    let (a, b) = ("127.77.9.1", "127.77.9.2");

    // The receiver counts instead of queueing.
    let received = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let (r, n) = (received.clone(), bytes.clone());
    let mut cfg = QuicConfig::new(SocketAddr::new(ip(b), PORT), identity("h2"), MTU);
    cfg.congestion = congestion;
    let receiver = QuicPlane::start(
        cfg,
        Arc::new(move |peer| (peer == ip(a)).then(|| "h1".to_string())),
        Arc::new(move |_, datagram| {
            r.fetch_add(1, Ordering::Relaxed);
            n.fetch_add(datagram.len() as u64, Ordering::Relaxed);
        }),
    )
    .expect("receiver");
    let sender = node_with(identity("h1"), a, &[(b, "h2")], None);
    // Connect first, so the measurement is of the steady state.
    while receiver.counters().connections == 0 {
        sender.plane.send(ip(b), &[0; SIZE]);
        std::thread::sleep(Duration::from_millis(10));
    }
    received.store(0, Ordering::Relaxed);
    bytes.store(0, Ordering::Relaxed);

    let datagram = vec![0x5a; SIZE];
    let (mut accepted, mut refused) = (0u64, 0u64);
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    while Instant::now() < end {
        for _ in 0..64 {
            if sender.plane.send(ip(b), &datagram) {
                accepted += 1;
            } else {
                refused += 1;
                std::thread::yield_now();
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let what is in flight arrive.
    std::thread::sleep(Duration::from_millis(200));
    let got = received.load(Ordering::Relaxed);
    let gbit = bytes.load(Ordering::Relaxed) as f64 * 8.0 / elapsed / 1e9;
    println!(
        "{congestion:?}: {SIZE}-byte datagrams for {elapsed:.1} s: {:.0} datagrams/s received, \
         {gbit:.2} Gbit/s payload; send accepted {accepted}, refused {refused}, received {got} \
         ({:.2}% of accepted lost)",
        got as f64 / elapsed,
        100.0 * (accepted.saturating_sub(got)) as f64 / accepted.max(1) as f64,
    );
}
