//! The handle API handlers use to reach the replicated state: propose a command and get
//! its result, wait for a linearizable read barrier, read the applied state.
//!
//! Handlers never touch the raft node: they send messages to the driver task. A member
//! that is not the leader forwards proposals to the leader over the Peer service, so
//! any member accepts any call.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use overlay_grpc::Dialer;
use overlay_model::{Applied, Command, ModelError, State};
use overlay_proto::pb;
use overlay_proto::pb::peer_client::PeerClient;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;

use crate::watch::WatchHub;

/// How long a write may wait for its entry to commit before the client is told the
/// outcome is unknown.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a linearizable read waits for the leader to confirm its commit index.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// gRPC messages between members may carry whole snapshots (only controllers may send
/// them: the Peer service refuses everyone else before reading a message).
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;
/// The largest request the public API reads: far above any real request, far below
/// what would hurt a member.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
        }
    }
}

/// What the driver publishes about the raft node after every step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    pub role: Role,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub snapshot_index: u64,
    /// A member started on an empty data dir while the cluster already had data does not
    /// vote or campaign until it has caught up from the leader.
    pub recovering: bool,
}

/// State shared between the driver (writer) and the API (readers).
pub struct Shared {
    pub state: RwLock<State>,
    pub hub: WatchHub,
    pub status: watch::Sender<NodeStatus>,
}

impl Shared {
    pub fn read_state(&self) -> RwLockReadGuard<'_, State> {
        // The driver mutates State only through `apply`, which validates before it
        // changes anything, so a poisoned lock still holds a consistent state.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

pub type ProposeReply = Result<Applied, ProposeError>;

#[derive(Debug, Error)]
pub enum ProposeError {
    #[error("{0}")]
    Rejected(ModelError),
    /// Rejected by the leader's state machine; carried back as status code and message.
    #[error("{1}")]
    RejectedRemote(tonic::Code, String),
    #[error("this member is not the leader")]
    NotLeader { leader: u64 },
    #[error("{0}")]
    Unavailable(String),
}

/// Messages to the driver task.
pub enum DriverMsg {
    Raft(Box<raft::prelude::Message>),
    Propose { command: Command, reply: oneshot::Sender<ProposeReply> },
    ReadIndex { reply: oneshot::Sender<()> },
}

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("{0}")]
    Rejected(#[from] ModelError),
    #[error("{1}")]
    RejectedRemote(tonic::Code, String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    OutcomeUnknown(String),
}

impl From<ClusterError> for tonic::Status {
    fn from(e: ClusterError) -> Self {
        use overlay_model::error::ErrorKind;
        match e {
            ClusterError::Rejected(m) => {
                let msg = m.to_string();
                match m.kind() {
                    ErrorKind::InvalidArgument => tonic::Status::invalid_argument(msg),
                    ErrorKind::NotFound => tonic::Status::not_found(msg),
                    ErrorKind::AlreadyExists => tonic::Status::already_exists(msg),
                    ErrorKind::FailedPrecondition => tonic::Status::failed_precondition(msg),
                    ErrorKind::PermissionDenied => {
                        tonic::Status::permission_denied(format!("permission denied: {msg}"))
                    }
                }
            }
            ClusterError::RejectedRemote(code, m) => tonic::Status::new(code, m),
            ClusterError::Unavailable(m) => tonic::Status::unavailable(m),
            ClusterError::OutcomeUnknown(m) => tonic::Status::deadline_exceeded(m),
        }
    }
}

/// Lazily connected gRPC channels to the other members.
#[derive(Clone)]
pub struct Peers {
    pub addresses: Arc<BTreeMap<u64, String>>,
    channels: Arc<BTreeMap<u64, Channel>>,
}

impl Peers {
    /// `dialer` carries this member's TLS settings (its controller certificate).
    pub fn new(addresses: BTreeMap<u64, String>, dialer: &Dialer) -> anyhow::Result<Peers> {
        let mut channels = BTreeMap::new();
        for (id, addr) in &addresses {
            channels.insert(*id, Peers::connect(dialer, addr)?);
        }
        Ok(Peers { addresses: Arc::new(addresses), channels: Arc::new(channels) })
    }

    /// The one place a channel to a member is made.
    fn connect(dialer: &Dialer, address: &str) -> anyhow::Result<Channel> {
        let endpoint = dialer
            .endpoint(&format!("{}://{address}", dialer.scheme()))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        Ok(dialer.connect_lazy(endpoint))
    }

    pub fn client(&self, id: u64) -> Option<PeerClient<Channel>> {
        self.channels.get(&id).map(|c| {
            PeerClient::new(c.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        })
    }
}

#[derive(Clone)]
pub struct Cluster {
    pub id: u64,
    pub peers: Peers,
    pub shared: Arc<Shared>,
    driver: mpsc::Sender<DriverMsg>,
}

impl Cluster {
    pub fn new(
        id: u64,
        peers: Peers,
        shared: Arc<Shared>,
        driver: mpsc::Sender<DriverMsg>,
    ) -> Self {
        Cluster { id, peers, shared, driver }
    }

    pub fn status(&self) -> NodeStatus {
        self.shared.status.borrow().clone()
    }

    pub fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.shared.read_state()
    }

    pub fn driver(&self) -> &mpsc::Sender<DriverMsg> {
        &self.driver
    }

    /// Propose on this member's driver; it answers `NotLeader` unless it leads.
    pub async fn propose_local(&self, command: Command) -> ProposeReply {
        let (reply, rx) = oneshot::channel();
        self.driver
            .send(DriverMsg::Propose { command, reply })
            .await
            .map_err(|_| ProposeError::Unavailable("controller is shutting down".into()))?;
        match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(ProposeError::Unavailable("controller is shutting down".into())),
            Err(_) => Err(ProposeError::Unavailable(
                "timed out waiting for the write to commit; its outcome is unknown".into(),
            )),
        }
    }

    /// Propose a command wherever the leader is and wait until it is applied.
    ///
    /// Retries while no leader is known (an election takes a second or two) but never
    /// re-sends a command whose outcome is unknown, so a write is applied at most once.
    pub async fn propose(&self, command: Command) -> Result<Applied, ClusterError> {
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let leader = self.status().leader;
            let attempt = if leader == self.id || leader == 0 {
                self.propose_local(command.clone()).await
            } else {
                self.forward(leader, &command).await
            };
            match attempt {
                Ok(applied) => return Ok(applied),
                Err(ProposeError::Rejected(e)) => return Err(ClusterError::Rejected(e)),
                Err(ProposeError::RejectedRemote(code, m)) => {
                    return Err(ClusterError::RejectedRemote(code, m))
                }
                Err(ProposeError::NotLeader { .. }) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ClusterError::Unavailable(
                            "no controller leader is available (is a majority of members up?)"
                                .into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(ProposeError::Unavailable(msg)) => {
                    return Err(ClusterError::OutcomeUnknown(msg))
                }
            }
        }
    }

    async fn forward(&self, leader: u64, command: &Command) -> ProposeReply {
        let Some(mut client) = self.peers.client(leader) else {
            return Err(ProposeError::NotLeader { leader: 0 });
        };
        let bytes =
            postcard::to_stdvec(command).map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(pb::ProposeRequest { command: bytes });
        request.set_timeout(PROPOSE_TIMEOUT);
        match client.propose(request).await {
            Ok(resp) => decode_propose_response(resp.into_inner()),
            // The leader was not reached: nothing was proposed, so trying again is safe.
            Err(status) if is_not_sent(&status) => Err(ProposeError::NotLeader { leader: 0 }),
            Err(status) => Err(ProposeError::Unavailable(format!(
                "leader {leader} did not answer ({}); the write's outcome is unknown",
                status.message()
            ))),
        }
    }

    /// Wait (briefly) until this member's state has caught up with `revision`, so that a
    /// write forwarded to the leader is visible here when the handler reads it back.
    pub async fn wait_for_revision(&self, revision: u64) {
        let mut status = self.shared.status.subscribe();
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        while self.read_state().catalog.revision < revision {
            if tokio::time::timeout_at(deadline, status.changed()).await.is_err() {
                return;
            }
        }
    }

    /// Wait until this member has applied everything committed before the call: reads
    /// after it are linearizable (raft ReadIndex; followers ask the leader).
    pub async fn read_barrier(&self) -> Result<(), ClusterError> {
        let (reply, rx) = oneshot::channel();
        self.driver
            .send(DriverMsg::ReadIndex { reply })
            .await
            .map_err(|_| ClusterError::Unavailable("controller is shutting down".into()))?;
        match tokio::time::timeout(READ_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(ClusterError::Unavailable(
                "no controller leader confirmed the read (is a majority of members up?); retry, or read with --consistency local".into(),
            )),
        }
    }
}

