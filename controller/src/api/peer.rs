//! The member-to-member `Peer` service: raft messages in, proposals and membership
//! changes forwarded from followers, heartbeats passed on to the leader, this member's
//! status, and snapshots for members that join.
//!
//! Only `controller` certificates get in ([`only_controllers`] runs before any message
//! is read), and what they send is checked like a client's: raft messages must be
//! addressed to this member from a known one, a snapshot must decode into a consistent
//! state before raft sees it, and no member can propose an internal command for another.

use std::sync::Arc;

use overlay_model::Command;
use overlay_proto::pb;
use protobuf::Message as _;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::auth::{self, Act};
use crate::cluster::{change_error_status, encode_propose_reply, Cluster, DriverMsg};
use crate::liveness::Liveness;
use crate::raft::membership::MemberChange;

/// The Peer service's interceptor: controllers only.
#[allow(clippy::result_large_err)] // tonic's interceptor signature
pub fn only_controllers(req: Request<()>) -> Result<Request<()>, Status> {
    auth::check(&overlay_grpc::Caller::of(&req), Act::Peer)?;
    Ok(req)
}

/// Why a raft message from a peer is not stepped, if it must not be.
fn refuse_raft(cluster: &Cluster, m: &raft::prelude::Message) -> Option<String> {
    if m.to != cluster.id {
        return Some(format!("addressed to member {}, not this one ({})", m.to, cluster.id));
    }
    // Not "from a member this one knows": a member that is behind (or joining) has not
    // applied the additions that made its current leader a member, and must still take
    // its messages. The sender is an authenticated controller; messages from members
    // removed from the configuration are dropped by the raft driver.
    if m.from == 0 || m.from == cluster.id {
        return Some(format!("from member {}, which is not a peer", m.from));
    }
    if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
        let data = m.get_snapshot().get_data();
        if let Err(e) = crate::raft::snapshot::decode(data) {
            return Some(format!("its snapshot is unusable: {e}"));
        }
    }
    None
}

pub struct PeerApi {
    pub cluster: Cluster,
    pub liveness: Arc<Liveness>,
}

/// This member's own view, as `cluster status` shows it.
pub fn member_status(cluster: &Cluster) -> pb::Member {
    let s = cluster.status();
    let (revision, digest) = {
        let state = cluster.read_state();
        (state.catalog.revision, format!("{:016x}", state.digest()))
    };
    let info = s.members.get(&s.id);
    pb::Member {
        id: s.id,
        address: info.map(|m| m.address.clone()).unwrap_or_default(),
        role: s.role.as_str().into(),
        term: s.term,
        commit_index: s.commit,
        reachable: true,
        applied_index: s.applied,
        revision,
        digest,
        snapshot_index: s.snapshot_index,
        leader: s.leader,
        matched: s.progress.get(&s.id).map(|p| p.matched).unwrap_or(0),
        voter: info.is_some_and(|m| m.voter),
    }
}

/// The leader's raft progress of every member (empty unless this member leads).
pub fn member_progress(cluster: &Cluster) -> Vec<pb::MemberProgress> {
    let s = cluster.status();
    s.progress
        .iter()
        .map(|(&id, p)| pb::MemberProgress { id, matched: p.matched, live: p.live })
        .collect()
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerApi {
    async fn raft(
        &self,
        req: Request<Streaming<pb::RaftMessage>>,
    ) -> Result<Response<pb::Empty>, Status> {
        let mut stream = req.into_inner();
        while let Some(msg) = stream.message().await? {
            let m = match raft::prelude::Message::parse_from_bytes(&msg.data) {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "undecodable raft message dropped");
                    continue;
                }
            };
            if let Some(why) = refuse_raft(&self.cluster, &m) {
                warn!(from = m.from, "raft message dropped: {why}");
                continue;
            }
            if self.cluster.driver().send(DriverMsg::Raft(Box::new(m))).await.is_err() {
                return Err(Status::unavailable("controller is shutting down"));
            }
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn propose(
        &self,
        req: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let command: Command = postcard::from_bytes(&req.get_ref().command)
            .map_err(|e| Status::invalid_argument(format!("undecodable command: {e}")))?;
        if command.is_internal() {
            return Err(Status::permission_denied(format!(
                "permission denied: only the leader itself may propose {command:?}"
            )));
        }
        Ok(Response::new(encode_propose_reply(self.cluster.propose_local(command).await)))
    }

    async fn forward_heartbeats(
        &self,
        req: Request<pb::HeartbeatBatch>,
    ) -> Result<Response<pb::Empty>, Status> {
        let batch = req.get_ref();
        for host in &batch.hosts {
            self.liveness.record(host, batch.problems.get(host).map(String::as_str));
        }
        for (host, revision) in &batch.applied {
            self.liveness.record_applied(host, *revision);
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn last_seen(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::LastSeenResponse>, Status> {
        Ok(Response::new(pb::LastSeenResponse {
            last_seen_ms: self.liveness.last_seen_ms().into_iter().collect(),
            problems: self.liveness.problems().into_iter().collect(),
            applied: self.liveness.applied().into_iter().collect(),
        }))
    }

    async fn member_status(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::MemberStatusResponse>, Status> {
        Ok(Response::new(pb::MemberStatusResponse {
            member: Some(member_status(&self.cluster)),
            progress: member_progress(&self.cluster),
        }))
    }

    async fn change_membership(
        &self,
        req: Request<pb::MembershipChange>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let change = if r.remove {
            MemberChange::Remove { id: r.id }
        } else {
            MemberChange::AddLearner { id: r.id, address: r.address }
        };
        self.cluster.change_local(change).await.map_err(change_error_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn join_snapshot(
        &self,
        req: Request<pb::JoinSnapshotRequest>,
    ) -> Result<Response<pb::JoinSnapshotResponse>, Status> {
        let id = req.get_ref().id;
        let joined = self.cluster.join_snapshot(id).await.map_err(Status::from)?;
        let snapshot = joined
            .snapshot
            .write_to_bytes()
            .map_err(|e| Status::internal(format!("cannot encode the snapshot: {e}")))?;
        info!(
            id,
            index = joined.snapshot.get_metadata().index,
            bytes = snapshot.len(),
            "sent a snapshot to a joining member"
        );
        Ok(Response::new(pb::JoinSnapshotResponse { snapshot, commit_index: joined.commit }))
    }
}
