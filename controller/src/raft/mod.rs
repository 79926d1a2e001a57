//! Raft: the driver task that owns the `RawNode`, its durable storage, the transport
//! to the other members, and membership (who is in the cluster, how changes are made).

pub mod driver;
pub mod membership;
pub mod proposal;
#[cfg(test)]
mod sim;
pub mod slog_bridge;
pub mod snapshot;
pub mod stall;
pub mod storage;
pub mod transport;

use std::collections::BTreeMap;

use overlay_model::State;

use self::membership::Membership;
use self::storage::DiskStorage;

/// The state machine and the member addresses as of `storage`'s snapshot (entries after
/// it are applied again by the driver). Addresses an old snapshot lacks come from
/// `configured` (`--peers`).
pub fn restore(
    storage: &DiskStorage,
    configured: &BTreeMap<u64, String>,
) -> anyhow::Result<(State, Membership)> {
    let meta = storage.snapshot_metadata();
    let (replicated, state) = match storage.snapshot_data() {
        Some((meta, data)) => snapshot::decode(data)
            .map_err(|e| anyhow::anyhow!("snapshot at index {} is unreadable: {e}", meta.index))?,
        None => (None, State::new()),
    };
    let members = driver::conf_members(meta.get_conf_state());
    let mut membership = Membership::with_fallback(replicated, members.iter().copied(), configured);
    membership.retain(&members);
    Ok((state, membership))
}
