//! The driver task: the only owner of the raft `RawNode`.
//!
//! One loop ticks the node, steps peer messages, batches client proposals into log
//! entries, and handles each `Ready` in the order raft-rs prescribes: send messages;
//! apply a snapshot; apply committed entries; persist entries and hard state and fsync;
//! only then send the messages that depend on them; advance. A client is answered when
//! its command is applied, which on the leader happens after a majority (including
//! durable copies) holds the entry — an acknowledged write survives any single failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use overlay_model::{Command, State};
use raft::prelude::*;
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::proposal::{EntryBatch, Proposal};
use super::storage::DiskStorage;
use super::transport::Transport;
use crate::cluster::{DriverMsg, NodeStatus, ProposeError, ProposeReply, Role, Shared};

/// 100 ms ticks: heartbeats every tick, elections after 1–2 s of silence.
pub const TICK: Duration = Duration::from_millis(100);
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 1;
/// Most messages drained from the inbox before handling a Ready: bounds latency while
/// still batching many proposals into one entry.
const MAX_DRAIN: usize = 4096;

#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub id: u64,
    /// Take a snapshot and compact the log every this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, to catch up slow followers cheaply.
    pub keep_entries: u64,
}

pub struct Driver {
    config: DriverConfig,
    node: RawNode<DiskStorage>,
    inbox: mpsc::Receiver<DriverMsg>,
    transport: Transport,
    shared: Arc<Shared>,
    incarnation: u64,
    next_seq: u64,
    /// Commands received since the last Ready, proposed together as one entry.
    batch: Vec<(Command, oneshot::Sender<ProposeReply>)>,
    /// Waiting clients by sequence number, answered when their entry applies.
    pending: HashMap<u64, oneshot::Sender<ProposeReply>>,
    /// Read requests received since the last Ready, confirmed with one ReadIndex.
    reads: Vec<oneshot::Sender<()>>,
    next_read: u64,
    /// ReadIndex requests in flight, by context.
    reads_in_flight: HashMap<u64, Vec<oneshot::Sender<()>>>,
    /// Reads confirmed at a commit index, released once applied reaches it.
    reads_confirmed: Vec<(u64, oneshot::Sender<()>)>,
    applied: u64,
    last_snapshot: u64,
    conf_state: ConfState,
    /// See `NodeStatus::recovering`: no votes, no campaigns until caught up to this commit.
    recovering_until: Option<u64>,
    heard_leader: bool,
    /// This process opened an empty data dir (first boot or a wiped member).
    started_empty: bool,
}

