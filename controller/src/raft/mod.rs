//! Raft: the driver task that owns the `RawNode`, its durable storage, and the transport
//! to the other members.

pub mod storage;
