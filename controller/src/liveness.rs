//! Host liveness without writing heartbeats through raft.
//!
//! Agents heartbeat about once a second to any member; followers pass them on to the
//! leader, which keeps the last-seen time of every host in memory. Only status
//! *transitions* (ready → down after `timeout` of silence, down → ready on the next
//! heartbeat) are proposed through raft. A new leader has seen nobody yet, so it gives
//! every host a grace period of one `timeout` from the moment it took over.
//!
//! Next to each last-seen time the leader keeps the problem the host's agent reported
//! with that heartbeat (for example: its host firewall cannot be applied, so it attaches
//! no endpoint). A live host with a problem is shown `degraded` with it as the reason;
//! like last-seen, this is in memory only and comes back with the next heartbeat.
//!
//! A follower does not pass each heartbeat on as it comes: it queues it (see
//! [`Liveness::queue`]) and [`forward`] sends what queued up to the leader in one batch
//! every [`FORWARD_INTERVAL`]: with 1,000 agents that is 5 calls a second per follower
//! instead of hundreds, and an agent's heartbeat is answered without waiting on the
//! leader.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use overlay_model::{Command, Host, HostStatus};
use tracing::{info, warn};

use crate::cluster::{Cluster, Role};

/// The pure decision: which hosts change status now.
pub fn transitions<'a>(
    hosts: impl IntoIterator<Item = &'a Host>,
    last_seen: &HashMap<String, Instant>,
    leader_since: Instant,
    now: Instant,
    timeout: Duration,
) -> Vec<(String, HostStatus)> {
    let mut out = Vec::new();
    for host in hosts {
        let seen = last_seen.get(&host.name).copied();
        let alive = match seen {
            Some(t) => now.saturating_duration_since(t) <= timeout,
            // Never seen by this leader: alive until the grace period is over.
            None => now.saturating_duration_since(leader_since) <= timeout,
        };
        // A down host comes back only on a real heartbeat, not on the grace period.
        let ready = alive && (host.status == HostStatus::Ready || seen.is_some());
        let wanted = if ready { HostStatus::Ready } else { HostStatus::Down };
        if wanted != host.status {
            out.push((host.name.clone(), wanted));
        }
    }
    out
}

/// What `host ls` shows for `host`: its replicated status, except that a ready host
/// whose agent reports a problem is `degraded`, with the problem as the reason.
pub fn shown_status(host: &Host, problem: Option<&str>) -> (String, String) {
    match problem.filter(|p| !p.is_empty()) {
        Some(p) if host.status == HostStatus::Ready => ("degraded".into(), p.to_string()),
        _ => (host.status.to_string(), String::new()),
    }
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Characters of a reported problem that are kept.
const MAX_PROBLEM: usize = 500;

/// One host's last heartbeat.
struct Seen {
    at: Instant,
    wall: SystemTime,
    /// The problem it reported; `None`: none.
    problem: Option<String>,
}

#[derive(Default)]
pub struct Liveness {
    seen: Mutex<HashMap<String, Seen>>,
    /// Host -> the catalog revision its kernel reflects, as its agent last reported it
    /// (issue 15: what makes an endpoint reachable from the other hosts, see `status`).
    applied: Mutex<HashMap<String, u64>>,
    /// What this member heard while following, until [`forward`] passes it on.
    outbox: Mutex<Queued>,
}

/// How often a follower passes queued heartbeats on to the leader.
pub const FORWARD_INTERVAL: Duration = Duration::from_millis(200);
/// How long the leader has to take a batch before it is tried again with the next.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// The oldest heartbeats a follower tries to pass on again.
const MAX_REQUEUED_AGE: Duration = Duration::from_secs(3);

/// Heartbeats and applied revisions heard by a follower, not yet passed on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Host -> the problem of its latest heartbeat (empty: none).
    pub heartbeats: HashMap<String, String>,
    /// Host -> the highest applied revision it reported.
    pub applied: HashMap<String, u64>,
    /// When the oldest heartbeat here was heard.
    pub since: Option<Instant>,
}

impl Queued {
    pub fn is_empty(&self) -> bool {
        self.heartbeats.is_empty() && self.applied.is_empty()
    }
}

/// What a follower hears, to be queued for the leader.
pub enum Heard<'a> {
    Heartbeat { host: &'a str, problem: Option<&'a str> },
    Applied { host: &'a str, revision: u64 },
}

