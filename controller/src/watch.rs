//! The watch hub: a mirror of the catalog shaped for serving watchers, the recent
//! history of applied revisions, and a broadcast of new ones, from which each agent's
//! Watch stream is served (see `api::watch`).
//!
//! Memory is O(catalog + watchers), not O(watchers × catalog): the mirror holds each
//! network's objects behind an `Arc` ([`NetContent`]) whose encoded form is built once
//! per version of the network and shared by every stream that sends it; each applied
//! change is encoded once ([`Event`]). A stream holds only references and a small
//! per-host [`HostView`].
//!
//! The driver publishes while it holds the state write lock; the hub's own lock makes a
//! watcher's starting point (a snapshot of the mirror, or a replay from history) and the
//! live events after it never overlap or leave a gap. Nothing is encoded under either
//! lock but single changes. A slow watcher never blocks the driver: it falls behind the
//! broadcast buffer, notices `Lagged`, and starts over from a fresh snapshot.

mod encode;
mod view;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use overlay_model::{Applied, Catalog, Change, Endpoint, Host, Network, Route, RouteKey};
use tokio::sync::broadcast;

pub use encode::{frames, live_frames, progress, record, Chunks, Frame, WatchCodec};
pub use view::{Event, EventChange, HostView, Piece, Scope};

/// Events a lagging watcher may be behind before it starts over from a snapshot.
const BROADCAST_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub enum HubEvent {
    Applied(Arc<Event>),
    /// The state was replaced wholesale (a snapshot from the leader): start over.
    Reset,
}

/// One network's objects as of some revision: immutable once shared (the mirror
/// copies it on write), with its encoded form built on first use.
#[derive(Debug, Clone)]
pub struct NetContent {
    network: Network,
    endpoints: BTreeMap<String, Arc<Endpoint>>,
    routes: BTreeMap<RouteKey, Route>,
    encoded: OnceLock<Chunks>,
}

impl NetContent {
    fn new(network: Network) -> NetContent {
        NetContent {
            network,
            endpoints: BTreeMap::new(),
            routes: BTreeMap::new(),
            encoded: OnceLock::new(),
        }
    }

    /// `PutNetwork`, `PutEndpoint` for each attached endpoint, `PutRoute` for each
    /// route, encoded (once per version of this network).
    pub fn chunks(&self) -> Chunks {
        self.encoded
            .get_or_init(|| {
                let net = std::iter::once(Change::PutNetwork(self.network.clone()));
                let eps = self.endpoints.values().map(|e| Change::PutEndpoint((**e).clone()));
                let routes = self.routes.values().map(|r| Change::PutRoute(r.clone()));
                encode::chunks(net.chain(eps).chain(routes).map(|c| record(&c)))
            })
            .clone()
    }
}

/// Every host, encoded once per version.
#[derive(Debug, Clone, Default)]
pub struct HostsContent {
    hosts: BTreeMap<String, Host>,
    encoded: OnceLock<Chunks>,
}

impl HostsContent {
    pub fn chunks(&self) -> Chunks {
        self.encoded
            .get_or_init(|| {
                encode::chunks(self.hosts.values().map(|h| record(&Change::PutHost(h.clone()))))
            })
            .clone()
    }
}

/// Copy-on-write access that drops the stale encoded form.
fn edit_net(net: &mut Arc<NetContent>) -> &mut NetContent {
    let n = Arc::make_mut(net);
    n.encoded = OnceLock::new();
    n
}

fn edit_hosts(hosts: &mut Arc<HostsContent>) -> &mut HostsContent {
    let h = Arc::make_mut(hosts);
    h.encoded = OnceLock::new();
    h
}

/// What a snapshot for one watcher consists of, taken under the hub's lock and
/// encoded (or found encoded) after it is released.
pub struct SnapshotParts {
    pub hosts: Arc<HostsContent>,
    pub networks: Vec<Arc<NetContent>>,
    /// The watcher's endpoints with no attachment (no network carries them).
    pub bare: Vec<Arc<Endpoint>>,
}

impl SnapshotParts {
    /// The bodies to send, in order: hosts, networks (with their endpoints and
    /// routes), bare endpoints.
    pub fn bodies(&self) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = self.hosts.chunks().to_vec();
        for n in &self.networks {
            out.extend(n.chunks().iter().cloned());
        }
        out.extend(self.bare.iter().map(|e| record(&Change::PutEndpoint((**e).clone()))));
        out
    }
}

