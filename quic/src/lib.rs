//! Encrypted mode of the overlay (`--encap udp --encrypted`): `QuicPlane` carries the UDP
//! engine's datagrams between agents as QUIC DATAGRAM frames (RFC 9221) over mutually
//! authenticated TLS 1.3, with the hosts' `agent` certificates from the cluster PKI
//! (crate overlay-pki).
//!
//! It must never accept a datagram from, or send one to, a peer that has not proven with
//! a certificate from the cluster CA that it is the host the caller expects at that
//! address; it never blocks a caller of `QuicPlane::send`.

mod tls;
pub mod transport;

use std::net::SocketAddr;

use thiserror::Error;

/// The cluster PKI, re-exported for the plane's users.
pub use overlay_pki as pki;
pub use overlay_pki::Identity;
pub use tls::ALPN;
pub use transport::{
    max_datagram_for_mtu, Congestion, Counters, OnDatagram, PeerName, QuicConfig, QuicPlane,
    DEFAULT_PORT, IPV4_UDP_OVERHEAD, QUIC_DATAGRAM_OVERHEAD,
};

/// Why the plane could not start.
#[derive(Debug, Error)]
pub enum QuicError {
    #[error(
        "invalid underlay MTU {0}: QUIC needs 1228 to 65555 (UDP payloads of 1200 to 65527 bytes)"
    )]
    InvalidMtu(u32),
    #[error("cannot bind the encrypted plane to {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the encrypted plane's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("TLS set-up failed: {0}")]
    Tls(rustls::Error),
    #[error("TLS set-up failed: {0}")]
    Verifier(String),
}