impl Liveness {
    /// A heartbeat from `host`, with the problem it reports (empty or `None`: none).
    pub fn record(&self, host: &str, problem: Option<&str>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: it is kept per host and shown in every `host ls`.
        let problem =
            problem.filter(|p| !p.is_empty()).map(|p| p.chars().take(MAX_PROBLEM).collect());
        let entry = Seen { at: Instant::now(), wall: SystemTime::now(), problem };
        seen.insert(host.to_string(), entry);
    }

    /// Unix ms of each host's last heartbeat seen by this member.
    pub fn last_seen_ms(&self) -> HashMap<String, i64> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter().map(|(h, s)| (h.clone(), unix_ms(s.wall))).collect()
    }

    /// The problem each host reported with its last heartbeat (hosts without one absent).
    pub fn problems(&self) -> HashMap<String, String> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter().filter_map(|(h, s)| Some((h.clone(), s.problem.clone()?))).collect()
    }

    fn instants(&self) -> HashMap<String, Instant> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter().map(|(h, s)| (h.clone(), s.at)).collect()
    }

    fn forget_all(&self) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.applied.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// `host`'s kernel reflects catalog `revision` (never goes back: reports may arrive
    /// out of order through different members).
    pub fn record_applied(&self, host: &str, revision: u64) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let entry = applied.entry(host.to_string()).or_insert(0);
        *entry = (*entry).max(revision);
    }

    /// The revision each host's kernel reflects, as far as this member heard.
    pub fn applied(&self) -> HashMap<String, u64> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records what was heard here (as the leader would), for when this member leads or
    /// no leader is known.
    pub fn note(&self, heard: Heard<'_>) {
        match heard {
            Heard::Heartbeat { host, problem } => self.record(host, problem),
            Heard::Applied { host, revision } => self.record_applied(host, revision),
        }
    }

    /// Queues what was heard for the leader (see [`forward`]); the latest heartbeat of a
    /// host replaces an earlier one, the highest revision wins.
    pub fn queue(&self, heard: Heard<'_>) {
        let mut q = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        match heard {
            Heard::Heartbeat { host, problem } => {
                q.heartbeats.insert(host.to_string(), problem.unwrap_or_default().to_string());
                q.since.get_or_insert_with(Instant::now);
            }
            Heard::Applied { host, revision } => {
                let entry = q.applied.entry(host.to_string()).or_insert(0);
                *entry = (*entry).max(revision);
            }
        }
    }

    /// Takes everything queued.
    pub fn take_queued(&self) -> Queued {
        std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts back a batch the leader did not take, under what queued since (a newer
    /// heartbeat of a host wins, the highest revision wins): dropping it would let a
    /// leader that answers slowly (under load) see live hosts as silent and mark them
    /// down, which is a write every watcher hears about, and more load.
    /// Heartbeats older than [`MAX_REQUEUED_AGE`] are dropped: the leader records a
    /// heartbeat as heard when it takes it, so an old one would keep a host that died
    /// meanwhile shown alive.
    pub fn requeue(&self, batch: Queued) {
        let mut q = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = batch.since.is_some_and(|t| t.elapsed() <= MAX_REQUEUED_AGE);
        if fresh {
            for (host, problem) in batch.heartbeats {
                q.heartbeats.entry(host).or_insert(problem);
            }
            q.since = q.since.min(batch.since).or(batch.since);
        }
        for (host, revision) in batch.applied {
            let entry = q.applied.entry(host).or_insert(0);
            *entry = (*entry).max(revision);
        }
    }
}

/// Where a member records what it heard: here when it leads (or no leader is known),
/// else queued for the leader.
pub fn heard(cluster: &Cluster, liveness: &Liveness, what: Heard<'_>) {
    let status = cluster.status();
    if status.role == Role::Leader || status.leader == 0 {
        liveness.note(what);
    } else {
        liveness.queue(what);
    }
}

/// Runs forever: every [`FORWARD_INTERVAL`], passes what queued up to the leader in one
/// batch (or records it here, if this member leads by now). A batch the leader does not
/// take goes back in the queue for the next try.
pub async fn forward(cluster: Cluster, liveness: std::sync::Arc<Liveness>) {
    let mut tick = tokio::time::interval(FORWARD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let queued = liveness.take_queued();
        if queued.is_empty() {
            continue;
        }
        let status = cluster.status();
        if status.role == Role::Leader || status.leader == 0 {
            for (host, problem) in &queued.heartbeats {
                liveness.record(host, Some(problem));
            }
            for (host, revision) in &queued.applied {
                liveness.record_applied(host, *revision);
            }
            continue;
        }
        let Some(mut client) = cluster.peers.client(status.leader) else {
            liveness.requeue(queued);
            continue;
        };
        let hosts = queued.heartbeats.len();
        let mut request = tonic::Request::new(overlay_proto::pb::HeartbeatBatch {
            problems: queued
                .heartbeats
                .iter()
                .filter(|(_, p)| !p.is_empty())
                .map(|(h, p)| (h.clone(), p.clone()))
                .collect(),
            hosts: queued.heartbeats.keys().cloned().collect(),
            applied: queued.applied.clone(),
        });
        request.set_timeout(FORWARD_TIMEOUT);
        if let Err(e) = client.forward_heartbeats(request).await {
            tracing::debug!(
                hosts,
                leader = status.leader,
                "could not pass heartbeats to the leader: {}",
                e.message()
            );
            liveness.requeue(queued);
        }
    }
}

/// Runs forever: on the leader, checks every 250 ms and proposes status transitions.
pub async fn monitor(cluster: Cluster, liveness: std::sync::Arc<Liveness>, timeout: Duration) {
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut leader_term: Option<(u64, Instant)> = None;
    loop {
        ticker.tick().await;
        let status = cluster.status();
        if status.role != Role::Leader {
            leader_term = None;
            continue;
        }
        let since = match leader_term {
            Some((term, since)) if term == status.term => since,
            _ => {
                // Heartbeats seen while a follower may predate a gap; start fresh.
                liveness.forget_all();
                let now = Instant::now();
                leader_term = Some((status.term, now));
                info!(term = status.term, grace = ?timeout, "leading: host liveness grace period starts");
                now
            }
        };
        let changes = {
            let state = cluster.read_state();
            transitions(
                state.catalog.hosts.values(),
                &liveness.instants(),
                since,
                Instant::now(),
                timeout,
            )
        };
        let Some(command) = status_command(changes, unix_ms(SystemTime::now()) as u64) else {
            continue;
        };
        // Only as the leader: a deposed leader's monitor must not write (and no other
        // member accepts an internal command from it).
        if let Err(e) = cluster.propose_local(command).await {
            warn!(error = %e, "could not record host status");
        }
    }
}

/// One command for every transition of a pass (one revision, one message per watcher),
/// logged per host. A single transition keeps the older one-host command, which every
/// member version understands.
fn status_command(changes: Vec<(String, HostStatus)>, now_ms: u64) -> Option<Command> {
    for (name, status) in &changes {
        info!(host = %name, status = %status, "host status changes");
    }
    match <[_; 1]>::try_from(changes) {
        Ok([(name, status)]) => Some(Command::SetHostStatus { name, status, now_ms }),
        Err(changes) if changes.is_empty() => None,
        Err(statuses) => Some(Command::SetHostStatuses { statuses, now_ms }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_followers_queue_keeps_the_latest_heartbeat_and_the_highest_revision() {
        let l = Liveness::default();
        assert!(l.take_queued().is_empty());
        l.queue(Heard::Heartbeat { host: "h1", problem: Some("nft missing") });
        l.queue(Heard::Heartbeat { host: "h1", problem: None });
        l.queue(Heard::Heartbeat { host: "h2", problem: Some("disk full") });
        l.queue(Heard::Applied { host: "h1", revision: 7 });
        l.queue(Heard::Applied { host: "h1", revision: 5 });
        let q = l.take_queued();
        assert_eq!(q.heartbeats.get("h1").map(String::as_str), Some(""));
        assert_eq!(q.heartbeats.get("h2").map(String::as_str), Some("disk full"));
        assert_eq!(q.applied.get("h1"), Some(&7));
        assert!(l.take_queued().is_empty(), "taken once");
        // A batch the leader did not take goes back under what queued since.
        l.queue(Heard::Heartbeat { host: "h1", problem: Some("newer") });
        l.queue(Heard::Applied { host: "h1", revision: 6 });
        l.requeue(q);
        let again = l.take_queued();
        assert_eq!(again.heartbeats.get("h1").map(String::as_str), Some("newer"));
        assert_eq!(again.heartbeats.get("h2").map(String::as_str), Some("disk full"));
        assert_eq!(again.applied.get("h1"), Some(&7));
        // Too old to pass on: the heartbeats go, the applied revisions (facts) stay.
        let stale = Queued {
            heartbeats: HashMap::from([("h4".to_string(), String::new())]),
            applied: HashMap::from([("h4".to_string(), 3)]),
            since: Instant::now().checked_sub(MAX_REQUEUED_AGE * 2),
        };
        l.requeue(stale);
        let left = l.take_queued();
        assert!(left.heartbeats.is_empty() && left.since.is_none());
        assert_eq!(left.applied.get("h4"), Some(&3));
        // Queued is not recorded: only the leader's record counts.
        assert!(l.last_seen_ms().is_empty());
        l.note(Heard::Heartbeat { host: "h3", problem: Some("x") });
        assert_eq!(l.problems().get("h3").map(String::as_str), Some("x"));
    }

    fn host(name: &str, status: HostStatus) -> Host {
        Host {
            name: name.into(),
            underlay_ip: "192.0.2.1".parse().expect("ip"),
            underlay_mtu: 1500,
            status,
            status_changed_ms: 0,
            underlay_prefix: 24,
        }
    }

    #[test]
    fn one_command_per_pass() {
        assert_eq!(status_command(vec![], 5), None);
        assert_eq!(
            status_command(vec![("h1".into(), HostStatus::Down)], 5),
            Some(Command::SetHostStatus { name: "h1".into(), status: HostStatus::Down, now_ms: 5 })
        );
        let two = vec![("h1".into(), HostStatus::Down), ("h2".into(), HostStatus::Ready)];
        assert_eq!(
            status_command(two.clone(), 5),
            Some(Command::SetHostStatuses { statuses: two, now_ms: 5 })
        );
    }

    #[test]
    fn silent_hosts_go_down_only_after_the_grace_period() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        let hosts = [host("a", HostStatus::Ready)];
        let seen = HashMap::new();
        assert!(transitions(&hosts, &seen, t0, t0 + Duration::from_secs(4), timeout).is_empty());
        assert_eq!(
            transitions(&hosts, &seen, t0, t0 + Duration::from_secs(6), timeout),
            vec![("a".to_string(), HostStatus::Down)]
        );
    }

    #[test]
    fn heartbeats_keep_hosts_ready_and_bring_them_back() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        let hosts = [
            host("a", HostStatus::Ready),
            host("b", HostStatus::Down),
            host("c", HostStatus::Down),
        ];
        let now = t0 + Duration::from_secs(60);
        let seen = HashMap::from([
            ("a".to_string(), now - Duration::from_secs(1)),
            ("b".to_string(), now - Duration::from_secs(1)),
        ]);
        // a stays ready, b comes back, c (never seen, grace long over) stays down.
        assert_eq!(
            transitions(&hosts, &seen, t0, now, timeout),
            vec![("b".to_string(), HostStatus::Ready)]
        );
    }

    #[test]
    fn a_reported_problem_degrades_a_ready_host_only() {
        let ready = host("a", HostStatus::Ready);
        let down = host("b", HostStatus::Down);
        let why = "host firewall: cannot run nft";
        assert_eq!(shown_status(&ready, Some(why)), ("degraded".into(), why.into()));
        assert_eq!(shown_status(&ready, None), ("ready".into(), String::new()));
        assert_eq!(shown_status(&ready, Some("")), ("ready".into(), String::new()));
        assert_eq!(shown_status(&down, Some(why)), ("down".into(), String::new()));

        let l = Liveness::default();
        l.record("a", Some(why));
        l.record("b", None);
        assert_eq!(l.problems(), HashMap::from([("a".to_string(), why.to_string())]));
        // The next heartbeat without a problem clears it.
        l.record("a", Some(""));
        assert!(l.problems().is_empty());
        assert_eq!(l.last_seen_ms().len(), 2);
    }

    #[test]
    fn a_down_host_is_not_revived_by_a_new_leaders_grace_period() {
        let t0 = Instant::now();
        let hosts = [host("b", HostStatus::Down)];
        assert!(transitions(&hosts, &HashMap::new(), t0, t0, Duration::from_secs(5)).is_empty());
    }
}