/// Where a new watcher starts.
pub enum Start {
    /// The events after the watcher's revision, in order, and what it carried then.
    Replay { view: HostView, events: Vec<Arc<Event>> },
    /// Everything the watcher needs at `revision`: the revision asked for is older
    /// than the history kept (or 0).
    Snapshot { revision: u64, view: HostView, parts: SnapshotParts },
}

/// The catalog as the streams need it.
#[derive(Debug, Default)]
struct Mirror {
    revision: u64,
    hosts: Arc<HostsContent>,
    networks: BTreeMap<String, Arc<NetContent>>,
    endpoints: BTreeMap<String, Arc<Endpoint>>,
    /// Host -> network -> how many of the host's endpoints are attached to it.
    carried: BTreeMap<String, BTreeMap<String, usize>>,
    /// Host -> its endpoints with no attachment.
    bare: BTreeMap<String, BTreeSet<String>>,
}

impl Mirror {
    fn build(catalog: &Catalog) -> Mirror {
        let mut m = Mirror { revision: catalog.revision, ..Mirror::default() };
        edit_hosts(&mut m.hosts).hosts = catalog.hosts.clone();
        for n in catalog.networks.values() {
            m.networks.insert(n.name.clone(), Arc::new(NetContent::new(n.clone())));
        }
        for e in catalog.endpoints.values() {
            let e = Arc::new(e.clone());
            m.link(&e);
            m.endpoints.insert(e.name.clone(), e);
        }
        for (key, r) in &catalog.routes {
            if let Some(n) = m.networks.get_mut(&r.network) {
                edit_net(n).routes.insert(key.clone(), r.clone());
            }
        }
        m
    }

