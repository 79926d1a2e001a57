//! The control plane's connections, shared by the controller (server and peer client),
//! the agent and `overlayctl`:
//!
//! * [`server`]: a TCP listener that completes each TLS 1.3 handshake off the accept
//!   loop and hands tonic connections that carry [`Caller`] — who is calling, as the
//!   client certificate says — so every RPC can be authorised.
//! * [`client`]: [`Dialer`], which turns a controller URL into a tonic channel over TLS
//!   (trusting only the cluster CA) or, only when `--insecure` was given, plaintext.
//!
//! Plaintext is never a fallback: a dialer is built either secure or insecure, and a URL
//! whose scheme does not match is refused with an error saying so.

pub mod client;
pub mod server;

pub use client::{DialError, Dialer};
pub use server::{incoming, Caller, Conn};
