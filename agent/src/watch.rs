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

use overlay_model::{Catalog, Change};
use overlay_proto::pb;
use overlay_proto::pb::overlay_client::OverlayClient;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::identity::Controllers;
use crate::store::Store;

/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

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
#[derive(Debug, Clone, Default)]
pub struct Replica {
    pub catalog: Catalog,
    /// The snapshot being received, if one is in progress.
    staging: Option<Catalog>,
}

impl Replica {
    pub fn new(catalog: Catalog) -> Replica {
        Replica { catalog, staging: None }
    }

    /// Applies one message; returns true when `catalog` changed and is consistent.
    pub fn apply(&mut self, msg: &pb::WatchResponse) -> Result<bool, String> {
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
                return Ok(true);
            }
            return Ok(false);
        }
        if msg.revision <= self.catalog.revision && changes.is_empty() {
            return Ok(false);
        }
        changes.iter().for_each(|c| self.catalog.apply_change(c));
        self.catalog.revision = msg.revision;
        Ok(true)
    }

    /// Drops a half-received snapshot (the stream broke in the middle of it).
    pub fn abort_snapshot(&mut self) {
        self.staging = None;
    }
}

struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(MIN_BACKOFF)
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }
    fn reset(&mut self) {
        self.0 = MIN_BACKOFF;
    }
}

/// Watches forever (until the task is dropped), publishing each consistent catalog on
/// `tx` and persisting it in `store`.
pub async fn run_watch(
    me: Identity,
    controllers: Controllers,
    store: Store,
    mut replica: Replica,
    tx: watch::Sender<Option<Arc<Catalog>>>,
) {
    let mut backoff = Backoff::new();
    let mut next = 0usize;
    loop {
        let url = &controllers.urls[next % controllers.urls.len()];
        next += 1;
        match watch_once(&me, &controllers, url, &store, &mut replica, &tx, &mut backoff).await {
            Ok(()) => info!(controller = %url, "watch stream ended; reconnecting"),
            Err(e) => warn!(controller = %url, "watch: {e}"),
        }
        replica.abort_snapshot();
        backoff.wait().await;
    }
}

async fn watch_once(
    me: &Identity,
    controllers: &Controllers,
    url: &str,
    store: &Store,
    replica: &mut Replica,
    tx: &watch::Sender<Option<Arc<Catalog>>>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let mut client = controllers.connect(url).await?;
    let from = replica.catalog.revision;
    let cluster_id = store.cluster_id().unwrap_or_default();
    let req = pb::WatchRequest { host: me.name.clone(), from_revision: from, cluster_id };
    let mut stream = tokio::time::timeout(RPC_TIMEOUT, client.watch(req))
        .await
        .map_err(|_| format!("{url}: watch call timed out"))?
        .map_err(|s| format!("{url}: {}", s.message()))?
        .into_inner();
    info!(controller = %url, from_revision = from, "watching desired state");
    while let Some(msg) = stream.message().await.map_err(|s| format!("{url}: {}", s.message()))? {
        backoff.reset();
        adopt_cluster_id(store, &msg.cluster_id)?;
        if replica.apply(&msg)? {
            debug!(revision = replica.catalog.revision, "catalog updated");
            if let Err(e) = store.save_catalog(&replica.catalog) {
                warn!("cannot persist desired state: {e}");
            }
            tx.send_replace(Some(Arc::new(replica.catalog.clone())));
        }
    }
    Ok(())
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
            store.save_cluster_id(theirs).map_err(|e| format!("saving the cluster id: {e}"))
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
    let mut backoff = Backoff::new();
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
    tokio::time::timeout(RPC_TIMEOUT, client.register_host(req))
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
        let r = tokio::time::timeout(RPC_TIMEOUT, client.heartbeat(req))
            .await
            .map_err(|_| "heartbeat timed out".to_string())?;
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

    #[test]
    fn snapshot_then_incremental() {
        let cat = crate::desired::tests::catalog();
        let changes = cat.snapshot_changes();
        let (first, rest) = changes.split_at(3);
        let mut r = Replica::new(Catalog::default());
        assert!(!r.apply(&msg(7, true, false, first.to_vec())).unwrap());
        assert_eq!(r.catalog, Catalog::default(), "half a snapshot is never published");
        assert!(r.apply(&msg(7, false, true, rest.to_vec())).unwrap());
        assert_eq!(r.catalog, cat);

        assert!(r.apply(&msg(8, false, false, vec![Change::DeleteEndpoint("db".into())])).unwrap());
        assert_eq!(r.catalog.revision, 8);
        assert!(!r.catalog.endpoints.contains_key("db"));

        // A new snapshot replaces everything (objects deleted meanwhile disappear).
        let mut smaller = cat.clone();
        smaller.endpoints.clear();
        smaller.routes.clear();
        assert!(r.apply(&msg(20, true, true, smaller.snapshot_changes())).unwrap());
        assert!(r.catalog.endpoints.is_empty());
        assert_eq!(r.catalog.revision, 20);
    }

    #[test]
    fn a_broken_snapshot_keeps_the_old_catalog() {
        let cat = crate::desired::tests::catalog();
        let mut r = Replica::new(cat.clone());
        assert!(!r.apply(&msg(9, true, false, vec![])).unwrap());
        r.abort_snapshot();
        assert_eq!(r.catalog, cat);
        assert!(r
            .apply(&msg(10, false, false, vec![Change::DeleteEndpoint("db".into())]))
            .unwrap());
    }
}
