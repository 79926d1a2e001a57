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

use crate::raft::membership::{MemberChange, MembershipError};
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
    /// Every voter and learner of the configuration as of `applied`.
    pub members: BTreeMap<u64, MemberInfo>,
    /// On the leader only: how far each member's log matches the leader's.
    pub progress: BTreeMap<u64, PeerProgress>,
}

impl NodeStatus {
    /// The status before the driver has published its first one.
    pub fn initial(id: u64, recovering: bool) -> NodeStatus {
        NodeStatus {
            id,
            role: Role::Follower,
            term: 0,
            leader: 0,
            commit: 0,
            applied: 0,
            snapshot_index: 0,
            recovering,
            members: BTreeMap::new(),
            progress: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub address: String,
    /// False for a learner (a member being added, still catching up).
    pub voter: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerProgress {
    /// Highest log index known to match the leader's.
    pub matched: u64,
    /// Heard from within an election timeout.
    pub live: bool,
}

/// State shared between the driver (writer) and the API (readers).
pub struct Shared {
    pub state: RwLock<State>,
    pub hub: WatchHub,
    pub status: watch::Sender<NodeStatus>,
    /// Event metrics (proposals, apply latency, snapshots, watch streams).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Why this member takes no part in the cluster now (its raft log cannot be
    /// written, e.g. a full disk), until it can write again; `None` normally.
    pub stalled: RwLock<Option<String>>,
}

/// What a member that takes no part says to every call but `cluster status`; the CLI
/// then asks another member (see overlayctl's `client::NOT_SERVING`).
pub const NOT_SERVING: &str = "is not serving";

impl Shared {
    /// `Some(message)` while this member takes no part (see [`Shared::stalled`]).
    pub fn not_serving(&self, id: u64) -> Option<String> {
        let why = self.stalled.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        Some(format!(
            "controller {id} {NOT_SERVING}: it cannot write its raft log ({why}); it takes part again by itself once it can: ask another member"
        ))
    }

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
    /// This member takes no part now (its raft log cannot be written); nothing was
    /// proposed, so another member may be asked.
    #[error("{0}")]
    Stalled(String),
}

/// Messages to the driver task.
pub enum DriverMsg {
    Raft(Box<raft::prelude::Message>),
    Propose {
        command: Command,
        reply: oneshot::Sender<ProposeReply>,
    },
    ReadIndex {
        reply: oneshot::Sender<()>,
    },
    /// On the leader: check and propose one membership change; answered once applied.
    /// `candidate_answers`: the member to be added answered the leader's probe.
    ChangeMembership {
        change: MemberChange,
        candidate_answers: bool,
        reply: oneshot::Sender<ChangeReply>,
    },
    /// A snapshot of the applied state for member `id`, which joins or lost its data.
    JoinSnapshot {
        id: u64,
        reply: oneshot::Sender<Result<JoinSnapshot, MembershipError>>,
    },
}

pub type ChangeReply = Result<(), ChangeError>;

/// Why a membership change did not happen (yet).
#[derive(Debug, Error)]
pub enum ChangeError {
    #[error("this member is not the leader")]
    NotLeader { leader: u64 },
    /// Refused by the rules in `raft::membership`; the state is unchanged.
    #[error("{0}")]
    Refused(MembershipError),
    /// Refused by the leader, carried back as status code and message.
    #[error("{1}")]
    RefusedRemote(tonic::Code, String),
    /// Nothing was changed, and asking again shortly will work (a change is being
    /// applied, leadership is moving).
    #[error("{0}")]
    Retry(String),
    /// The change may or may not happen.
    #[error("{0}")]
    Unavailable(String),
}

/// What a joining member starts from: a snapshot of the applied state (index 0 when the
/// cluster has applied nothing yet) and the commit index it must catch up to.
pub struct JoinSnapshot {
    pub snapshot: raft::prelude::Snapshot,
    pub commit: u64,
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
    /// A membership change refused with the reason; nothing changed.
    #[error("{0}")]
    Refused(String),
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
            ClusterError::Refused(m) => tonic::Status::failed_precondition(m),
        }
    }
}

/// Lazily connected gRPC channels to the other members, by member id. The member list
/// changes at runtime (membership changes, snapshots): the driver's transport keeps it
/// in step with the applied configuration through [`Peers::set`].
#[derive(Clone)]
pub struct Peers {
    inner: Arc<RwLock<BTreeMap<u64, PeerChannel>>>,
    /// How channels to members are made (TLS), also for members added later.
    dialer: Dialer,
}

struct PeerChannel {
    address: String,
    channel: Channel,
}

impl Peers {
    /// `dialer` carries this member's TLS settings (its controller certificate).
    pub fn new(addresses: &BTreeMap<u64, String>, dialer: &Dialer) -> anyhow::Result<Peers> {
        let mut map = BTreeMap::new();
        for (&id, address) in addresses {
            map.insert(
                id,
                PeerChannel { address: address.clone(), channel: Peers::connect(dialer, address)? },
            );
        }
        Ok(Peers { inner: Arc::new(RwLock::new(map)), dialer: dialer.clone() })
    }

