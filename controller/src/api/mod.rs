//! gRPC handlers: `overlay` (the public API for overlayctl and agents) and `peer`
//! (member-to-member). Handlers translate requests into model commands and reads; they
//! never touch the raft node.

pub mod overlay;
pub mod peer;
