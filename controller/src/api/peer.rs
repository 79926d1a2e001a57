//! The member-to-member `Peer` service: raft messages in, proposals forwarded from
//! followers, heartbeats passed on to the leader, and this member's status.

use std::sync::Arc;

use overlay_model::Command;
use overlay_proto::pb;
use protobuf::Message as _;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::cluster::{encode_propose_reply, Cluster, DriverMsg};
use crate::liveness::Liveness;

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
        Ok(Response::new(pb::Empty {}))
    }

    async fn last_seen(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::LastSeenResponse>, Status> {
        Ok(Response::new(pb::LastSeenResponse {
            last_seen_ms: self.liveness.last_seen_ms().into_iter().collect(),
            problems: self.liveness.problems().into_iter().collect(),
        }))
    }

    async fn member_status(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::MemberStatusResponse>, Status> {
        Ok(Response::new(pb::MemberStatusResponse { member: Some(member_status(&self.cluster)) }))
    }
}