    /// A Peer-service client on `channel`, sized for snapshots.
    pub fn client_on(channel: Channel) -> PeerClient<Channel> {
        PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Makes the member list `addresses`, keeping the channels of unchanged members.
    pub fn set(&self, addresses: &BTreeMap<u64, String>) {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|id, peer| addresses.get(id) == Some(&peer.address));
        for (&id, address) in addresses {
            if map.contains_key(&id) {
                continue;
            }
            match Peers::connect(&self.dialer, address) {
                Ok(channel) => {
                    map.insert(id, PeerChannel { address: address.clone(), channel });
                }
                // Addresses are checked before they are proposed; this is a bug or a
                // version skew, and the member stays unreachable from here.
                Err(e) => tracing::error!(id, address, error = %e, "unusable member address"),
            }
        }
    }

    pub fn addresses(&self) -> BTreeMap<u64, String> {
        let map = self.inner.read().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(&id, p)| (id, p.address.clone())).collect()
    }

    /// The one place a channel to a member (`IP:PORT`) is made.
    pub fn connect(dialer: &Dialer, address: &str) -> anyhow::Result<Channel> {
        let endpoint = dialer
            .endpoint(&format!("{}://{address}", dialer.scheme()))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        Ok(dialer.connect_lazy(endpoint))
    }

    pub fn client(&self, id: u64) -> Option<PeerClient<Channel>> {
        let map = self.inner.read().unwrap_or_else(|p| p.into_inner());
        map.get(&id).map(|p| Peers::client_on(p.channel.clone()))
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
        use crate::metrics::Outcome;
        let started = std::time::Instant::now();
        let result = self.propose_once(command).await;
        let outcome = match &result {
            Ok(_) => Outcome::Committed,
            Err(ClusterError::Rejected(_) | ClusterError::RejectedRemote(..)) => Outcome::Rejected,
            Err(ClusterError::Unavailable(_) | ClusterError::Refused(_)) => Outcome::NoLeader,
            Err(ClusterError::OutcomeUnknown(_)) => Outcome::Unknown,
        };
        self.shared.metrics.proposal(outcome, started.elapsed());
        result
    }

