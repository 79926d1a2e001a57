//! Raft: the driver task that owns the `RawNode`, its durable storage, and the transport
//! to the other members.

pub mod driver;
pub mod proposal;
pub mod slog_bridge;
pub mod storage;
pub mod transport;
