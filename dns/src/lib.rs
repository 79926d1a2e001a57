//! The embedded DNS the agent runs at 127.0.0.11:53 inside every endpoint.
//!
//! An endpoint's name and aliases resolve to its addresses in the networks the asker
//! shares with it, `NAME.NETWORK` resolves across gateway routes, addresses have PTR
//! records, names the asker may not see get NXDOMAIN, and everything else goes to the
//! host's resolvers. See [`resolver`] for the exact rules.
//!
//! * [`records`]: [`DnsView`], indexes built from the controller's `Catalog` (pure).
//! * [`wire`]: the DNS message format, parsed defensively (pure).
//! * [`resolver`]: the naming rules, `resolve(view, asker, query) -> Answer` (pure).
//! * [`upstream`]: forwarding to the host's resolvers, from the host namespace.
//! * [`server`]: the UDP/TCP loops, and [`bind_in_netns`] to open their sockets inside
//!   an endpoint's namespace.
//!
//! How the agent uses it: build a `DnsView` per catalog revision and publish it on a
//! `tokio::sync::watch` channel; for each endpoint, `bind_in_netns` then `serve` with
//! that endpoint's name, a receiver of the channel and the shared `Arc<Upstream>`.
//!
//! This crate must never trust a packet (no panic, no unbounded loop or allocation on
//! any input), never send anything except replies to clients and queries to the
//! configured upstreams, and never move a long-lived thread into another namespace.

pub mod records;
pub mod resolver;
pub mod server;
#[doc(hidden)]
pub mod testutil;
pub mod upstream;
pub mod wire;

pub use records::DnsView;
pub use resolver::{resolve, Answer};
pub use server::{bind_in_netns, serve, serve_with, ServerConfig};
pub use upstream::{Transport, Upstream, UpstreamError};
pub use wire::{parse, Query, Rcode, WireError};