impl Driver {
    /// Opens the node on `storage`, restoring the state machine from its snapshot.
    pub fn new(
        config: DriverConfig,
        storage: DiskStorage,
        inbox: mpsc::Receiver<DriverMsg>,
        transport: Transport,
        shared: Arc<Shared>,
        recovering_until: Option<u64>,
    ) -> anyhow::Result<Driver> {
        let raft_state = raft::Storage::initial_state(&storage)?;
        let started_empty = storage.is_fresh();
        let applied = storage.snapshot_metadata().index;
        let raft_config = raft::Config {
            id: config.id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied,
            max_size_per_msg: 4 * 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let node = RawNode::new(&raft_config, storage, &super::slog_bridge::logger())?;
        let incarnation =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Ok(Driver {
            config,
            node,
            inbox,
            transport,
            shared,
            incarnation,
            next_seq: 0,
            batch: Vec::new(),
            pending: HashMap::new(),
            reads: Vec::new(),
            next_read: 0,
            reads_in_flight: HashMap::new(),
            reads_confirmed: Vec::new(),
            applied,
            last_snapshot: applied,
            conf_state: raft_state.conf_state,
            recovering_until,
            heard_leader: false,
            started_empty,
        })
    }

    /// Runs until `shutdown` flips or the inbox closes. An error means the log could not
    /// be persisted: the member must stop rather than acknowledge writes it may lose.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        self.publish_status();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if self.recovering_until.is_none() {
                        self.node.tick();
                    }
                }
                _ = housekeeping.tick() => self.housekeeping(),
                msg = self.inbox.recv() => {
                    let Some(msg) = msg else { break };
                    self.handle(msg);
                    for _ in 0..MAX_DRAIN {
                        match self.inbox.try_recv() {
                            Ok(msg) => self.handle(msg),
                            Err(_) => break,
                        }
                    }
                }
                _ = shutdown.changed() => break,
            }
            self.flush_batch();
            self.flush_reads();
            if self.node.has_ready() {
                self.on_ready()?;
            }
            self.check_recovered();
            self.abandon_pending_if_deposed();
            self.publish_status();
        }
        // Everything persisted was fsynced in on_ready; nothing is buffered here.
        info!(id = self.config.id, applied = self.applied, "raft driver stopped");
        Ok(())
    }

    fn handle(&mut self, msg: DriverMsg) {
        match msg {
            DriverMsg::Raft(m) => self.step(*m),
            DriverMsg::Propose { command, reply } => {
                if self.node.raft.state == StateRole::Leader
                    && self.node.raft.lead_transferee.is_none()
                {
                    self.batch.push((command, reply));
                } else {
                    let _ = reply
                        .send(Err(ProposeError::NotLeader { leader: self.node.raft.leader_id }));
                }
            }
            DriverMsg::ReadIndex { reply } => self.reads.push(reply),
        }
    }

    fn step(&mut self, mut m: Message) {
        // A leader remembers how far a member's log reached before that member lost its
        // disk, and its heartbeats may carry a commit index beyond the now-empty log,
        // which raft-rs treats as a fatal invariant violation. The member can only commit
        // what it holds, so cap it; entries arrive by the usual append probing.
        if self.started_empty && m.get_msg_type() == MessageType::MsgHeartbeat {
            let last = self.node.raft.raft_log.last_index();
            if m.commit > last {
                m.commit = last;
            }
        }
        if self.recovering_until.is_some() {
            match m.get_msg_type() {
                // Votes are what a wiped member could give twice in one term.
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => {
                    debug!(from = m.from, "recovering: ignoring vote request");
                    return;
                }
                MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot => {
                    self.heard_leader = true;
                }
                _ => {}
            }
        }
        if let Err(e) = self.node.step(m) {
            debug!(error = %e, "raft rejected a message");
        }
    }

    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut proposals = Vec::with_capacity(self.batch.len());
        let mut waiters = Vec::with_capacity(self.batch.len());
        for (command, reply) in self.batch.drain(..) {
            self.next_seq += 1;
            proposals.push(Proposal {
                origin: self.config.id,
                incarnation: self.incarnation,
                seq: self.next_seq,
                command,
            });
            waiters.push((self.next_seq, reply));
        }
        let data = EntryBatch { proposals }.encode();
        match self.node.propose(Vec::new(), data) {
            Ok(()) => self.pending.extend(waiters),
            Err(e) => {
                warn!(error = %e, "proposal dropped");
                for (_, reply) in waiters {
                    let _ = reply
                        .send(Err(ProposeError::NotLeader { leader: self.node.raft.leader_id }));
                }
            }
        }
    }

    fn flush_reads(&mut self) {
        if self.reads.is_empty() {
            return;
        }
        self.next_read += 1;
        let ctx = self.next_read;
        self.reads_in_flight.insert(ctx, std::mem::take(&mut self.reads));
        self.node.read_index(ctx.to_be_bytes().to_vec());
    }

    fn on_ready(&mut self) -> anyhow::Result<()> {
        let mut ready = self.node.ready();
        // The leader holds a member in "snapshot" state until told the snapshot went
        // out; without the report a member that lost its disk stays paused forever.
        // Reporting Finish even if the transport later drops the message is safe: the
        // leader falls back to probing and sends the snapshot again.
        let snapshots_to: Vec<u64> = ready
            .messages()
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(snapshot)?;
        }
        self.apply_entries(ready.take_committed_entries());
        if !ready.entries().is_empty() {
            self.node.mut_store().append(ready.entries()).context("appending raft entries")?;
        }
        if let Some(hs) = ready.hs() {
            self.node.mut_store().set_hard_state(hs).context("persisting raft hard state")?;
        }
        if ready.must_sync() || !ready.entries().is_empty() || ready.hs().is_some() {
            self.node.mut_store().sync().context("syncing the raft log")?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        for rs in ready.take_read_states() {
            self.read_confirmed(rs);
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit).context("persisting the commit index")?;
        }
        self.transport.send(light.take_messages());
        self.apply_entries(light.take_committed_entries());
        self.node.advance_apply();
        for to in snapshots_to {
            self.node.report_snapshot(to, raft::SnapshotStatus::Finish);
        }
        self.release_reads();
        self.maybe_snapshot()?;
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> anyhow::Result<()> {
        let meta = snapshot.get_metadata().clone();
        let state = State::from_bytes(snapshot.get_data())
            .map_err(|e| anyhow::anyhow!("snapshot from the leader is unreadable: {e}"))?;
        self.node
            .mut_store()
            .apply_snapshot(snapshot)
            .context("persisting a snapshot from the leader")?;
        let revision = state.catalog.revision;
        {
            let mut guard = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
            *guard = state;
            self.shared.hub.reset(revision);
        }
        self.applied = meta.index;
        self.last_snapshot = meta.index;
        self.conf_state = meta.get_conf_state().clone();
        info!(index = meta.index, term = meta.term, revision, "installed snapshot from the leader");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let mut state = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal if !entry.data.is_empty() => {
                    match EntryBatch::decode(&entry.data) {
                        Ok(batch) => {
                            for p in batch.proposals {
                                let result = state.apply(&p.command);
                                if let Ok(applied) = &result {
                                    if !applied.changes.is_empty() {
                                        self.shared.hub.publish(applied.clone());
                                    }
                                }
                                if p.origin == self.config.id && p.incarnation == self.incarnation {
                                    if let Some(reply) = self.pending.remove(&p.seq) {
                                        let _ = reply.send(result.map_err(ProposeError::Rejected));
                                    }
                                }
                            }
                        }
                        // Every member decodes the same bytes the same way, so skipping keeps
                        // replicas identical; this can only be a bug or a version skew.
                        Err(e) => {
                            error!(index = entry.index, error = %e, "skipping undecodable raft entry")
                        }
                    }
                }
                EntryType::EntryNormal => {} // the empty entry a new leader appends
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    warn!(
                        index = entry.index,
                        "membership changes are not supported yet; entry ignored"
                    );
                }
            }
            self.applied = entry.index;
        }
    }

    fn read_confirmed(&mut self, rs: raft::ReadState) {
        let ctx = <[u8; 8]>::try_from(rs.request_ctx.as_slice()).map(u64::from_be_bytes).ok();
        if let Some(waiters) = ctx.and_then(|c| self.reads_in_flight.remove(&c)) {
            self.reads_confirmed.extend(waiters.into_iter().map(|w| (rs.index, w)));
        }
    }

    fn release_reads(&mut self) {
        if self.reads_confirmed.is_empty() {
            return;
        }
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_confirmed)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_confirmed = waiting;
        for (_, reply) in ready {
            let _ = reply.send(());
        }
    }

    fn check_recovered(&mut self) {
        if let Some(until) = self.recovering_until {
            if self.heard_leader && self.applied >= until {
                info!(applied = self.applied, "caught up from the leader: voting again");
                self.recovering_until = None;
            }
        }
    }

    fn maybe_snapshot(&mut self) -> anyhow::Result<()> {
        if self.applied < self.last_snapshot + self.config.snapshot_every {
            return Ok(());
        }
        let data = self.shared.read_state().to_bytes();
        let size = data.len();
        self.node
            .mut_store()
            .compact(self.applied, self.conf_state.clone(), data, self.config.keep_entries)
            .context("writing a snapshot")?;
        self.last_snapshot = self.applied;
        info!(index = self.applied, bytes = size, "snapshot taken, log compacted");
        Ok(())
    }

    /// A member that lost leadership cannot tell whether its pending entries will be
    /// committed by the next leader: tell those clients now instead of at the timeout.
    fn abandon_pending_if_deposed(&mut self) {
        if self.pending.is_empty() || self.node.raft.state == StateRole::Leader {
            return;
        }
        warn!(
            pending = self.pending.len(),
            "lost leadership with writes in flight; their outcome is unknown"
        );
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(ProposeError::Unavailable(
                "the leader stepped down before the write committed; its outcome is unknown".into(),
            )));
        }
    }

    /// Drops waiters whose clients gave up, so abandoned requests do not accumulate.
    fn housekeeping(&mut self) {
        self.pending.retain(|_, reply| !reply.is_closed());
        self.reads_in_flight.retain(|_, waiters| {
            waiters.retain(|w| !w.is_closed());
            !waiters.is_empty()
        });
        self.reads_confirmed.retain(|(_, w)| !w.is_closed());
    }

    fn publish_status(&self) {
        let raft = &self.node.raft;
        let status = NodeStatus {
            id: self.config.id,
            role: match raft.state {
                StateRole::Leader => Role::Leader,
                StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
                StateRole::Follower => Role::Follower,
            },
            term: raft.term,
            leader: raft.leader_id,
            commit: raft.raft_log.committed,
            applied: self.applied,
            snapshot_index: self.last_snapshot,
            recovering: self.recovering_until.is_some(),
        };
        self.shared.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }
}
