//! gRPC handlers: `overlay` (the public API for overlayctl and agents) and `peer`
//! (member-to-member), with `watch` serving the Watch method's streams. Handlers translate requests into model commands and reads; they
//! never touch the raft node. `auth` decides who may call what.

pub mod auth;
pub mod overlay;
pub mod peer;
pub mod watch;
