//! The user-space data plane of `--encap udp` networks, run as a daemon next to the
//! agent so that agent restarts never interrupt it.
//!
//! * [`protocol`] (pure): the line-delimited JSON between agent and daemon, and the
//!   forwarding tables computed from the desired state.
//! * [`client`]: the agent's side: start, adopt or replace the daemon; send tables.
//! * [`daemon`]: the daemon's socket server.
//! * [`planes`]: the engines it drives (`overlay-udp`, `overlay-quic`).

pub mod client;
pub mod daemon;
pub mod planes;
pub mod protocol;
