//! The controller side of the agent: registration, heartbeats and the desired-state
//! stream, replicated into a local [`Catalog`] that is persisted and published.
//!
//! * [`Replica`] (pure): applies `WatchResponse`s the way the proto defines them (a
//!   snapshot between `reset` and `snapshot_done` replaces the catalog at once; then one
//!   message per revision).
//! * [`run_watch`]: connects to the controller URLs in turn, resumes from the last
//!   applied revision, persists every consistent catalog to `desired.json` and
//!   publishes it; on any error it moves on to the next URL with backoff.
//! * [`run_heartbeat`]: `RegisterHost` then `Heartbeat` every second (and at once when
//!   the agent's problem changes: a host that cannot apply its firewall is shown
//!   `degraded` with it), re-registering on
//!   `NotFound`, moving to the next URL on failure.
//!
//! Nothing here touches the kernel; the data plane never waits for a controller.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use overlay_model::{Catalog, Change};
use overlay_ops::blocking::off_the_runtime;
use overlay_proto::pb;
use overlay_proto::pb::overlay_client::OverlayClient;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::identity::Controllers;
use crate::store::Store;

/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`] (with jitter).
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// How long opening a watch stream or registering (a write) may take. Longer than a
/// heartbeat's: a controller that answers slowly under load (1,000 agents starting at
/// once) is better waited for than left, because leaving starts the same work over on
/// a new connection (a TLS handshake, a fresh snapshot, another write) and feeds the
/// load. An unreachable controller fails at connect, which has its own 3 s timeout.
const SLOW_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeats that time out in a row before the agent moves to the next controller; one
/// slow answer is no reason to drop the connection and register again.
const HEARTBEAT_TIMEOUTS: u32 = 3;
/// Most watch messages applied before one save and publish.
const MAX_BATCH: usize = 10_000;

/// Who this agent is, as it tells the controller.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    /// Prefix length of the underlay network (0: unknown).
    pub underlay_prefix: u8,
    pub underlay_mtu: u32,
}

/// The local copy of the desired state, fed by watch responses.
///
/// The controller sends what this host needs: every host and network, whole the
/// endpoints and routes of the networks it wants, every other endpoint by name (see the
/// proto's `WatchResponse`). When a network is deleted the replica drops what it no
/// longer has a reason to keep ([`collect_garbage`]).
#[derive(Debug, Clone, Default)]
pub struct Replica {
    pub catalog: Catalog,
    /// This host's name: its own endpoints are always kept.
    me: String,
    /// The snapshot being received, if one is in progress.
    staging: Option<Catalog>,
}

/// What one message did to the replica's catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Nothing visible yet (a snapshot in progress, or nothing new).
    None,
    /// Replaced by a complete snapshot.
    Replaced,
    /// These changes, garbage collection included, were applied in order.
    Changed(Vec<Change>),
}

impl Replica {
    pub fn new(catalog: Catalog, me: &str) -> Replica {
        Replica { catalog, me: me.to_string(), staging: None }
    }

    /// Applies one message.
    pub fn apply(&mut self, msg: &pb::WatchResponse) -> Result<Update, String> {
        let changes = msg
            .changes
            .iter()
            .map(Change::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad change at revision {}: {e}", msg.revision))?;
        if msg.reset {
            self.staging = Some(Catalog::default());
        }
        if let Some(staging) = self.staging.as_mut() {
            changes.iter().for_each(|c| staging.apply_change(c));
            staging.revision = msg.revision;
            if msg.snapshot_done {
                self.catalog = self.staging.take().unwrap_or_default();
                return Ok(Update::Replaced);
            }
            return Ok(Update::None);
        }
        if msg.revision <= self.catalog.revision && changes.is_empty() {
            return Ok(Update::None);
        }
        changes.iter().for_each(|c| self.catalog.apply_change(c));
        let mut applied = changes;
        let garbage = collect_garbage(&mut self.catalog, &self.me, &applied);
        applied.extend(garbage);
        self.catalog.revision = self.catalog.revision.max(msg.revision);
        Ok(Update::Changed(applied))
    }

    /// Drops a half-received snapshot (the stream broke in the middle of it).
    pub fn abort_snapshot(&mut self) {
        self.staging = None;
    }
}

/// After `changes` were applied to `catalog`, drops what host `me` has no reason to
/// keep: another host's endpoint attached to no network the catalog has, and the routes
/// of a network it no longer has. Returns the deletions, in the order made. Looks only at
/// what `changes` touched (the whole catalog only when a network went away).
pub fn collect_garbage(catalog: &mut Catalog, me: &str, changes: &[Change]) -> Vec<Change> {
    let dropped: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            Change::DeleteNetwork(n) if !catalog.networks.contains_key(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    let mut candidates: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            Change::PutEndpoint(e) => Some(e.name.clone()),
            _ => None,
        })
        .collect();
    if !dropped.is_empty() {
        candidates.extend(
            catalog
                .endpoints
                .values()
                .filter(|e| e.attachments.iter().any(|a| dropped.contains(&a.network.as_str())))
                .map(|e| e.name.clone()),
        );
    }
    let mut out = Vec::new();
    for name in candidates {
        let keep = catalog.endpoints.get(&name).is_none_or(|e| {
            e.host == me || e.attachments.iter().any(|a| catalog.networks.contains_key(&a.network))
        });
        if !keep {
            catalog.endpoints.remove(&name);
            out.push(Change::DeleteEndpoint(name));
        }
    }
    for network in dropped {
        let keys: Vec<_> = catalog.routes_in(network).map(|r| r.key()).collect();
        for key in keys {
            catalog.routes.remove(&key);
            out.push(Change::DeleteRoute(key));
        }
    }
    out
}

fn new_backoff() -> Backoff {
    Backoff::new(MIN_BACKOFF, MAX_BACKOFF)
}

/// Where a watch stream's messages go: the agent's replica and store
/// ([`run_watch`]), or a simulated agent's counters (`overlay-sim`).
pub trait WatchSink: Send {
    /// The revision to resume from (0: start with a snapshot).
    fn revision(&self) -> u64;
    /// Applies messages received together, in order.
    fn apply_batch(&mut self, batch: &[pb::WatchResponse]) -> Result<(), String>;
    /// The stream broke: forget a half-received snapshot.
    fn interrupted(&mut self);
}

/// The agent's sink: the replica, persisted in `store` and published on `tx` once per
/// batch.
struct AgentSink {
    replica: Replica,
    store: Store,
    tx: watch::Sender<Option<Arc<Catalog>>>,
    published: u64,
}

impl WatchSink for AgentSink {
    fn revision(&self) -> u64 {
        self.replica.catalog.revision
    }

    fn apply_batch(&mut self, batch: &[pb::WatchResponse]) -> Result<(), String> {
        let mut replaced = false;
        let mut changes = Vec::new();
        for msg in batch {
            match self.replica.apply(msg)? {
                Update::None => {}
                Update::Replaced => {
                    replaced = true;
                    changes.clear();
                }
                Update::Changed(c) => changes.extend(c),
            }
        }
        // A progress message only moves the revision: published (the applied revision
        // is reported), not persisted (resuming from an older one costs nothing).
        let changed = replaced || !changes.is_empty();
        let revision = self.replica.catalog.revision;
        if changed || revision > self.published {
            debug!(revision, messages = batch.len(), "catalog updated");
            self.published = revision;
            // Published first, then copied back for the next batch and persisted:
            // neither the copy of the whole catalog (8 ms with 10,000 endpoints) nor the
            // fsync stands between a change and the pass that programs it. (An agent
            // that dies in between resumes from the older persisted revision.)
            let catalog = Arc::new(std::mem::take(&mut self.replica.catalog));
            self.tx.send_replace(Some(catalog.clone()));
            self.replica.catalog = (*catalog).clone();
        }
        if changed {
            let persisted = (!replaced).then_some(changes.as_slice());
            let catalog = &self.replica.catalog;
            if let Err(e) = off_the_runtime(|| self.store.persist_catalog(catalog, persisted)) {
                warn!("cannot persist desired state: {e}");
            }
        }
        Ok(())
    }

    fn interrupted(&mut self) {
        self.replica.abort_snapshot();
    }
}

/// Watches forever (until the task is dropped), publishing each consistent catalog on
/// `tx` and persisting it in `store`.
pub async fn run_watch(
    me: Identity,
    controllers: Controllers,
    store: Store,
    replica: Replica,
    tx: watch::Sender<Option<Arc<Catalog>>>,
) {
    let published = replica.catalog.revision;
    let mut sink = AgentSink { replica, store: store.clone(), tx, published };
    watch_forever(&me.name, &controllers, &store, &mut sink).await
}

/// Watches as host `name` forever, feeding `sink`: connects to the controller URLs in
/// turn, resumes from the sink's revision, and moves on to the next URL with jittered
/// backoff on any error.
pub async fn watch_forever(
    name: &str,
    controllers: &Controllers,
    store: &Store,
    sink: &mut impl WatchSink,
) {
    let mut backoff = new_backoff();
    let mut next = 0usize;
    loop {
        let url = &controllers.urls[next % controllers.urls.len()];
        next += 1;
        match watch_once(name, controllers, url, store, sink, &mut backoff).await {
            Ok(()) => info!(controller = %url, "watch stream ended; reconnecting"),
            Err(e) => warn!(controller = %url, "watch: {e}"),
        }
        sink.interrupted();
        backoff.wait().await;
    }
}

async fn watch_once(
    name: &str,
    controllers: &Controllers,
    url: &str,
    store: &Store,
    sink: &mut impl WatchSink,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let mut client = controllers.connect(url).await?;
    let from = sink.revision();
    let cluster_id = store.cluster_id().unwrap_or_default();
    // Per host: whole objects for the networks this host wants, every other endpoint by
    // name (the replica keeps those in `Catalog::names`, for DNS).
    let req = pb::WatchRequest {
        host: name.to_string(),
        from_revision: from,
        cluster_id,
        per_host: true,
    };
    let mut stream = tokio::time::timeout(SLOW_CALL_TIMEOUT, client.watch(req))
        .await
        .map_err(|_| format!("{url}: watch call timed out"))?
        .map_err(|s| format!("{url}: {}", s.message()))?
        .into_inner();
    info!(controller = %url, from_revision = from, "watching desired state");
    loop {
        let Some(first) = stream.message().await.map_err(|s| broken(url, &s))? else {
            return Ok(());
        };
        backoff.reset();
        // Everything already received is applied before saving and publishing once:
        // an agent catching up on thousands of revisions does that work once, not per
        // revision. (`message` is cancel-safe, so polling it once and dropping it loses
        // nothing.)
        let mut batch = vec![first];
        let mut end: Option<Result<(), String>> = None;
        while batch.len() < MAX_BATCH {
            match stream.message().now_or_never() {
                None => break,
                Some(Ok(Some(m))) => batch.push(m),
                Some(Ok(None)) => {
                    end = Some(Ok(()));
                    break;
                }
                Some(Err(s)) => {
                    end = Some(Err(broken(url, &s)));
                    break;
                }
            }
        }
        let ids: std::collections::BTreeSet<&str> =
            batch.iter().map(|m| m.cluster_id.as_str()).collect();
        for id in ids {
            adopt_cluster_id(store, id)?;
        }
        sink.apply_batch(&batch)?;
        if let Some(end) = end {
            return end;
        }
    }
}

/// Why a stream from `url` broke: the status, and what lies under it when that says
/// more (a transport error's own message is only "error reading a body").
fn broken(url: &str, status: &tonic::Status) -> String {
    use std::error::Error;
    let cause = status.source().map(crate::identity::root_cause).unwrap_or_default();
    if cause.is_empty() || status.message().contains(&cause) {
        format!("{url}: {}", status.message())
    } else {
        format!("{url}: {} ({cause})", status.message())
    }
}

/// Remembers the cluster this agent belongs to the first time a controller names it;
/// refuses a controller that names another one (the controller refuses too, when asked
/// with the id; this catches a member that has not learned its cluster's id yet).
fn adopt_cluster_id(store: &Store, theirs: &str) -> Result<(), String> {
    if theirs.is_empty() {
        return Ok(());
    }
    match store.cluster_id() {
        Some(ours) if ours.eq_ignore_ascii_case(theirs) => Ok(()),
        Some(ours) => Err(format!(
            "the controller serves cluster {theirs}, but this agent belongs to cluster {ours}: refusing its state (a reinitialised cluster or another cluster's backup?); if this host really moved, stop the agent, delete {} and start it again",
            store.cluster_id_path().display()
        )),
        None => {
            info!(cluster_id = theirs, "this agent belongs to cluster {theirs}");
            off_the_runtime(|| store.save_cluster_id(theirs))
                .map_err(|e| format!("saving the cluster id: {e}"))
        }
    }
}

/// Registers, then heartbeats every second, forever (until the task is dropped).
/// Each heartbeat carries the agent's current problem from `problem` (`None`: none), and
/// one goes out at once when it changes.
pub async fn run_heartbeat(
    me: Identity,
    controllers: Controllers,
    store: Store,
    mut problem: watch::Receiver<Option<String>>,
) {
    let mut backoff = new_backoff();
    let mut next = 0usize;
    loop {
        let url = &controllers.urls[next % controllers.urls.len()];
        next += 1;
        let r = heartbeat_once(&me, &controllers, url, &store, &mut backoff, &mut problem).await;
        if let Err(e) = r {
            warn!(controller = %url, "heartbeat: {e}");
        }
        backoff.wait().await;
    }
}

async fn register(
    client: &mut OverlayClient<Channel>,
    me: &Identity,
    store: &Store,
) -> Result<(), tonic::Status> {
    let req = pb::RegisterHostRequest {
        name: me.name.clone(),
        underlay_ip: me.underlay_ip.to_string(),
        underlay_mtu: me.underlay_mtu,
        cluster_id: store.cluster_id().unwrap_or_default(),
        underlay_prefix: u32::from(me.underlay_prefix),
    };
    tokio::time::timeout(SLOW_CALL_TIMEOUT, client.register_host(req))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("register timed out"))??;
    Ok(())
}

async fn heartbeat_once(
    me: &Identity,
    controllers: &Controllers,
    url: &str,
    store: &Store,
    backoff: &mut Backoff,
    problem: &mut watch::Receiver<Option<String>>,
) -> Result<(), String> {
    let mut client = controllers.connect(url).await?;
    register(&mut client, me, store).await.map_err(|s| format!("register: {}", s.message()))?;
    info!(controller = %url, underlay_ip = %me.underlay_ip, underlay_mtu = me.underlay_mtu, "registered");
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut timeouts = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // A sender that went away leaves the last value; keep ticking.
            r = problem.changed() => if r.is_err() { tick.tick().await; },
        }
        let req = pb::HeartbeatRequest {
            host: me.name.clone(),
            cluster_id: store.cluster_id().unwrap_or_default(),
            problem: problem.borrow_and_update().clone().unwrap_or_default(),
        };
        let Ok(r) = tokio::time::timeout(RPC_TIMEOUT, client.heartbeat(req)).await else {
            timeouts += 1;
            if timeouts >= HEARTBEAT_TIMEOUTS {
                return Err(format!("{timeouts} heartbeats in a row timed out"));
            }
            debug!(controller = %url, "heartbeat timed out; trying again on the same connection");
            continue;
        };
        timeouts = 0;
        match r {
            Ok(answer) => {
                adopt_cluster_id(store, &answer.get_ref().cluster_id)?;
                backoff.reset();
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                info!("controller does not know this host; registering again");
                register(&mut client, me, store)
                    .await
                    .map_err(|s| format!("register: {}", s.message()))?;
            }
            Err(s) => return Err(s.message().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn msg(revision: u64, reset: bool, done: bool, changes: Vec<Change>) -> pb::WatchResponse {
        pb::WatchResponse {
            revision,
            reset,
            snapshot_done: done,
            changes: changes.iter().map(pb::Change::from).collect(),
            cluster_id: String::new(),
        }
    }

    fn changed(u: Update) -> bool {
        u != Update::None
    }

    #[test]
    fn snapshot_then_incremental() {
        let cat = crate::desired::tests::catalog();
        let changes = cat.snapshot_changes();
        let (first, rest) = changes.split_at(3);
        let mut r = Replica::new(Catalog::default(), "h1");
        assert_eq!(r.apply(&msg(7, true, false, first.to_vec())).unwrap(), Update::None);
        assert_eq!(r.catalog, Catalog::default(), "half a snapshot is never published");
        assert_eq!(r.apply(&msg(7, false, true, rest.to_vec())).unwrap(), Update::Replaced);
        assert_eq!(r.catalog, cat);

        let gone = Change::DeleteEndpoint("db".into());
        assert_eq!(
            r.apply(&msg(8, false, false, vec![gone.clone()])).unwrap(),
            Update::Changed(vec![gone])
        );
        assert_eq!(r.catalog.revision, 8);
        assert!(!r.catalog.endpoints.contains_key("db"));
        // A progress message moves the revision only.
        assert_eq!(r.apply(&msg(12, false, false, vec![])).unwrap(), Update::Changed(vec![]));
        assert_eq!(r.catalog.revision, 12);
        assert_eq!(r.apply(&msg(12, false, false, vec![])).unwrap(), Update::None);

        // A new snapshot replaces everything (objects deleted meanwhile disappear).
        let mut smaller = cat.clone();
        smaller.endpoints.clear();
        smaller.routes.clear();
        assert!(changed(r.apply(&msg(20, true, true, smaller.snapshot_changes())).unwrap()));
        assert!(r.catalog.endpoints.is_empty());
        assert_eq!(r.catalog.revision, 20);
    }

    #[test]
    fn a_broken_snapshot_keeps_the_old_catalog() {
        let cat = crate::desired::tests::catalog();
        let mut r = Replica::new(cat.clone(), "h1");
        assert!(!changed(r.apply(&msg(9, true, false, vec![])).unwrap()));
        r.abort_snapshot();
        assert_eq!(r.catalog, cat);
        assert!(changed(
            r.apply(&msg(10, false, false, vec![Change::DeleteEndpoint("db".into())])).unwrap()
        ));
    }

    #[test]
    fn what_the_host_no_longer_needs_is_dropped() {
        use crate::desired::tests::ep;
        let mut cat = crate::desired::tests::catalog();
        // Two networks; endpoint "both" is in both, "x" only in front, "mine" is ours
        // and bare.
        for e in [
            ep("both", "h2", &[("front", "10.1.0.50", 50), ("back", "10.2.0.50", 51)]),
            ep("x", "h2", &[("front", "10.1.0.51", 52)]),
            ep("mine", "h1", &[]),
        ] {
            cat.endpoints.insert(e.name.clone(), e);
        }
        let before = cat.clone();
        let drop_front = Change::DeleteNetwork("front".into());
        cat.apply_change(&drop_front);
        let garbage = collect_garbage(&mut cat, "h1", &[drop_front]);
        // Everything only in front goes, routes of front too; "both" stays (back), and
        // this host's own endpoints always stay.
        assert!(cat.endpoints.contains_key("both") && cat.endpoints.contains_key("mine"));
        assert!(!cat.endpoints.contains_key("x"));
        assert!(cat.endpoints.values().all(|e| e.host == "h1"
            || e.attachments.iter().any(|a| cat.networks.contains_key(&a.network))));
        assert!(cat.routes.keys().all(|(n, _)| n != "front"));
        assert!(garbage.contains(&Change::DeleteEndpoint("x".into())));
        // Replaying what was applied gives the same catalog (the journal relies on it).
        let mut replayed = before;
        replayed.apply_change(&Change::DeleteNetwork("front".into()));
        garbage.iter().for_each(|c| replayed.apply_change(c));
        assert_eq!(replayed, cat);
        // An endpoint of another host that leaves the last network this host has goes.
        let moved = ep("both", "h2", &[("elsewhere", "10.9.0.50", 53)]);
        cat.apply_change(&Change::PutEndpoint(moved.clone()));
        assert_eq!(
            collect_garbage(&mut cat, "h1", &[Change::PutEndpoint(moved)]),
            [Change::DeleteEndpoint("both".into())]
        );
    }
}
