//! Planes on loopback addresses for the tests and the benchmark: each test uses its own
//! 127.77.N.0/24 so tests can run in parallel on one port.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use overlay_quic::pki::{Ca, Identity, Role, Subject};
use overlay_quic::{QuicConfig, QuicPlane};
use tokio::runtime::Handle;

/// Not the product default (7471), so a plane running on this machine is not in the way.
pub const PORT: u16 = 17471;
pub const MTU: u32 = 1500;

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// A plane and what its `on_datagram` received.
pub struct Node {
    pub plane: QuicPlane,
    pub rx: Receiver<(IpAddr, Vec<u8>)>,
}

/// Starts host `host` with a certificate from `ca` on `addr`, expecting the hosts in
/// `peers` (address, name).
pub fn node(ca: &Ca, host: &str, addr: &str, peers: &[(&str, &str)]) -> Node {
    let issued =
        ca.issue(&Subject::new(host, Role::Agent).with_ips(vec![ip(addr)])).expect("issue");
    let identity = Identity::from_issued(ca, &issued).expect("identity");
    node_with(identity, addr, peers, None)
}

/// [`node`] with a given identity, on `runtime` (or one of its own).
pub fn node_with(
    identity: Identity,
    addr: &str,
    peers: &[(&str, &str)],
    runtime: Option<Handle>,
) -> Node {
    let table: Vec<(IpAddr, String)> =
        peers.iter().map(|(addr, name)| (ip(addr), name.to_string())).collect();
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let mut cfg = QuicConfig::new(SocketAddr::new(ip(addr), PORT), identity, MTU);
    cfg.runtime = runtime;
    let plane = QuicPlane::start(
        cfg,
        Arc::new(move |peer| table.iter().find(|(a, _)| *a == peer).map(|(_, n)| n.clone())),
        Arc::new(move |peer, datagram| {
            let _ = tx.lock().map(|tx| tx.send((peer, datagram.to_vec())));
        }),
    )
    .expect("start plane");
    Node { plane, rx }
}

/// Sends `datagram` from `from` to `to` every 20 ms until `at` receives it (true) or
/// `within` passes (false).
pub fn deliver(from: &Node, to: &str, at: &Node, datagram: &[u8], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        from.plane.send(ip(to), datagram);
        if let Ok((_, got)) = at.rx.recv_timeout(Duration::from_millis(20)) {
            if got == datagram {
                return true;
            }
        }
    }
    false
}
