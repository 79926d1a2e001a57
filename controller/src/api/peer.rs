//! The member-to-member `Peer` service: raft messages in, proposals forwarded from
//! followers, heartbeats passed on to the leader, and this member's status.
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
use tracing::{debug, warn};

use super::auth::{self, Act};
use crate::cluster::{encode_propose_reply, Cluster, DriverMsg};
use crate::liveness::Liveness;

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
    if !cluster.peers.addresses.contains_key(&m.from) || m.from == cluster.id {
        return Some(format!("from member {}, which is not a peer", m.from));
    }
    if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
        let data = m.get_snapshot().get_data();
        if let Err(e) = overlay_model::State::from_bytes(data) {
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
    pb::Member {
        id: s.id,
        address: cluster.peers.addresses.get(&s.id).cloned().unwrap_or_default(),
        role: s.role.as_str().into(),
        term: s.term,
        commit_index: s.commit,
        reachable: true,
        applied_index: s.applied,
        revision,
        digest,
        snapshot_index: s.snapshot_index,
        leader: s.leader,
    }
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
        for host in &req.get_ref().hosts {
            self.liveness.record(host);
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn last_seen(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::LastSeenResponse>, Status> {
        Ok(Response::new(pb::LastSeenResponse {
            last_seen_ms: self.liveness.last_seen_ms().into_iter().collect(),
        }))
    }

    async fn member_status(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::MemberStatusResponse>, Status> {
        Ok(Response::new(pb::MemberStatusResponse { member: Some(member_status(&self.cluster)) }))
    }
}