    async fn propose_once(&self, command: Command) -> Result<Applied, ClusterError> {
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
                Err(ProposeError::Stalled(msg)) => return Err(ClusterError::Unavailable(msg)),
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
        if let Some(why) = self.shared.not_serving(self.id) {
            return Err(ClusterError::Unavailable(why));
        }
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

impl Cluster {
    /// Asks this member's driver to make a membership change (it must lead). A member to
    /// be added is probed first: whether it answers counts towards quorum.
    pub async fn change_local(&self, change: MemberChange) -> ChangeReply {
        if self.status().role != Role::Leader {
            return Err(ChangeError::NotLeader { leader: self.status().leader });
        }
        let candidate_answers = match &change {
            MemberChange::AddLearner { id, address } => self.probe(*id, address).await?,
            _ => false,
        };
        let (reply, rx) = oneshot::channel();
        self.driver
            .send(DriverMsg::ChangeMembership { change, candidate_answers, reply })
            .await
            .map_err(|_| ChangeError::Unavailable("controller is shutting down".into()))?;
        match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(ChangeError::Unavailable("controller is shutting down".into())),
            Err(_) => Err(ChangeError::Unavailable(
                "timed out waiting for the membership change to commit; its outcome is unknown: \
                 check `overlayctl cluster status`"
                    .into(),
            )),
        }
    }

    /// Makes one membership change wherever the leader is, and waits until it applied.
    /// Retries (within [`PROPOSE_TIMEOUT`]) while no leader is known, leadership moves,
    /// or the previous change is still being applied; never re-sends a change whose
    /// outcome is unknown.
    pub async fn change_membership(&self, change: MemberChange) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let leader = self.status().leader;
            let attempt = if leader == self.id || leader == 0 {
                self.change_local(change.clone()).await
            } else {
                self.forward_change(leader, &change).await
            };
            let retry = match attempt {
                Ok(()) => return Ok(()),
                Err(ChangeError::Refused(e)) => return Err(ClusterError::Refused(e.to_string())),
                Err(ChangeError::RefusedRemote(code, m)) => {
                    return Err(ClusterError::RejectedRemote(code, m))
                }
                Err(ChangeError::Unavailable(m)) => return Err(ClusterError::OutcomeUnknown(m)),
                Err(ChangeError::NotLeader { .. }) => {
                    "no controller leader is available (is a majority of members up?)".to_string()
                }
                Err(ChangeError::Retry(m)) => m,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::Unavailable(format!(
                    "cannot {change} now: {retry}; nothing was changed"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether member `id` answers at `address` (a controller started with `--join`
    /// serves once it has its snapshot). Another member answering there is an error.
    async fn probe(&self, id: u64, address: &str) -> Result<bool, ChangeError> {
        let Ok(channel) = Peers::connect(&self.peers.dialer, address) else { return Ok(false) };
        let mut client = Peers::client_on(channel);
        let mut request = tonic::Request::new(pb::Empty {});
        request.set_timeout(Duration::from_secs(1));
        let answer =
            tokio::time::timeout(Duration::from_millis(1500), client.member_status(request)).await;
        match answer {
            Ok(Ok(resp)) => match resp.into_inner().member.map(|m| m.id) {
                Some(answered) if answered != id => {
                    Err(ChangeError::Refused(MembershipError::AddressAnswersAs {
                        address: address.to_string(),
                        answered,
                        id,
                    }))
                }
                answered => Ok(answered.is_some()),
            },
            _ => Ok(false),
        }
    }

    async fn forward_change(&self, leader: u64, change: &MemberChange) -> ChangeReply {
        let Some(mut client) = self.peers.client(leader) else {
            return Err(ChangeError::NotLeader { leader: 0 });
        };
        let (id, address, remove) = match change {
            MemberChange::AddLearner { id, address } => (*id, address.clone(), false),
            MemberChange::Remove { id } => (*id, String::new(), true),
            // The leader promotes learners on its own; nobody forwards that.
            MemberChange::Promote { .. } => {
                return Err(ChangeError::Unavailable("promotions are not forwarded".into()))
            }
        };
        let mut request = tonic::Request::new(pb::MembershipChange { id, address, remove });
        request.set_timeout(PROPOSE_TIMEOUT);
        match client.change_membership(request).await {
            Ok(_) => Ok(()),
            Err(status) if is_not_sent(&status) => Err(ChangeError::NotLeader { leader: 0 }),
            Err(status) => Err(change_error_from_status(&status)),
        }
    }

    /// A snapshot of this member's applied state, for a member that joins.
    pub async fn join_snapshot(&self, id: u64) -> Result<JoinSnapshot, ClusterError> {
        let (reply, rx) = oneshot::channel();
        self.driver
            .send(DriverMsg::JoinSnapshot { id, reply })
            .await
            .map_err(|_| ClusterError::Unavailable("controller is shutting down".into()))?;
        match tokio::time::timeout(READ_TIMEOUT, rx).await {
            Ok(Ok(Ok(snapshot))) => Ok(snapshot),
            Ok(Ok(Err(e))) => Err(ClusterError::Refused(e.to_string())),
            _ => Err(ClusterError::Unavailable("controller is shutting down".into())),
        }
    }
}

/// How the Peer service answers a forwarded membership change that failed.
pub fn change_error_status(e: ChangeError) -> tonic::Status {
    match e {
        // Retryable on the caller's side: nothing changed.
        ChangeError::NotLeader { .. } | ChangeError::Retry(_) => {
            tonic::Status::aborted(e.to_string())
        }
        ChangeError::Refused(e) => tonic::Status::failed_precondition(e.to_string()),
        ChangeError::RefusedRemote(code, m) => tonic::Status::new(code, m),
        ChangeError::Unavailable(m) => tonic::Status::unavailable(m),
    }
}

fn change_error_from_status(status: &tonic::Status) -> ChangeError {
    let message = status.message().to_string();
    match status.code() {
        tonic::Code::Aborted => ChangeError::Retry(message),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            ChangeError::Unavailable(format!(
                "the leader did not answer ({message}); the change's outcome is unknown: check \
                 `overlayctl cluster status`"
            ))
        }
        code => ChangeError::RefusedRemote(code, message),
    }
}

/// A status that proves the request never reached the peer's handler: the connection
/// could not be made (refused, no route, TLS refused), the peer said it is not leader,
/// or hyper never handed the request to a connection that closed under it.
pub fn is_not_sent(status: &tonic::Status) -> bool {
    // hyper reports "canceled" only for a request it never handed to the connection
    // (the connection closed first: the peer just died); one that was written and then
    // lost its connection fails differently. A client timeout is "Timeout expired".
    if status.code() == tonic::Code::Cancelled && status.message() == "operation was canceled" {
        return true;
    }
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
        // As "not the leader": the forwarding member retries (a new leader is elected).
        Err(ProposeError::Stalled(msg)) => pb::ProposeResponse {
            applied: Vec::new(),
            error: msg,
            code: tonic::Code::Aborted as i32,
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
