//! Deterministic simulated-network tests of the raft driver, in the spirit of raft-rs'
//! own harness (`harness/src/network.rs`): several real [`Driver`]s, each on its real
//! [`DiskStorage`] in a temporary directory, wired through a network simulated here.
//! The network drops, delays (and so reorders), cuts links and isolates members;
//! members crash (the driver is dropped: what it fsynced survives), restart, lose their
//! data dir and come back from a peer's snapshot, join and leave.
//!
//! Nothing here reads a clock or sleeps: time is a tick counter, every random choice
//! comes from one seeded generator, raft's random election timeout is replaced by a
//! per-member one drawn from that generator, and each member's outgoing messages are
//! sorted by destination (raft-rs builds some from a HashMap). So a seed replays exactly
//! (`same_seed_replays_the_same_run`), and a failing seed can be debugged.
//!
//! Checked: at most one leader per term, ever; a leader cut off from the others steps
//! down (check_quorum) and acknowledges no write proposed after the cut; the majority
//! elects a new leader and goes on; after healing every acknowledged write is on every
//! member and all members converge to the same state digest; restarts with and without
//! the data dir keep every acknowledged write; membership changes keep all of that, and
//! a removed member that never learnt of its removal cannot take over (it did, before
//! members dropped its messages: `a_removed_member_that_missed_its_removal_cannot_take_over`).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use overlay_model::Command;
use raft::prelude::Message;
use tokio::sync::oneshot::{self, error::TryRecvError};
use tokio::sync::watch;

use super::driver::{Driver, DriverConfig, ELECTION_TICKS};
use super::membership::{MemberChange, MembershipError};
use super::storage::DiskStorage;
use super::transport::Outbox;
use crate::cluster::{ChangeError, ChangeReply, DriverMsg, NodeStatus, ProposeReply, Role, Shared};
use crate::watch::WatchHub;

/// SplitMix64: tiny, seedable, plenty to pick faults with.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn pick(&mut self, ids: &[u64]) -> Option<u64> {
        (!ids.is_empty()).then(|| ids[self.below(ids.len() as u64) as usize])
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The driver's side of the simulated network: messages wait here until the simulation
/// collects them after each `process`.
#[derive(Clone, Default)]
struct SimOutbox {
    sent: Arc<Mutex<Vec<Message>>>,
    members: Arc<Mutex<BTreeMap<u64, String>>>,
}

impl Outbox for SimOutbox {
    fn send(&mut self, messages: Vec<Message>) {
        lock(&self.sent).extend(messages);
    }

    fn set_members(&mut self, addresses: &BTreeMap<u64, String>) {
        *lock(&self.members) = addresses.clone();
    }
}

struct Node {
    /// `None` while the member is down.
    driver: Option<Driver>,
    shared: Arc<Shared>,
    outbox: SimOutbox,
}

struct InFlight {
    at: u64,
    order: u64,
    msg: Message,
}

/// How unreliable the network is.
#[derive(Clone, Copy)]
struct Faults {
    drop_per_mille: u64,
    /// Each message is delivered 0..=max_delay ticks after it was sent.
    max_delay: u64,
}

struct Write {
    name: String,
    to: u64,
    proposed_at: u64,
    rx: oneshot::Receiver<ProposeReply>,
}

struct Sim {
    rng: Rng,
    dir: tempfile::TempDir,
    nodes: BTreeMap<u64, Node>,
    /// The voters a brand-new cluster starts with.
    initial: Vec<u64>,
    now: u64,
    in_flight: Vec<InFlight>,
    faults: Faults,
    /// Directed links that drop everything.
    cut: BTreeSet<(u64, u64)>,
    /// (member, index): messages to that member telling of a commit index at or past
    /// the index are dropped, so it holds entries without learning they committed.
    hide_commit: Option<(u64, u64)>,
    /// Term -> the member that led it.
    leaders: BTreeMap<u64, u64>,
    /// FNV-1a over every member's (role, term, commit, applied) after every tick.
    trace: u64,
    next_write: u64,
    pending: Vec<Write>,
    /// Acknowledged writes: name -> (member it was proposed to, tick it was proposed).
    acked: BTreeMap<String, (u64, u64)>,
    failed: usize,
    /// Why each failed write failed, for assertion messages.
    failures: Vec<String>,
}

