//! The driver task: the only owner of the raft `RawNode`.
//!
//! One loop ticks the node, steps peer messages, batches client proposals into log
//! entries, and handles each `Ready` in the order raft-rs prescribes: send messages;
//! apply a snapshot; apply committed entries; persist entries and hard state and fsync;
//! only then send the messages that depend on them; advance. A client is answered when
//! its command is applied, which on the leader happens after a majority (including
//! durable copies) holds the entry — an acknowledged write survives any single failure.
//!
//! The loop itself ([`Driver::run`]) only waits for the next event; the work is in
//! [`Driver::tick`], [`Driver::handle`] and [`Driver::process`], which a test can call
//! directly to drive several drivers over a simulated network ([`super::sim`]).
//!
//! Membership changes ([`super::membership`]) are raft configuration changes proposed by
//! the leader one at a time: applied with `apply_conf_change`, their `ConfState` kept in
//! every snapshot (changes after the last snapshot are in the log and applied again on
//! restart), the addresses they carry kept beside the state in snapshots.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use overlay_model::Command;
use protobuf::Message as _;
use raft::prelude::*;
use raft::{ProgressState, RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::membership::{self, Decision, MemberChange, Membership, MembershipError, View};
use super::proposal::{EntryBatch, Proposal};
use super::storage::DiskStorage;
use super::transport::Outbox;
use crate::cluster::{
    ChangeError, ChangeReply, DriverMsg, JoinSnapshot, MemberInfo, NodeStatus, PeerProgress,
    ProposeError, ProposeReply, Role, Shared,
};

/// 100 ms ticks: heartbeats every tick, elections after 1–2 s of silence.
pub const TICK: Duration = Duration::from_millis(100);
pub const ELECTION_TICKS: usize = 10;
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
    /// Tests only: an election timeout of exactly this many ticks instead of raft's
    /// random one, so that a seeded simulation replays exactly. `None` in production.
    pub fixed_election_ticks: Option<usize>,
}

pub struct Driver {
    config: DriverConfig,
    node: RawNode<DiskStorage>,
    outbox: Box<dyn Outbox>,
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
    /// The configuration as of `applied`.
    conf_state: ConfState,
    /// Member addresses as of `applied`.
    membership: Membership,
    /// The membership change this member proposed and a client waits for.
    change_waiter: Option<(MemberChange, oneshot::Sender<ChangeReply>)>,
    /// Ticks since start, and the tick each peer was last heard from: who is reachable.
    ticks: u64,
    last_heard: HashMap<u64, u64>,
    /// See `NodeStatus::recovering`: no votes, no campaigns until caught up to this commit.
    recovering_until: Option<u64>,
    heard_leader: bool,
    /// This process opened an empty data dir (first boot, a wiped member, a joiner).
    started_empty: bool,
}

impl Driver {
    /// Opens the node on `storage`, whose snapshot `state` and `membership` were restored
    /// from (see [`super::restore`]).
    pub fn new(
        config: DriverConfig,
        storage: DiskStorage,
        outbox: Box<dyn Outbox>,
        shared: Arc<Shared>,
        membership: Membership,
        recovering_until: Option<u64>,
    ) -> anyhow::Result<Driver> {
        let raft_state = raft::Storage::initial_state(&storage)?;
        let started_empty = storage.is_fresh();
        let applied = storage.snapshot_metadata().index;
        let (min_election_tick, max_election_tick) = match config.fixed_election_ticks {
            Some(t) => (t, t + 1),
            None => (0, 0), // raft's default: [election_tick, 2 * election_tick)
        };
        let raft_config = raft::Config {
            id: config.id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            min_election_tick,
            max_election_tick,
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
        let mut driver = Driver {
            config,
            node,
            outbox,
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
            membership,
            change_waiter: None,
            ticks: 0,
            last_heard: HashMap::new(),
            recovering_until,
            heard_leader: false,
            started_empty,
        };
        driver.membership_changed();
        Ok(driver)
    }

    /// Runs until `shutdown` flips or the inbox closes. An error means the log could not
    /// be persisted: this driver must stop rather than acknowledge writes it may lose
    /// (the caller keeps the inbox, and the member stalls until it can write again: see
    /// [`super::stall`]).
    pub async fn run(
        mut self,
        inbox: &mut mpsc::Receiver<DriverMsg>,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        // Applies what the log holds beyond the snapshot (conf changes included) before
        // the first tick can start an election in an outdated configuration.
        overlay_ops::blocking::off_the_runtime(|| self.process())?;
        loop {
            tokio::select! {
                _ = ticker.tick() => self.tick(),
                _ = housekeeping.tick() => overlay_ops::blocking::off_the_runtime(|| self.housekeeping()),
                msg = inbox.recv() => {
                    let Some(msg) = msg else { break };
                    self.handle(msg);
                    for _ in 0..MAX_DRAIN {
                        match inbox.try_recv() {
                            Ok(msg) => self.handle(msg),
                            Err(_) => break,
                        }
                    }
                }
                _ = shutdown.changed() => break,
            }
            overlay_ops::blocking::off_the_runtime(|| self.process())?;
        }
        // Everything persisted was fsynced in on_ready; nothing is buffered here.
        info!(id = self.config.id, applied = self.applied, "raft driver stopped");
        Ok(())
    }

    /// One clock tick (every [`TICK`]).
    pub fn tick(&mut self) {
        self.ticks += 1;
        if self.recovering_until.is_none() {
            self.node.tick();
        }
    }

    /// Takes one message from a peer or a client. Call [`process`](Self::process) after
    /// a batch of these.
    pub fn handle(&mut self, msg: DriverMsg) {
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
            DriverMsg::ChangeMembership { change, candidate_answers, reply } => {
                self.change_membership(change, candidate_answers, reply)
            }
            DriverMsg::JoinSnapshot { id, reply } => {
                let _ = reply.send(self.join_snapshot(id));
            }
        }
    }

