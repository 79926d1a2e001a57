//! overlay-controller (being written).
mod raft;
fn main() {}