fn address(id: u64) -> String {
    format!("127.0.0.1:{}", 7400 + id)
}

fn write_command(n: u64) -> (String, Command) {
    let name = format!("w{n}");
    let command = Command::RegisterHost {
        name: name.clone(),
        underlay_ip: Ipv4Addr::from(0x0A00_0000 | (n as u32 & 0x00FF_FFFF)),
        underlay_prefix: 0,
        underlay_mtu: 1500,
        now_ms: 0,
    };
    (name, command)
}

impl Sim {
    fn new(seed: u64, members: u64, faults: Faults) -> Sim {
        // tmpfs when there is one: each member fsyncs once per Ready.
        let shm = std::path::Path::new("/dev/shm");
        let mut builder = tempfile::Builder::new();
        builder.prefix("overlay-raft-sim-");
        let dir = if shm.is_dir() { builder.tempdir_in(shm) } else { builder.tempdir() };
        let mut sim = Sim {
            rng: Rng(seed),
            dir: dir.expect("temp dir"),
            nodes: BTreeMap::new(),
            initial: (1..=members).collect(),
            now: 0,
            in_flight: Vec::new(),
            faults,
            cut: BTreeSet::new(),
            hide_commit: None,
            leaders: BTreeMap::new(),
            trace: 0xcbf2_9ce4_8422_2325,
            next_write: 0,
            pending: Vec::new(),
            acked: BTreeMap::new(),
            failed: 0,
            failures: Vec::new(),
        };
        for id in 1..=members {
            sim.restart(id);
        }
        sim
    }

    fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("m{id}"))
    }

    fn configured(&self) -> BTreeMap<u64, String> {
        self.initial.iter().map(|&id| (id, address(id))).collect()
    }

    /// Starts (or restarts) member `id` on whatever its data dir holds.
    fn restart(&mut self, id: u64) {
        let storage = DiskStorage::open(&self.data_dir(id), &self.initial).expect("open storage");
        self.boot(id, storage, None);
    }

    /// Starts member `id` on an empty data dir from `from`'s snapshot: how a member
    /// started with `--join`, or one that lost its data dir, comes up.
    fn start_from_snapshot(&mut self, id: u64, from: u64) {
        let (reply, mut rx) = oneshot::channel();
        self.driver(from).handle(DriverMsg::JoinSnapshot { id, reply });
        let joined = rx.try_recv().expect("answered at once").expect("join allowed");
        let voter = joined.snapshot.get_metadata().get_conf_state().voters.contains(&id);
        let storage =
            DiskStorage::open_joined(&self.data_dir(id), joined.snapshot).expect("joined storage");
        self.boot(id, storage, voter.then_some(joined.commit));
    }

    fn boot(&mut self, id: u64, storage: DiskStorage, recovering_until: Option<u64>) {
        let (state, membership) = super::restore(&storage, &self.configured()).expect("restore");
        let shared = Arc::new(Shared {
            hub: WatchHub::new(&state.catalog, 1000),
            state: RwLock::new(state),
            status: watch::channel(NodeStatus::initial(id, recovering_until.is_some())).0,
            metrics: Arc::default(),
            stalled: RwLock::default(),
        });
        let outbox = SimOutbox::default();
        let config = DriverConfig {
            id,
            // Small, so that compaction and snapshot catch-up happen in every run.
            snapshot_every: 40,
            keep_entries: 10,
            fixed_election_ticks: Some(
                ELECTION_TICKS + self.rng.below(ELECTION_TICKS as u64) as usize,
            ),
        };
        let driver = Driver::new(
            config,
            storage,
            Box::new(outbox.clone()),
            shared.clone(),
            membership,
            recovering_until,
        )
        .expect("driver");
        self.nodes.insert(id, Node { driver: Some(driver), shared, outbox });
        self.process(id);
    }

    /// SIGKILL: the driver is gone; its fsynced log stays.
    fn crash(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.driver = None;
            lock(&node.outbox.sent).clear();
        }
    }

    /// Crash and lose the data dir.
    fn wipe(&mut self, id: u64) {
        self.crash(id);
        let _ = std::fs::remove_dir_all(self.data_dir(id));
    }

    fn is_up(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.driver.is_some())
    }

    fn up(&self) -> Vec<u64> {
        self.nodes.iter().filter(|(_, n)| n.driver.is_some()).map(|(&id, _)| id).collect()
    }

    fn driver(&mut self, id: u64) -> &mut Driver {
        self.nodes.get_mut(&id).and_then(|n| n.driver.as_mut()).expect("member is up")
    }

    fn status(&self, id: u64) -> NodeStatus {
        self.nodes[&id].shared.status.borrow().clone()
    }

    fn digest(&self, id: u64) -> u64 {
        self.nodes[&id].shared.read_state().digest()
    }

    fn has_write(&self, id: u64, name: &str) -> bool {
        self.nodes[&id].shared.read_state().catalog.hosts.contains_key(name)
    }

    /// Runs the driver's work and puts what it sent on the network.
    fn process(&mut self, id: u64) {
        let Some(node) = self.nodes.get_mut(&id) else { return };
        let Some(driver) = node.driver.as_mut() else { return };
        driver.process().expect("the log is persisted");
        let mut sent = std::mem::take(&mut *lock(&node.outbox.sent));
        let status = node.shared.status.borrow().clone();
        // raft-rs fills some messages from a HashMap: a stable order keeps runs alike.
        sent.sort_by_key(|m| m.to);
        for msg in sent {
            self.send(msg);
        }
        if status.role == Role::Leader {
            if let Some(other) = self.leaders.insert(status.term, id).filter(|&o| o != id) {
                panic!("two leaders in term {}: members {other} and {id}", status.term);
            }
        }
    }

    fn send(&mut self, msg: Message) {
        if self.cut.contains(&(msg.from, msg.to)) || self.rng.chance(self.faults.drop_per_mille) {
            return;
        }
        let at = self.now + self.rng.below(self.faults.max_delay + 1);
        let order = self.rng.next();
        self.in_flight.push(InFlight { at, order, msg });
    }

    /// One tick: every member ticks, then everything due is delivered (with what that
    /// provokes, as long as it is due now too).
    fn step(&mut self) {
        self.now += 1;
        for id in self.up() {
            self.driver(id).tick();
            self.process(id);
        }
        for _ in 0..100 {
            let (mut due, later): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.in_flight).into_iter().partition(|f| f.at <= self.now);
            self.in_flight = later;
            if due.is_empty() {
                break;
            }
            due.sort_by_key(|f| (f.at, f.order));
            let mut touched = BTreeSet::new();
            for f in due {
                let (from, to) = (f.msg.from, f.msg.to);
                // A partition also eats what was already on the wire.
                if self.cut.contains(&(from, to)) || !self.is_up(to) {
                    continue;
                }
                if self.hide_commit.is_some_and(|(m, i)| m == to && f.msg.commit >= i) {
                    continue;
                }
                self.driver(to).handle(DriverMsg::Raft(Box::new(f.msg)));
                touched.insert(to);
            }
            for id in touched {
                self.process(id);
            }
        }
        if self.now.is_multiple_of(10) {
            for id in self.up() {
                self.driver(id).housekeeping();
            }
        }
        self.poll_writes();
        for id in self.up() {
            let s = self.status(id);
            for v in [id, s.role as u64, s.term, s.commit, s.applied] {
                self.trace = (self.trace ^ v).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }

    fn run(&mut self, ticks: u64) {
        for _ in 0..ticks {
            self.step();
        }
    }

    /// Steps until `done`, at most `ticks` ticks; fails naming `what`.
    fn run_until(&mut self, ticks: u64, what: &str, mut done: impl FnMut(&mut Sim) -> bool) {
        for _ in 0..ticks {
            if done(self) {
                return;
            }
            self.step();
        }
        if !done(self) {
            panic!("after {ticks} ticks (now {}): still not {what}; {}", self.now, self.describe());
        }
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for (&id, node) in &self.nodes {
            let s = node.shared.status.borrow();
            out.push_str(&format!(
                "\n  member {id}: up {} role {:?} term {} leader {} commit {} applied {} members {:?}",
                node.driver.is_some(),
                s.role,
                s.term,
                s.leader,
                s.commit,
                s.applied,
                s.members.keys().collect::<Vec<_>>()
            ));
        }
        out
    }

    /// The up member that leads in the highest term, if any.
    fn leader(&self) -> Option<u64> {
        self.up()
            .into_iter()
            .map(|id| (self.status(id), id))
            .filter(|(s, _)| s.role == Role::Leader)
            .max_by_key(|(s, _)| s.term)
            .map(|(_, id)| id)
    }

    fn propose_to(&mut self, to: u64) {
        self.next_write += 1;
        let (name, command) = write_command(self.next_write);
        let (reply, rx) = oneshot::channel();
        self.driver(to).handle(DriverMsg::Propose { command, reply });
        self.pending.push(Write { name, to, proposed_at: self.now, rx });
    }

    /// A client write: ask a random member who leads, send it there (as
    /// `Cluster::propose` does; with no leader known it would wait, here it skips).
    fn client_write(&mut self) {
        let up = self.up();
        let Some(asked) = self.rng.pick(&up) else { return };
        let leader = self.status(asked).leader;
        if self.is_up(leader) {
            self.propose_to(leader);
        }
    }

    fn poll_writes(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.retain_mut(|w| match w.rx.try_recv() {
            Ok(Ok(_)) => {
                self.acked.insert(w.name.clone(), (w.to, w.proposed_at));
                false
            }
            Ok(Err(e)) => {
                self.failed += 1;
                self.failures.push(format!("{} to {} at {}: {e}", w.name, w.to, w.proposed_at));
                false
            }
            Err(TryRecvError::Closed) => {
                self.failed += 1;
                self.failures.push(format!("{} to {} at {}: crashed", w.name, w.to, w.proposed_at));
                false
            }
            Err(TryRecvError::Empty) => true,
        });
        self.pending = pending;
    }

    fn isolate(&mut self, id: u64) {
        for &other in self.nodes.keys() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    /// Every up member applied everything the leader committed, with equal state.
    fn converged(&self) -> bool {
        let Some(leader) = self.leader() else { return false };
        let l = self.status(leader);
        let digest = self.digest(leader);
        self.up().iter().all(|&id| {
            let s = self.status(id);
            s.applied == l.commit && s.commit == l.commit && self.digest(id) == digest
        }) && self.pending.is_empty()
    }

    fn settle(&mut self) {
        self.heal();
        self.run_until(600, "converged", |s| s.converged());
    }

    /// Every acknowledged write is on every up member.
    fn check_acked(&self) {
        assert!(!self.acked.is_empty(), "no write was acknowledged at all");
        for id in self.up() {
            for name in self.acked.keys() {
                assert!(
                    self.has_write(id, name),
                    "acknowledged write {name} missing on member {id}"
                );
            }
        }
    }

    /// Asks `to` for a membership change; the answer comes once it applied.
    fn change(&mut self, to: u64, change: MemberChange) -> oneshot::Receiver<ChangeReply> {
        let (reply, rx) = oneshot::channel();
        // What the leader's probe of a member to be added finds: whether it runs.
        let candidate_answers =
            matches!(change, MemberChange::AddLearner { .. }) && self.is_up(change.id());
        self.driver(to).handle(DriverMsg::ChangeMembership { change, candidate_answers, reply });
        self.process(to);
        rx
    }

    /// What `Cluster::change_membership` does: retry at the leader until applied or
    /// refused. Writes keep flowing meanwhile.
    fn change_membership(&mut self, change: MemberChange) -> Result<(), ChangeError> {
        for _ in 0..50 {
            self.run_until(200, "led", |s| s.leader().is_some());
            let Some(leader) = self.leader() else { continue };
            let mut rx = self.change(leader, change.clone());
            let answer = loop {
                match rx.try_recv() {
                    Ok(answer) => break Some(answer),
                    Err(TryRecvError::Closed) => break None,
                    Err(TryRecvError::Empty) => {
                        self.client_write();
                        self.step();
                    }
                }
            };
            match answer {
                Some(Err(ChangeError::Retry(_) | ChangeError::NotLeader { .. })) | None => {
                    self.run(5)
                }
                Some(other) => return other,
            }
        }
        panic!("{change} never went through: {}", self.describe());
    }

    fn voters(&self, id: u64) -> BTreeSet<u64> {
        self.status(id).members.iter().filter(|(_, m)| m.voter).map(|(&id, _)| id).collect()
    }
}

const FLAKY: Faults = Faults { drop_per_mille: 50, max_delay: 2 };

/// The seeds a test runs: `default`, or 1..=N with `OVERLAY_SIM_SEEDS=N` (a longer hunt
/// for a failing seed; each seed is deterministic).
fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("OVERLAY_SIM_SEEDS").ok().and_then(|n| n.parse::<u64>().ok()) {
        Some(n) => (1..=n).collect(),
        None => default.to_vec(),
    }
}

