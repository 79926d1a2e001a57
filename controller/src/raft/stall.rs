//! A member whose raft log cannot be written (a full disk, an I/O error) stops taking
//! part, and takes part again by itself once it can write.
//!
//! Raft's safety needs every acknowledgement (an append, a vote) to be durable first, so
//! a member that cannot write must acknowledge nothing. Stopping the process would do
//! that, but under systemd it would restart, fail again and crash-loop, and it would not
//! come back by itself once space is freed. So instead [`member`] runs drivers in turn:
//! when one fails to persist, it is dropped whole (its raft node may be ahead of the
//! disk), and while stalled the member
//!
//! * drops every raft message and sends none: a stalled leader stops heartbeating, so
//!   the others elect a new leader within an election timeout, and a stalled follower
//!   is simply behind;
//! * answers proposals and membership changes with "not serving" (nothing proposed, so
//!   clients and other members ask elsewhere), and the public API refuses calls the same
//!   way ([`crate::cluster::Shared::not_serving`]), so agents move to another member;
//! * every [`PROBE_EVERY`] writes, syncs and removes a probe file of [`PROBE_BYTES`] in
//!   the raft directory; once that works, it reopens its storage from what is really on
//!   disk (a torn tail dropped), restores the state machine and starts a new driver,
//!   which catches up from the leader like a restarted member.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::cluster::{ChangeError, DriverMsg, NodeStatus, ProposeError, Role, Shared};

/// How often a stalled member checks whether it can write again.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How much a probe writes: enough that a disk with only crumbs left still counts as
/// full (an append batch or a snapshot needs more than a few bytes).
pub const PROBE_BYTES: usize = 1024 * 1024;

/// Whether `dir` takes a write of [`PROBE_BYTES`], synced (the file is removed again).
pub fn writable(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(".write-probe");
    let result = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Publishes the stalled member's status: no leader known, not leading.
fn publish_stalled(shared: &Shared) {
    shared.status.send_if_modified(|s| {
        let changed = s.role != Role::Follower || s.leader != 0;
        s.role = Role::Follower;
        s.leader = 0;
        s.progress.clear();
        changed
    });
}

/// Answers what arrives while stalled: nothing is proposed, applied or acknowledged.
fn refuse(msg: DriverMsg, why: &str) {
    match msg {
        DriverMsg::Raft(_) => {}
        DriverMsg::Propose { reply, .. } => {
            let _ = reply.send(Err(ProposeError::Stalled(why.to_string())));
        }
        // Dropped: the reader is told the read was not confirmed.
        DriverMsg::ReadIndex { .. } => {}
        DriverMsg::ChangeMembership { reply, .. } => {
            let _ = reply.send(Err(ChangeError::Retry(why.to_string())));
        }
        DriverMsg::JoinSnapshot { reply, .. } => {
            drop(reply);
        }
    }
}

/// Stalls until `dir` can be written again (`true`) or `shutdown` flips (`false`).
pub async fn wait_until_writable(
    id: u64,
    dir: &Path,
    error: &str,
    shared: &Arc<Shared>,
    inbox: &mut mpsc::Receiver<DriverMsg>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    *shared.stalled.write().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
    publish_stalled(shared);
    let why = shared.not_serving(id).unwrap_or_else(|| error.to_string());
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return false,
            msg = inbox.recv() => match msg {
                Some(msg) => refuse(msg, &why),
                None => return false,
            },
            _ = probe.tick() => match writable(dir) {
                Ok(()) => {
                    info!(dir = %dir.display(), "the raft log can be written again: this member takes part again");
                    *shared.stalled.write().unwrap_or_else(|p| p.into_inner()) = None;
                    return true;
                }
                Err(e) => debug!(dir = %dir.display(), error = %e, "still cannot write"),
            },
        }
    }
}

/// Warns once that the member stalls, with the reason and what it does about it.
pub fn announce(id: u64, error: &anyhow::Error) {
    warn!(
        id,
        "raft log cannot be written: {error:#}; this member takes no part in the cluster (it acknowledges nothing, the others go on without it) and takes part again by itself once it can write (checked every {}s)",
        PROBE_EVERY.as_secs()
    );
}

/// The status a fresh driver starts from after a stall (so readers see no leader until
/// it hears one).
pub fn reset_status(shared: &Shared, id: u64) {
    let _ = shared.status.send_replace(NodeStatus::initial(id, false));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_dir_is_left_as_it_was() {
        let dir = std::env::temp_dir().join(format!("ov-stall-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert!(writable(&dir).is_ok());
        assert_eq!(std::fs::read_dir(&dir).expect("read").count(), 0);
        assert!(writable(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
