//! The pure domain model of `overlay`, shared by the controller, the agent and the CLI.
//!
//! * [`names`], [`parse`]: validation of user input into typed values, with errors that
//!   name the bad value. The CLI pre-checks with it, the controller enforces it.
//! * [`validate`]: checks of single values (subnets, addresses, MTUs, VNIs, MACs,
//!   interface names) that the controller enforces and the agent repeats on what it
//!   receives.
//! * [`types`]: networks, endpoints, attachments, routes, hosts.
//! * [`ipam`]: the per-network address allocator.
//! * [`state`]: the replicated state machine — `State::apply(command) -> Result<Applied>`
//!   — and [`Catalog`], the object view watchers replicate.
//! * [`status`]: endpoint statuses as their hosts report them (kept beside the catalog).
//!
//! This crate must never do I/O, read clocks or use randomness: every replica of the
//! controller applies the same commands and must reach the same bytes.

pub mod command;
pub mod error;
pub mod ipam;
pub mod names;
pub mod parse;
pub mod state;
pub mod status;
pub mod types;
pub mod validate;

pub use command::{Command, NetworkSpec};
pub use error::ModelError;
pub use ipam::{Ipam, IpamError};
pub use state::{
    Applied, Catalog, Change, ClusterMeta, JoinTokenRecord, NameEntry, SnapshotError, State,
};
pub use status::{EndpointState, EndpointStatus, ReportedStatus};
pub use types::{Attachment, Encap, Endpoint, Host, HostStatus, Mac, Network, Route, RouteKey};