#[test]
fn a_partitioned_leader_steps_down_acknowledges_nothing_and_catches_up() {
    for seed in seeds(&[1, 2, 3]) {
        for members in [3, 5] {
            eprintln!("seed {seed}, {members} members");
            partitioned_leader(seed, members);
        }
    }
}

fn partitioned_leader(seed: u64, members: u64) {
    let mut sim = Sim::new(seed, members, FLAKY);
    sim.run_until(200, "led", |s| s.leader().is_some());
    for _ in 0..100 {
        sim.client_write();
        sim.step();
    }
    let old = sim.leader().expect("leader");
    let cut_at = sim.now;
    sim.isolate(old);
    // Writes keep coming, to the old leader directly and through the others.
    let mut stepped_down = None;
    for _ in 0..300 {
        sim.propose_to(old);
        sim.client_write();
        sim.step();
        if stepped_down.is_none() && sim.status(old).role != Role::Leader {
            stepped_down = Some(sim.now - cut_at);
        }
    }
    let stepped_down = stepped_down.expect("the cut-off leader stepped down");
    assert!(stepped_down <= 3 * ELECTION_TICKS as u64, "stepped down after {stepped_down} ticks");
    let new = sim.leader().expect("the majority elected a leader");
    assert_ne!(new, old);
    let after_cut = sim.acked.values().filter(|&&(_, at)| at > cut_at).count();
    assert!(after_cut > 100, "the majority went on writing ({after_cut} acknowledged)");
    sim.settle();
    sim.check_acked();
    let by_old: Vec<&String> = sim
        .acked
        .iter()
        .filter(|(_, &(to, at))| to == old && at >= cut_at)
        .map(|(name, _)| name)
        .collect();
    assert!(by_old.is_empty(), "the cut-off leader acknowledged {by_old:?}");
    assert!(sim.failed >= 300, "every write to the cut-off leader failed");
}

