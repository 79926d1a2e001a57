//! Encrypted mode of the overlay (`--encap udp --encrypted`): the cluster PKI (a CA and a
//! certificate per host, made offline by `overlayctl cert`) and `QuicPlane`, which
//! carries the UDP engine's datagrams between agents as QUIC DATAGRAM frames (RFC 9221)
//! over mutually authenticated TLS 1.3.
//!
//! It must never accept a datagram from, or send one to, a peer that has not proven with
//! a certificate from the cluster CA that it is the host the caller expects at that
//! address; it never blocks a caller of `QuicPlane::send`.

pub mod pki;