    /// Does what the events since the last call require: proposes batched writes, asks
    /// for read confirmations, handles the Ready, publishes the status. An error means
    /// the log could not be persisted (see [`run`](Self::run)).
    pub fn process(&mut self) -> anyhow::Result<()> {
        self.flush_batch();
        self.flush_reads();
        self.maybe_promote();
        if self.node.has_ready() {
            self.on_ready()?;
        }
        self.check_recovered();
        self.abandon_pending_if_deposed();
        self.publish_status();
        Ok(())
    }

    fn step(&mut self, mut m: Message) {
        // A removed member that never learnt of its removal still believes it votes and
        // may campaign; granting it votes could let it lead a configuration it is not in.
        if self.membership.removed.contains(&m.from) {
            debug!(from = m.from, "message from a removed member dropped");
            return;
        }
        if m.from != 0 {
            self.last_heard.insert(m.from, self.ticks);
        }
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
            self.outbox.send(ready.take_messages());
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
            self.outbox.send(ready.take_persisted_messages());
        }
        for rs in ready.take_read_states() {
            self.read_confirmed(rs);
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit).context("persisting the commit index")?;
        }
        self.outbox.send(light.take_messages());
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
        self.shared.metrics.snapshot(false, snapshot.get_data().len());
        let (replicated, state) = super::snapshot::decode(snapshot.get_data())
            .map_err(|e| anyhow::anyhow!("snapshot from the leader is unreadable: {e}"))?;
        self.node
            .mut_store()
            .apply_snapshot(snapshot)
            .context("persisting a snapshot from the leader")?;
        let revision = state.catalog.revision;
        {
            let mut guard = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
            *guard = state;
            self.shared.hub.reset(&guard.catalog);
        }
        self.applied = meta.index;
        self.last_snapshot = meta.index;
        self.conf_state = meta.get_conf_state().clone();
        // A snapshot from before membership changes existed carries no addresses: keep
        // the ones this member knows.
        let known = std::mem::take(&mut self.membership);
        self.membership =
            Membership::with_fallback(replicated, conf_members(&self.conf_state), &known.addresses);
        self.membership.retain(&conf_members(&self.conf_state));
        self.membership_changed();
        info!(index = meta.index, term = meta.term, revision, "installed snapshot from the leader");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal if !entry.data.is_empty() => self.apply_batch(&entry),
                EntryType::EntryNormal => {} // the empty entry a new leader appends
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&entry)
                }
            }
            self.applied = entry.index;
        }
    }

    fn apply_batch(&mut self, entry: &Entry) {
        let batch = match EntryBatch::decode(&entry.data) {
            Ok(batch) => batch,
            // Every member decodes the same bytes the same way, so skipping keeps
            // replicas identical; this can only be a bug or a version skew.
            Err(e) => {
                error!(index = entry.index, error = %e, "skipping undecodable raft entry");
                return;
            }
        };
        let started = std::time::Instant::now();
        let mut state = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
        for p in batch.proposals {
            let result = state.apply(&p.command);
            if let Ok(applied) = &result {
                if !applied.changes.is_empty() {
                    self.shared.hub.publish(applied);
                }
            }
            if p.origin == self.config.id && p.incarnation == self.incarnation {
                if let Some(reply) = self.pending.remove(&p.seq) {
                    let _ = reply.send(result.map_err(ProposeError::Rejected));
                }
            }
        }
        drop(state);
        self.shared.metrics.applied(started.elapsed());
    }

    fn apply_conf_change(&mut self, entry: &Entry) {
        let cc = if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
            ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| e.to_string())
        } else {
            // This member only proposes V2; a V1 change is one single change.
            ConfChange::parse_from_bytes(&entry.data)
                .map(|v1| {
                    let mut single = ConfChangeSingle { node_id: v1.node_id, ..Default::default() };
                    single.set_change_type(v1.get_change_type());
                    let mut v2 = ConfChangeV2::default();
                    v2.set_changes(vec![single].into());
                    v2.context = v1.context;
                    v2
                })
                .map_err(|e| e.to_string())
        };
        let cc = match cc {
            Ok(cc) => cc,
            Err(e) => {
                error!(index = entry.index, error = %e, "skipping undecodable conf change");
                return;
            }
        };
        let change = MemberChange::decode(&cc.context).ok();
        match self.node.apply_conf_change(&cc) {
            Ok(conf_state) => self.conf_state = conf_state,
            Err(e) => {
                // raft-rs changed nothing; every member refuses the same entry alike.
                warn!(index = entry.index, error = %e, "configuration change refused by raft");
                self.answer_change(change.as_ref(), Err(ChangeError::Unavailable(e.to_string())));
                return;
            }
        }
        if let Some(change) = &change {
            self.membership.apply(change);
            info!(
                index = entry.index,
                change = %change,
                voters = ?self.conf_state.voters,
                learners = ?self.conf_state.learners,
                "membership changed"
            );
            if *change == (MemberChange::Remove { id: self.config.id }) {
                warn!("this member was removed from the cluster: stop it and wipe its data dir");
            }
        }
        self.membership.retain(&conf_members(&self.conf_state));
        self.membership_changed();
        self.answer_change(change.as_ref(), Ok(()));
    }

    fn answer_change(&mut self, change: Option<&MemberChange>, result: ChangeReply) {
        if let (Some(change), Some((waiting, _))) = (change, &self.change_waiter) {
            if change == waiting {
                if let Some((_, reply)) = self.change_waiter.take() {
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Tells the transport and the API about the (new) member list.
    fn membership_changed(&mut self) {
        self.outbox.set_members(&self.membership.addresses);
    }

    /// What the leader knows about the configuration and who is reachable and caught up.
    fn view(&self) -> View {
        let raft = &self.node.raft;
        let committed = raft.raft_log.committed;
        let mut live = BTreeSet::from([self.config.id]);
        let mut caught_up = BTreeSet::from([self.config.id]);
        for (&id, pr) in raft.prs().iter() {
            let heard = self
                .last_heard
                .get(&id)
                .is_some_and(|&t| self.ticks.saturating_sub(t) <= ELECTION_TICKS as u64);
            if heard {
                live.insert(id);
            }
            if pr.state == ProgressState::Replicate
                && pr.matched + membership::CATCH_UP_SLACK >= committed
            {
                caught_up.insert(id);
            }
        }
        View {
            voters: self.conf_state.voters.iter().copied().collect(),
            learners: self.conf_state.learners.iter().copied().collect(),
            live,
            caught_up,
            pending_conf: raft.has_pending_conf() || self.change_waiter.is_some(),
        }
    }

    fn change_membership(
        &mut self,
        change: MemberChange,
        candidate_answers: bool,
        reply: oneshot::Sender<ChangeReply>,
    ) {
        if self.node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(ChangeError::NotLeader { leader: self.node.raft.leader_id }));
            return;
        }
        if self.node.raft.lead_transferee.is_some() {
            let _ = reply.send(Err(ChangeError::Retry("leadership is being transferred".into())));
            return;
        }
        let mut view = self.view();
        if candidate_answers {
            view.live.insert(change.id());
        }
        let decision = match membership::check(&view, &self.membership, &change) {
            Ok(d) => d,
            Err(MembershipError::ChangeInProgress) => {
                let _ = reply
                    .send(Err(ChangeError::Retry(MembershipError::ChangeInProgress.to_string())));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(ChangeError::Refused(e)));
                return;
            }
        };
        let change = match decision {
            Decision::AlreadyDone => {
                let _ = reply.send(Ok(()));
                return;
            }
            Decision::Propose(change) => change,
        };
        // A leader that removes itself keeps leading a configuration it is not in
        // (raft-rs leaves that case unhandled): hand leadership over first, and let the
        // caller retry on the new leader.
        if change == (MemberChange::Remove { id: self.config.id }) {
            let matched: BTreeMap<u64, u64> =
                self.node.raft.prs().iter().map(|(&id, pr)| (id, pr.matched)).collect();
            match membership::transfer_target(&view, self.config.id, &matched) {
                Some(target) => {
                    info!(to = target, "removing myself: transferring leadership first");
                    self.node.transfer_leader(target);
                    let _ = reply.send(Err(ChangeError::Retry(format!(
                        "transferring leadership to member {target} first"
                    ))));
                }
                None => {
                    let _ = reply.send(Err(ChangeError::Unavailable(format!(
                        "cannot remove member {}: it leads and no other voter is reachable and \
                         caught up to take over",
                        self.config.id
                    ))));
                }
            }
            return;
        }
        if let Err(e) = self.propose_change(&change) {
            let _ = reply.send(Err(ChangeError::Unavailable(e)));
            return;
        }
        self.change_waiter = Some((change, reply));
    }

    fn propose_change(&mut self, change: &MemberChange) -> Result<(), String> {
        let cc = change.to_conf_change();
        match self.node.propose_conf_change(change.encode(), cc) {
            Ok(()) => {
                info!(change = %change, "proposed a membership change");
                Ok(())
            }
            Err(e) => {
                warn!(change = %change, error = %e, "membership change not proposed");
                Err(e.to_string())
            }
        }
    }

    /// The leader makes a learner a voter once it has caught up.
    fn maybe_promote(&mut self) {
        if self.node.raft.state != StateRole::Leader
            || self.conf_state.learners.is_empty()
            || self.node.raft.lead_transferee.is_some()
        {
            return;
        }
        let view = self.view();
        if view.pending_conf {
            return;
        }
        if let Some(change) = membership::next_promotion(&view, &self.membership) {
            let _ = self.propose_change(&change);
        }
    }

    /// A snapshot of the applied state for a member that joins (or lost its data dir).
    fn join_snapshot(&self, id: u64) -> Result<JoinSnapshot, MembershipError> {
        if self.membership.removed.contains(&id) {
            return Err(MembershipError::IdRemoved(id));
        }
        let mut snapshot = Snapshot::default();
        if self.applied > 0 {
            let data = super::snapshot::encode(&self.membership, &self.shared.read_state());
            snapshot.data = data.into();
            let meta = snapshot.mut_metadata();
            meta.index = self.applied;
            // `applied` is at or after the snapshot, whose term the log's base keeps.
            meta.term = self.node.raft.raft_log.term(self.applied).unwrap_or(0);
            meta.set_conf_state(self.conf_state.clone());
        }
        Ok(JoinSnapshot { snapshot, commit: self.node.raft.raft_log.committed })
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
        let data = super::snapshot::encode(&self.membership, &self.shared.read_state());
        let size = data.len();
        self.node
            .mut_store()
            .compact(self.applied, self.conf_state.clone(), data, self.config.keep_entries)
            .context("writing a snapshot")?;
        self.last_snapshot = self.applied;
        self.shared.metrics.snapshot(true, size);
        info!(index = self.applied, bytes = size, "snapshot taken, log compacted");
        Ok(())
    }

    /// A member that lost leadership cannot tell whether its pending entries will be
    /// committed by the next leader: tell those clients now instead of at the timeout.
    fn abandon_pending_if_deposed(&mut self) {
        if self.node.raft.state == StateRole::Leader {
            return;
        }
        if let Some((change, reply)) = self.change_waiter.take() {
            warn!(change = %change, "lost leadership with a membership change in flight");
            let _ = reply.send(Err(ChangeError::Unavailable(format!(
                "the leader stepped down before the change ({change}) was applied; its outcome \
                 is unknown: check `overlayctl cluster status`"
            ))));
        }
        if self.pending.is_empty() {
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
    pub fn housekeeping(&mut self) {
        self.pending.retain(|_, reply| !reply.is_closed());
        self.reads_in_flight.retain(|_, waiters| {
            waiters.retain(|w| !w.is_closed());
            !waiters.is_empty()
        });
        self.reads_confirmed.retain(|(_, w)| !w.is_closed());
    }

    fn publish_status(&self) {
        let raft = &self.node.raft;
        let leader = raft.state == StateRole::Leader;
        let members = self
            .membership
            .addresses
            .iter()
            .map(|(&id, address)| {
                let voter = self.conf_state.voters.contains(&id);
                (id, MemberInfo { address: address.clone(), voter })
            })
            .collect();
        let progress = if leader {
            let view = self.view();
            raft.prs()
                .iter()
                .map(|(&id, pr)| {
                    let matched =
                        if id == self.config.id { raft.raft_log.last_index() } else { pr.matched };
                    (id, PeerProgress { matched, live: view.live.contains(&id) })
                })
                .collect()
        } else {
            BTreeMap::new()
        };
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
            members,
            progress,
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

/// Voters and learners of a configuration.
pub fn conf_members(cs: &ConfState) -> BTreeSet<u64> {
    cs.voters.iter().chain(cs.learners.iter()).copied().collect()
}