#[test]
fn random_faults_crashes_and_wiped_disks_lose_no_acknowledged_write() {
    for seed in seeds(&[11, 12]) {
        eprintln!("seed {seed}");
        chaos(seed);
    }
}

fn chaos(seed: u64) {
    let mut sim = Sim::new(seed, 5, Faults { drop_per_mille: 100, max_delay: 3 });
    for round in 0..40 {
        // At most two of five members are in trouble at a time, so writes can go on.
        let victims: Vec<u64> = {
            let mut ids = sim.initial.clone();
            let a = sim.rng.pick(&ids).unwrap_or(1);
            ids.retain(|&i| i != a);
            let b = sim.rng.pick(&ids).unwrap_or(2);
            vec![a, b]
        };
        for &v in &victims {
            match sim.rng.below(5) {
                0 => sim.isolate(v),
                1 => {
                    let other = sim.rng.pick(&sim.initial.clone()).unwrap_or(1);
                    sim.cut.insert((v, other));
                }
                2 => sim.crash(v),
                3 if round % 3 == 0 => sim.wipe(v),
                _ => {}
            }
        }
        for _ in 0..60 {
            sim.client_write();
            sim.step();
        }
        // Heal and bring everyone back (the wiped from a live member's snapshot).
        sim.heal();
        for id in sim.initial.clone() {
            if !sim.is_up(id) {
                if DiskStorage::has_state(&sim.data_dir(id)).expect("check dir") {
                    sim.restart(id);
                } else {
                    sim.run_until(300, "led", |s| s.leader().is_some());
                    let from = sim.leader().expect("leader");
                    sim.start_from_snapshot(id, from);
                }
            }
        }
        sim.run(20);
    }
    sim.settle();
    sim.check_acked();
    assert!(sim.acked.len() > 500, "only {} writes acknowledged", sim.acked.len());
}