/// A status that proves the request never reached the peer's handler: the connection
/// could not be made (refused, no route, TLS refused) or the peer said it is not leader.
pub fn is_not_sent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let message = status.message().to_ascii_lowercase();
    message.contains("connect") || message.contains("not the leader") || {
        let mut next = std::error::Error::source(status);
        let mut refused = false;
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                refused = matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::HostUnreachable
                );
                break;
            }
            next = e.source();
        }
        refused
    }
}

pub fn encode_propose_reply(reply: ProposeReply) -> pb::ProposeResponse {
    match reply {
        Ok(applied) => pb::ProposeResponse {
            applied: postcard::to_stdvec(&applied).unwrap_or_default(),
            error: String::new(),
            code: 0,
        },
        Err(ProposeError::Rejected(e)) => {
            let status = tonic::Status::from(ClusterError::Rejected(e));
            pb::ProposeResponse {
                applied: Vec::new(),
                error: status.message().to_string(),
                code: status.code() as i32,
            }
        }
        Err(ProposeError::RejectedRemote(code, error)) => {
            pb::ProposeResponse { applied: Vec::new(), error, code: code as i32 }
        }
        Err(ProposeError::NotLeader { leader }) => pb::ProposeResponse {
            applied: Vec::new(),
            error: format!("not the leader (leader is {leader})"),
            code: tonic::Code::Aborted as i32,
        },
        Err(ProposeError::Unavailable(msg)) => pb::ProposeResponse {
            applied: Vec::new(),
            error: msg,
            code: tonic::Code::Unavailable as i32,
        },
    }
}

fn decode_propose_response(resp: pb::ProposeResponse) -> ProposeReply {
    match tonic::Code::from_i32(resp.code) {
        tonic::Code::Ok => postcard::from_bytes(&resp.applied)
            .map_err(|e| ProposeError::Unavailable(format!("undecodable reply from leader: {e}"))),
        tonic::Code::Aborted => Err(ProposeError::NotLeader { leader: 0 }),
        tonic::Code::Unavailable => Err(ProposeError::Unavailable(resp.error)),
        code => Err(ProposeError::RejectedRemote(code, resp.error)),
    }
}