    fn carried_by(&self, host: &str) -> BTreeSet<String> {
        self.carried.get(host).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    fn link(&mut self, e: &Arc<Endpoint>) {
        if e.attachments.is_empty() {
            self.bare.entry(e.host.clone()).or_default().insert(e.name.clone());
        }
        for a in &e.attachments {
            if let Some(n) = self.networks.get_mut(&a.network) {
                edit_net(n).endpoints.insert(e.name.clone(), e.clone());
            }
            *self
                .carried
                .entry(e.host.clone())
                .or_default()
                .entry(a.network.clone())
                .or_default() += 1;
        }
    }

    fn unlink(&mut self, e: &Endpoint) {
        if let Some(set) = self.bare.get_mut(&e.host) {
            set.remove(&e.name);
            if set.is_empty() {
                self.bare.remove(&e.host);
            }
        }
        for a in &e.attachments {
            if let Some(n) = self.networks.get_mut(&a.network) {
                edit_net(n).endpoints.remove(&e.name);
            }
            if let Some(nets) = self.carried.get_mut(&e.host) {
                if let Some(count) = nets.get_mut(&a.network) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        nets.remove(&a.network);
                    }
                }
                if nets.is_empty() {
                    self.carried.remove(&e.host);
                }
            }
        }
    }

    /// Applies one revision and says what it means to watchers.
    fn apply(&mut self, applied: &Applied) -> Event {
        // What the hosts touched carried before, to find who starts or stops carrying.
        let mut before: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut changes = Vec::with_capacity(applied.changes.len());
        for change in &applied.changes {
            let scope = match change {
                Change::PutHost(h) => {
                    edit_hosts(&mut self.hosts).hosts.insert(h.name.clone(), h.clone());
                    Scope { everyone: true, ..Scope::default() }
                }
                Change::DeleteHost(name) => {
                    edit_hosts(&mut self.hosts).hosts.remove(name);
                    Scope { everyone: true, ..Scope::default() }
                }
                Change::PutNetwork(n) => {
                    match self.networks.get_mut(&n.name) {
                        Some(c) => edit_net(c).network = n.clone(),
                        None => {
                            self.networks
                                .insert(n.name.clone(), Arc::new(NetContent::new(n.clone())));
                        }
                    }
                    Scope { networks: vec![n.name.clone()], ..Scope::default() }
                }
                Change::DeleteNetwork(name) => {
                    self.networks.remove(name);
                    Scope { networks: vec![name.clone()], ..Scope::default() }
                }
                Change::PutEndpoint(e) => {
                    let e = Arc::new(e.clone());
                    let old = self.endpoints.insert(e.name.clone(), e.clone());
                    let mut scope = Scope::default();
                    for ep in old.iter().chain(std::iter::once(&e)) {
                        if !scope.hosts.contains(&ep.host) {
                            scope.hosts.push(ep.host.clone());
                            before
                                .entry(ep.host.clone())
                                .or_insert_with(|| self.carried_by(&ep.host));
                        }
                        for a in &ep.attachments {
                            if !scope.networks.contains(&a.network) {
                                scope.networks.push(a.network.clone());
                            }
                        }
                    }
                    if let Some(old) = &old {
                        self.unlink(old);
                    }
                    self.link(&e);
                    scope
                }
                Change::DeleteEndpoint(name) => match self.endpoints.remove(name) {
                    Some(old) => {
                        before
                            .entry(old.host.clone())
                            .or_insert_with(|| self.carried_by(&old.host));
                        self.unlink(&old);
                        Scope {
                            everyone: false,
                            hosts: vec![old.host.clone()],
                            networks: old.attachments.iter().map(|a| a.network.clone()).collect(),
                        }
                    }
                    // Unknown here: whoever might have it gets the deletion.
                    None => Scope { everyone: true, ..Scope::default() },
                },
                Change::PutRoute(r) => {
                    if let Some(n) = self.networks.get_mut(&r.network) {
                        edit_net(n).routes.insert(r.key(), r.clone());
                    }
                    Scope { networks: vec![r.network.clone()], ..Scope::default() }
                }
                Change::DeleteRoute(key) => {
                    if let Some(n) = self.networks.get_mut(&key.0) {
                        edit_net(n).routes.remove(key);
                    }
                    Scope { networks: vec![key.0.clone()], ..Scope::default() }
                }
            };
            changes.push(EventChange { scope, record: record(change) });
        }
        self.revision = applied.revision;
        let mut joins = Vec::new();
        let mut leaves = Vec::new();
        for (host, was) in before {
            let now = self.carried_by(&host);
            joins.extend(now.difference(&was).map(|n| (host.clone(), n.clone())));
            leaves.extend(was.difference(&now).map(|n| (host.clone(), n.clone())));
        }
        Event { revision: applied.revision, changes, joins, leaves }
    }

    fn snapshot(&self, host: Option<&str>) -> (HostView, SnapshotParts) {
        let (carried, bare): (BTreeSet<String>, Vec<Arc<Endpoint>>) = match host {
            Some(h) => (
                self.carried_by(h),
                self.bare
                    .get(h)
                    .into_iter()
                    .flatten()
                    .filter_map(|n| self.endpoints.get(n).cloned())
                    .collect(),
            ),
            None => (
                self.networks.keys().cloned().collect(),
                self.bare
                    .values()
                    .flatten()
                    .filter_map(|n| self.endpoints.get(n).cloned())
                    .collect(),
            ),
        };
        let networks = carried.iter().filter_map(|n| self.networks.get(n).cloned()).collect();
        let view = HostView::new(
            host.map(str::to_string),
            match host {
                Some(_) => carried,
                None => BTreeSet::new(),
            },
        );
        (view, SnapshotParts { hosts: self.hosts.clone(), networks, bare })
    }
}

pub struct WatchHub {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<HubEvent>,
}

struct Inner {
    mirror: Mirror,
    /// Revision just before the first kept event: history covers (base, newest].
    base: u64,
    history: VecDeque<Arc<Event>>,
    capacity: usize,
}