#[test]
fn restarts_with_and_without_the_data_dir_keep_acknowledged_writes() {
    let mut sim = Sim::new(21, 3, FLAKY);
    sim.run_until(200, "led", |s| s.leader().is_some());
    for _ in 0..150 {
        sim.client_write();
        sim.step();
    }
    // The whole cluster goes down at once and comes back from its disks.
    for id in [1, 2, 3] {
        sim.crash(id);
    }
    for id in [1, 2, 3] {
        sim.restart(id);
    }
    sim.run_until(300, "led again", |s| s.leader().is_some());
    sim.settle();
    sim.check_acked();
    // A follower and then the leader lose their disks.
    for _ in 0..2 {
        let leader = sim.leader().expect("leader");
        let victim = if sim.acked.len().is_multiple_of(2) { leader } else { (leader % 3) + 1 };
        for _ in 0..50 {
            sim.client_write();
            sim.step();
        }
        sim.wipe(victim);
        for _ in 0..50 {
            sim.client_write();
            sim.step();
        }
        sim.run_until(300, "led", |s| s.leader().is_some());
        let from = sim.leader().expect("leader");
        sim.start_from_snapshot(victim, from);
        assert!(sim.status(victim).recovering, "a wiped voter must not vote before catching up");
        sim.settle();
        assert!(!sim.status(victim).recovering);
        sim.check_acked();
    }
}

#[test]
fn members_join_from_a_snapshot_and_leave_while_writes_go_on() {
    let mut sim = Sim::new(31, 3, FLAKY);
    sim.run_until(200, "led", |s| s.leader().is_some());
    for _ in 0..120 {
        sim.client_write();
        sim.step();
    }
    // Member 4 comes up with a snapshot before it is added: it must stay quiet.
    let leader = sim.leader().expect("leader");
    sim.start_from_snapshot(4, leader);
    let term = sim.status(leader).term;
    sim.run(5 * ELECTION_TICKS as u64);
    assert_eq!(sim.status(leader).term, term, "a member not yet added disturbed the cluster");
    assert_eq!(sim.status(4).role, Role::Follower);
    let failed_before = sim.failed;
    sim.change_membership(MemberChange::AddLearner { id: 4, address: address(4) }).expect("add 4");
    sim.run_until(400, "member 4 a voter", |s| {
        s.client_write();
        s.leader().is_some_and(|l| s.voters(l).contains(&4))
    });
    assert_eq!(
        sim.failed,
        failed_before,
        "writes failed while adding a member: {:?}{}",
        &sim.failures[failed_before..],
        sim.describe()
    );
    sim.settle();
    // Every member, the new one too, knows every address.
    for id in sim.up() {
        let known = lock(&sim.nodes[&id].outbox.members).clone();
        assert_eq!(known.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4], "member {id}");
        assert_eq!(known[&4], address(4));
    }
    sim.check_acked();

    // Back to three (removing a follower).
    sim.change_membership(MemberChange::Remove { id: 4 }).expect("remove 4");
    sim.crash(4);
    sim.settle();
    let leader = sim.leader().expect("leader");
    assert_eq!(sim.voters(leader), BTreeSet::from([1, 2, 3]));

    // No change that would lose quorum: with one of three down, a fourth voter would
    // need three reachable.
    let dead = sim.up().into_iter().find(|&id| id != leader).expect("a follower");
    sim.crash(dead);
    sim.run(2 * ELECTION_TICKS as u64);
    let refused = sim.change_membership(MemberChange::AddLearner { id: 5, address: address(5) });
    let Err(ChangeError::Refused(MembershipError::WouldLoseQuorum(loss))) = refused else {
        panic!("adding to 3 voters with one down must be refused, got {refused:?}");
    };
    assert!(loss.to_string().contains(&format!("unreachable: {dead}, 5")), "{loss}");

    // Replace the dead member: remove it, add 5; no write may fail meanwhile.
    let failed_before = sim.failed;
    sim.change_membership(MemberChange::Remove { id: dead }).expect("remove the dead one");
    sim.change_membership(MemberChange::AddLearner { id: 5, address: address(5) }).expect("add 5");
    // One change at a time: 5 is still a learner (it is not even running).
    let second = sim.change_membership(MemberChange::AddLearner { id: 6, address: address(6) });
    assert!(
        matches!(second, Err(ChangeError::Refused(MembershipError::AddInProgress(5)))),
        "a second change while 5 catches up: {second:?}"
    );
    let leader = sim.leader().expect("leader");
    assert_eq!(sim.voters(leader).len(), 2, "5 is no voter before it caught up");
    sim.start_from_snapshot(5, leader);
    sim.run_until(400, "member 5 a voter", |s| {
        s.client_write();
        s.leader().is_some_and(|l| s.voters(l).contains(&5))
    });
    assert_eq!(
        sim.failed,
        failed_before,
        "writes failed while replacing a dead member: {:?}",
        &sim.failures[failed_before..]
    );
    let reused = sim.change_membership(MemberChange::AddLearner { id: dead, address: address(9) });
    assert!(matches!(reused, Err(ChangeError::Refused(MembershipError::IdRemoved(_)))));
    sim.settle();
    sim.check_acked();

    // The leader removes itself: leadership moves first, then it leaves.
    let leader = sim.leader().expect("leader");
    sim.change_membership(MemberChange::Remove { id: leader }).expect("remove the leader");
    sim.crash(leader);
    sim.run_until(300, "led without the removed member", |s| s.leader().is_some());
    sim.settle();
    let now_leader = sim.leader().expect("leader");
    assert_ne!(now_leader, leader);
    assert_eq!(sim.voters(now_leader).len(), 2);
    assert!(!sim.voters(now_leader).contains(&leader));
    sim.check_acked();

    // A restarted member comes back knowing the new membership from its own disk.
    let id = sim.up()[0];
    sim.crash(id);
    sim.restart(id);
    sim.settle();
    assert_eq!(sim.voters(id), sim.voters(now_leader));
    sim.check_acked();
}

#[test]
fn same_seed_replays_the_same_run() {
    let run = |seed| {
        let mut sim = Sim::new(seed, 3, Faults { drop_per_mille: 100, max_delay: 3 });
        for i in 0..400 {
            if i == 150 {
                let l = sim.leader().unwrap_or(1);
                sim.isolate(l);
            }
            if i == 300 {
                sim.heal();
            }
            sim.client_write();
            sim.step();
        }
        (sim.trace, sim.acked.len(), sim.leaders.clone())
    };
    let first = run(7);
    assert_eq!(first, run(7));
    assert_ne!(first.0, run(8).0, "another seed should make another run");
}

#[test]
fn a_removed_member_that_missed_its_removal_cannot_take_over() {
    let mut sim = Sim::new(41, 3, FLAKY);
    sim.run_until(200, "led", |s| s.leader().is_some());
    for _ in 0..20 {
        sim.client_write();
        sim.step();
    }
    let leader = sim.leader().expect("leader");
    sim.start_from_snapshot(4, leader);
    sim.change_membership(MemberChange::AddLearner { id: 4, address: address(4) }).expect("add 4");
    sim.run_until(400, "member 4 a voter", |s| {
        s.leader().is_some_and(|l| s.voters(l).contains(&4))
    });
    sim.settle();
    // 4 gets the entry removing it but never learns that it committed (the leader stops
    // talking to it once applied), so it still believes it is one of four voters, with
    // a log as long as everyone's: the cluster stays idle from here on.
    let leader = sim.leader().expect("leader");
    let removal = sim.status(leader).progress[&leader].matched + 1;
    sim.hide_commit = Some((4, removal));
    let mut rx = sim.change(leader, MemberChange::Remove { id: 4 });
    sim.run_until(100, "4 removed", |_| !matches!(rx.try_recv(), Err(TryRecvError::Empty)));
    sim.run(50);
    assert!(sim.status(4).members.contains_key(&4), "4 must not have learnt of its removal");
    // With the cluster leaderless, it campaigns.
    let old = sim.leader().expect("leader");
    sim.crash(old);
    for _ in 0..600 {
        sim.step();
        assert_ne!(
            sim.status(4).role,
            Role::Leader,
            "the removed member took over{}",
            sim.describe()
        );
    }
    let new = sim.leader().expect("the two remaining members elected a leader");
    assert_ne!(new, 4);
    sim.restart(old);
    for _ in 0..20 {
        sim.client_write();
        sim.step();
    }
    sim.crash(4); // stopped, as the README says to
    sim.settle();
    sim.check_acked();
}