impl WatchHub {
    /// A hub serving `catalog`, keeping up to `capacity` revisions for resuming watchers.
    pub fn new(catalog: &Catalog, capacity: usize) -> WatchHub {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        WatchHub {
            inner: Mutex::new(Inner {
                mirror: Mirror::build(catalog),
                base: catalog.revision,
                history: VecDeque::new(),
                capacity,
            }),
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every mutation completes or leaves the mirror as a later reset rebuilds it;
        // recover from poisoning rather than stop serving watchers.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the driver, with the state write lock held, for every applied command
    /// that changed something.
    pub fn publish(&self, applied: &Applied) {
        let mut h = self.lock();
        let event = Arc::new(h.mirror.apply(applied));
        h.history.push_back(event.clone());
        while h.history.len() > h.capacity {
            if let Some(old) = h.history.pop_front() {
                h.base = old.revision;
            }
        }
        // Sent under the lock, so a subscriber sees each event either in its starting
        // point or on its receiver, never both or neither.
        let _ = self.tx.send(HubEvent::Applied(event));
    }

    /// Called by the driver, with the state write lock held, after replacing the state.
    pub fn reset(&self, catalog: &Catalog) {
        let mut h = self.lock();
        h.mirror = Mirror::build(catalog);
        h.history.clear();
        h.base = catalog.revision;
        let _ = self.tx.send(HubEvent::Reset);
    }

    /// Where a watcher for `host` (`None`: everything) that has applied `from_revision`
    /// starts, and the live events after that.
    pub fn subscribe(
        &self,
        host: Option<&str>,
        from_revision: u64,
    ) -> (Start, broadcast::Receiver<HubEvent>) {
        let h = self.lock();
        let rx = self.tx.subscribe();
        if from_revision == 0 || from_revision < h.base {
            let (view, parts) = h.mirror.snapshot(host);
            return (Start::Snapshot { revision: h.mirror.revision, view, parts }, rx);
        }
        let (mut view, _) = h.mirror.snapshot(host);
        let events: Vec<Arc<Event>> =
            h.history.iter().filter(|e| e.revision > from_revision).cloned().collect();
        for e in events.iter().rev() {
            view.rewind(e);
        }
        (Start::Replay { view, events }, rx)
    }

    /// A network's objects as they are now (for a host that starts carrying it).
    pub fn network(&self, name: &str) -> Option<Arc<NetContent>> {
        self.lock().mirror.networks.get(name).cloned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use overlay_model::{Attachment, HostStatus, Mac};

    fn net(name: &str, third: u8) -> Network {
        Network {
            name: name.into(),
            subnet: format!("10.0.{third}.0/24").parse().unwrap(),
            gateway: format!("10.0.{third}.1").parse().unwrap(),
            vni: 4096 + u32::from(third),
            mtu: 1450,
            encap: overlay_model::Encap::Vxlan,
            encrypted: false,
            internal: false,
        }
    }

    fn ep(name: &str, host: &str, nets: &[(&str, u8, u8)]) -> Endpoint {
        Endpoint {
            name: name.into(),
            host: host.into(),
            attachments: nets
                .iter()
                .enumerate()
                .map(|(i, (n, third, last))| {
                    let ip = std::net::Ipv4Addr::new(10, 0, *third, *last);
                    Attachment {
                        network: n.to_string(),
                        interface: format!("eth{i}"),
                        ip,
                        mac: Mac::from_ip(ip),
                        aliases: vec![],
                    }
                })
                .collect(),
        }
    }

    fn host(name: &str, last: u8) -> Host {
        Host {
            name: name.into(),
            underlay_ip: std::net::Ipv4Addr::new(192, 0, 2, last),
            underlay_mtu: 1500,
            status: HostStatus::Ready,
            status_changed_ms: 0,
            underlay_prefix: 24,
        }
    }

    fn applied(revision: u64, changes: Vec<Change>) -> Applied {
        Applied { revision, changes }
    }

    /// What the frames of a start say, applied to an empty catalog.
    fn catalog_of(start: &Start) -> Catalog {
        let mut c = Catalog::default();
        let Start::Snapshot { revision, parts, .. } = start else { panic!("not a snapshot") };
        for f in frames(*revision, &Arc::from(""), parts.bodies(), true) {
            for ch in f.to_message().unwrap().changes {
                c.apply_change(&Change::try_from(&ch).unwrap());
            }
        }
        c.revision = *revision;
        c
    }

    fn base() -> Catalog {
        let mut c = Catalog::default();
        for change in [
            Change::PutHost(host("h1", 1)),
            Change::PutHost(host("h2", 2)),
            Change::PutNetwork(net("a", 1)),
            Change::PutNetwork(net("b", 2)),
            Change::PutEndpoint(ep("x1", "h1", &[("a", 1, 10)])),
            Change::PutEndpoint(ep("y1", "h2", &[("a", 1, 20)])),
            Change::PutEndpoint(ep("y2", "h2", &[("b", 2, 20)])),
            Change::PutEndpoint(ep("bare", "h1", &[])),
        ] {
            c.apply_change(&change);
        }
        c.revision = 5;
        c
    }

    #[test]
    fn a_snapshot_holds_what_the_host_needs() {
        let hub = WatchHub::new(&base(), 100);
        let start = hub.subscribe(Some("h1"), 0).0;
        let c = catalog_of(&start);
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.networks.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(c.endpoints.keys().collect::<Vec<_>>(), ["bare", "x1", "y1"]);
        // Without a host: the whole catalog.
        assert_eq!(catalog_of(&hub.subscribe(None, 0).0), base());
    }

    #[test]
    fn joins_and_leaves_follow_the_hosts_endpoints() {
        let hub = WatchHub::new(&base(), 100);
        let (_, mut rx) = hub.subscribe(Some("h1"), 5);
        // h1 gets an endpoint in b: it starts carrying b.
        hub.publish(&applied(6, vec![Change::PutEndpoint(ep("x2", "h1", &[("b", 2, 10)]))]));
        // x1 leaves a (disconnected from its last network): h1 stops carrying a.
        hub.publish(&applied(7, vec![Change::PutEndpoint(ep("x1", "h1", &[]))]));
        let HubEvent::Applied(e6) = rx.try_recv().unwrap() else { panic!() };
        let HubEvent::Applied(e7) = rx.try_recv().unwrap() else { panic!() };
        assert_eq!(e6.joins, [("h1".to_string(), "b".to_string())]);
        assert!(e6.leaves.is_empty());
        assert_eq!(e7.leaves, [("h1".to_string(), "a".to_string())]);

        // A watcher resuming from 5 starts with h1's view as of 5 (a only).
        let Start::Replay { view, events } = hub.subscribe(Some("h1"), 5).0 else { panic!() };
        assert_eq!(view.carried().iter().collect::<Vec<_>>(), ["a"]);
        assert_eq!(events.len(), 2);
        // A fresh snapshot now: b only, and x1 as a bare endpoint.
        let c = catalog_of(&hub.subscribe(Some("h1"), 0).0);
        assert_eq!(c.networks.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(c.endpoints.keys().collect::<Vec<_>>(), ["bare", "x1", "x2", "y2"]);
        assert_eq!(c.revision, 7);
    }

    #[test]
    fn replays_what_it_kept_and_snapshots_what_it_dropped() {
        let hub = WatchHub::new(&Catalog::default(), 3);
        for r in 1..=5 {
            hub.publish(&applied(r, vec![Change::PutHost(host(&format!("h{r}"), r as u8))]));
        }
        match hub.subscribe(Some("h1"), 3).0 {
            Start::Replay { events, .. } => {
                assert_eq!(events.iter().map(|e| e.revision).collect::<Vec<_>>(), [4, 5])
            }
            Start::Snapshot { .. } => panic!("revision 3 is kept"),
        }
        assert!(matches!(hub.subscribe(Some("h1"), 1).0, Start::Snapshot { .. }));
        assert!(matches!(hub.subscribe(Some("h1"), 0).0, Start::Snapshot { .. }));
        // A watcher ahead of this member (it watched another member) waits for it.
        match hub.subscribe(Some("h1"), 9).0 {
            Start::Replay { events, .. } => assert!(events.is_empty()),
            Start::Snapshot { .. } => panic!("a future revision needs no snapshot"),
        }
    }

    #[test]
    fn shared_content_is_copied_on_write_and_encoded_once_per_version() {
        let hub = WatchHub::new(&base(), 100);
        let a1 = hub.network("a").unwrap();
        let first = a1.chunks();
        assert!(Arc::ptr_eq(&first, &hub.network("a").unwrap().chunks()), "encoded once");
        hub.publish(&applied(6, vec![Change::PutEndpoint(ep("y3", "h2", &[("a", 1, 30)]))]));
        let a2 = hub.network("a").unwrap();
        assert_eq!(a1.endpoints.len(), 2, "a holder's version never changes");
        assert_eq!(a2.endpoints.len(), 3);
        assert!(!Arc::ptr_eq(&first, &a2.chunks()));
    }

    #[tokio::test]
    async fn live_events_follow_the_subscription() {
        let hub = WatchHub::new(&Catalog::default(), 10);
        let (_, mut rx) = hub.subscribe(None, 0);
        hub.publish(&applied(1, vec![Change::PutHost(host("h1", 1))]));
        hub.reset(&Catalog::default());
        assert!(matches!(rx.recv().await.unwrap(), HubEvent::Applied(a) if a.revision == 1));
        assert!(matches!(rx.recv().await.unwrap(), HubEvent::Reset));
    }
}
