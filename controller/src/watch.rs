//! The watch hub: a mirror of the catalog shaped for serving watchers, the recent
//! history of applied revisions, and a broadcast of new ones, from which each agent's
//! Watch stream is served (see `api::watch`).
//!
//! A stream narrowed to one host (issue 14: 1,000 hosts × 100,000 endpoints) carries
//! every host and network, whole endpoints and routes only for the networks the host
//! *wants* ([`Mirror::wanted_by`]: those its endpoints are attached to, and those their
//! routes lead into, for DNS across gateways), and every other endpoint by name only
//! (`Change::PutNames`, packed: DNS must answer NXDOMAIN for every overlay name).
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
use overlay_model::{
    Applied, Catalog, Change, Endpoint, Host, NameEntry, Network, Route, RouteKey,
};
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

/// Packed names per `PutNames` record, so no record outgrows a chunk.
const NAMES_PER_RECORD: usize = 1000;

/// `entries` as `PutNames` records of at most [`NAMES_PER_RECORD`] each.
pub fn names_records(entries: impl IntoIterator<Item = NameEntry>) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    for e in entries {
        batch.push(e);
        if batch.len() == NAMES_PER_RECORD {
            out.push(record(&Change::PutNames(std::mem::take(&mut batch))));
        }
    }
    if !batch.is_empty() {
        out.push(record(&Change::PutNames(batch)));
    }
    out
}

/// One network's objects as of some revision: immutable once shared (the mirror
/// copies it on write), with its encoded forms built on first use.
#[derive(Debug, Clone)]
pub struct NetContent {
    network: Network,
    endpoints: BTreeMap<String, Arc<Endpoint>>,
    routes: BTreeMap<RouteKey, Route>,
    encoded: OnceLock<Chunks>,
    named: OnceLock<Chunks>,
}

impl NetContent {
    fn new(network: Network) -> NetContent {
        NetContent {
            network,
            endpoints: BTreeMap::new(),
            routes: BTreeMap::new(),
            encoded: OnceLock::new(),
            named: OnceLock::new(),
        }
    }

    /// What a host that does not want this network gets: `PutNetwork`, and its
    /// endpoints by name (encoded once per version of this network).
    pub fn names_chunks(&self) -> Chunks {
        self.named
            .get_or_init(|| {
                let net = record(&Change::PutNetwork(self.network.clone()));
                let names = names_records(self.endpoints.values().map(|e| NameEntry::of(e)));
                encode::chunks(std::iter::once(net).chain(names))
            })
            .clone()
    }

    /// What a host that stops wanting this network gets (`wanted`: what it still
    /// wants; `me`: its name): the endpoints it keeps no reason to hold whole, by name,
    /// and the network's routes deleted.
    pub fn release(&self, me: &str, wanted: &BTreeSet<String>) -> Vec<Bytes> {
        let downgraded = self
            .endpoints
            .values()
            .filter(|e| e.host != me && !e.attachments.iter().any(|a| wanted.contains(&a.network)))
            .map(|e| NameEntry::of(e));
        let mut out = names_records(downgraded);
        out.extend(self.routes.keys().map(|k| record(&Change::DeleteRoute(k.clone()))));
        out
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
    n.named = OnceLock::new();
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
    /// Networks the watcher does not want: sent with their endpoints' names only.
    pub named: Vec<Arc<NetContent>>,
    /// Networks sent whole.
    pub networks: Vec<Arc<NetContent>>,
    /// The watcher's endpoints with no attachment (no network carries them).
    pub bare: Vec<Arc<Endpoint>>,
    /// Other hosts' endpoints with no attachment, by name.
    pub bare_names: Vec<NameEntry>,
}

impl SnapshotParts {
    /// The bodies to send, in order: hosts, networks known by names (before the whole
    /// ones: a name replaces a whole endpoint, and an endpoint attached to a wanted and
    /// an unwanted network must end up whole), whole networks (with their endpoints and
    /// routes), bare endpoints.
    pub fn bodies(&self) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = self.hosts.chunks().to_vec();
        for n in &self.named {
            out.extend(n.names_chunks().iter().cloned());
        }
        for n in &self.networks {
            out.extend(n.chunks().iter().cloned());
        }
        out.extend(names_records(self.bare_names.iter().cloned()));
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
    /// Network -> the hosts with an endpoint attached to it.
    carriers: BTreeMap<String, BTreeSet<String>>,
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

    /// The networks `host` needs whole: those its endpoints are attached to, and those
    /// whose subnets the routes of these lead into (DNS answers `NAME.NETWORK` across
    /// a gateway).
    fn wanted_by(&self, host: &str) -> BTreeSet<String> {
        let carried: BTreeSet<String> =
            self.carried.get(host).map(|m| m.keys().cloned().collect()).unwrap_or_default();
        let mut wanted = carried.clone();
        for name in &carried {
            let Some(net) = self.networks.get(name) else { continue };
            for route in net.routes.values() {
                wanted.extend(
                    self.networks
                        .iter()
                        .filter(|(_, m)| m.network.subnet.overlaps(route.destination))
                        .map(|(m, _)| m.clone()),
                );
            }
        }
        wanted
    }

    /// Hosts whose wanted networks a change to a route of `network` may change.
    fn carriers_of(&self, network: &str) -> Vec<String> {
        self.carriers.get(network).map(|h| h.iter().cloned().collect()).unwrap_or_default()
    }

    /// Hosts whose wanted networks a network appearing, changing or going away may
    /// change: carriers of networks with routes (few; routes are rare).
    fn route_carriers(&self) -> Vec<String> {
        let mut hosts = BTreeSet::new();
        for (name, net) in &self.networks {
            if !net.routes.is_empty() {
                hosts.extend(self.carriers.get(name).into_iter().flatten().cloned());
            }
        }
        hosts.into_iter().collect()
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
            self.carriers.entry(a.network.clone()).or_default().insert(e.host.clone());
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
                        if let Some(hosts) = self.carriers.get_mut(&a.network) {
                            hosts.remove(&e.host);
                            if hosts.is_empty() {
                                self.carriers.remove(&a.network);
                            }
                        }
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
        // What the hosts a change may concern wanted before it, to find who starts or
        // stops wanting a network.
        let mut before: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut remember = |m: &Mirror, hosts: Vec<String>| {
            for h in hosts {
                if let std::collections::btree_map::Entry::Vacant(slot) = before.entry(h) {
                    let wanted = m.wanted_by(slot.key());
                    slot.insert(wanted);
                }
            }
        };
        let everyone = || Scope { everyone: true, ..Scope::default() };
        let mut changes = Vec::with_capacity(applied.changes.len());
        for change in &applied.changes {
            let mut names = None;
            let scope = match change {
                Change::PutHost(h) => {
                    edit_hosts(&mut self.hosts).hosts.insert(h.name.clone(), h.clone());
                    everyone()
                }
                Change::DeleteHost(name) => {
                    edit_hosts(&mut self.hosts).hosts.remove(name);
                    everyone()
                }
                Change::PutNetwork(n) => {
                    remember(self, self.route_carriers());
                    match self.networks.get_mut(&n.name) {
                        Some(c) => edit_net(c).network = n.clone(),
                        None => {
                            self.networks
                                .insert(n.name.clone(), Arc::new(NetContent::new(n.clone())));
                        }
                    }
                    everyone()
                }
                Change::DeleteNetwork(name) => {
                    remember(self, self.route_carriers());
                    self.networks.remove(name);
                    everyone()
                }
                Change::PutEndpoint(e) => {
                    let e = Arc::new(e.clone());
                    let old = self.endpoints.insert(e.name.clone(), e.clone());
                    let mut scope = Scope::default();
                    for ep in old.iter().chain(std::iter::once(&e)) {
                        if !scope.hosts.contains(&ep.host) {
                            scope.hosts.push(ep.host.clone());
                        }
                    }
                    remember(self, scope.hosts.clone());
                    scope.networks = e.attachments.iter().map(|a| a.network.clone()).collect();
                    if let Some(old) = &old {
                        scope.was_in = old
                            .attachments
                            .iter()
                            .map(|a| &a.network)
                            .filter(|n| !scope.networks.contains(n))
                            .cloned()
                            .collect();
                    }
                    let entry = NameEntry::of(&e);
                    scope.renamed = old.as_deref().map(NameEntry::of).as_ref() != Some(&entry);
                    if scope.renamed || !scope.was_in.is_empty() {
                        names = Some(record(&Change::PutNames(vec![entry])));
                    }
                    if let Some(old) = &old {
                        self.unlink(old);
                    }
                    self.link(&e);
                    scope
                }
                Change::DeleteEndpoint(name) => {
                    if let Some(old) = self.endpoints.remove(name) {
                        remember(self, vec![old.host.clone()]);
                        self.unlink(&old);
                    }
                    // Everyone knows every endpoint, whole or by name.
                    everyone()
                }
                Change::PutRoute(r) => {
                    remember(self, self.carriers_of(&r.network));
                    if let Some(n) = self.networks.get_mut(&r.network) {
                        edit_net(n).routes.insert(r.key(), r.clone());
                    }
                    Scope { networks: vec![r.network.clone()], ..Scope::default() }
                }
                Change::DeleteRoute(key) => {
                    remember(self, self.carriers_of(&key.0));
                    if let Some(n) = self.networks.get_mut(&key.0) {
                        edit_net(n).routes.remove(key);
                    }
                    Scope { networks: vec![key.0.clone()], ..Scope::default() }
                }
                // Never applied by the state machine: only streams make these.
                Change::PutNames(_) => Scope::default(),
            };
            changes.push(EventChange { scope, record: record(change), names });
        }
        self.revision = applied.revision;
        let mut joins = Vec::new();
        let mut leaves = Vec::new();
        for (host, was) in before {
            let now = self.wanted_by(&host);
            joins.extend(now.difference(&was).map(|n| (host.clone(), n.clone())));
            leaves.extend(was.difference(&now).map(|n| (host.clone(), n.clone())));
        }
        Event { revision: applied.revision, changes, joins, leaves }
    }

    fn snapshot(&self, host: Option<&str>) -> (HostView, SnapshotParts) {
        let Some(me) = host else {
            let parts = SnapshotParts {
                hosts: self.hosts.clone(),
                named: Vec::new(),
                networks: self.networks.values().cloned().collect(),
                bare: self
                    .bare
                    .values()
                    .flatten()
                    .filter_map(|n| self.endpoints.get(n).cloned())
                    .collect(),
                bare_names: Vec::new(),
            };
            return (HostView::new(None, BTreeSet::new()), parts);
        };
        let wanted = self.wanted_by(me);
        let (networks, named) =
            self.networks.iter().partition::<Vec<_>, _>(|(name, _)| wanted.contains(*name));
        let mut bare = Vec::new();
        let mut bare_names = Vec::new();
        for (host, names) in &self.bare {
            for e in names.iter().filter_map(|n| self.endpoints.get(n)) {
                if host == me {
                    bare.push(e.clone());
                } else {
                    bare_names.push(NameEntry::of(e));
                }
            }
        }
        let parts = SnapshotParts {
            hosts: self.hosts.clone(),
            named: named.into_iter().map(|(_, n)| n.clone()).collect(),
            networks: networks.into_iter().map(|(_, n)| n.clone()).collect(),
            bare,
            bare_names,
        };
        (HostView::new(Some(me.to_string()), wanted), parts)
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
        assert_eq!(c.networks.keys().collect::<Vec<_>>(), ["a", "b"], "every network");
        assert_eq!(c.endpoints.keys().collect::<Vec<_>>(), ["bare", "x1", "y1"]);
        assert_eq!(c.names.keys().collect::<Vec<_>>(), ["y2"], "the rest by name");
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
        assert_eq!(view.wanted().iter().collect::<Vec<_>>(), ["a"]);
        assert_eq!(events.len(), 2);
        // A fresh snapshot now: b whole, x1 as a bare endpoint, y1 (in a) by name.
        let c = catalog_of(&hub.subscribe(Some("h1"), 0).0);
        assert_eq!(c.endpoints.keys().collect::<Vec<_>>(), ["bare", "x1", "x2", "y2"]);
        assert_eq!(c.names.keys().collect::<Vec<_>>(), ["y1"]);
        assert_eq!(c.revision, 7);
    }

    /// What a per-host stream sends for the events after `from`, applied to `start`
    /// (as `api::watch` does: joins whole, leaves released).
    fn follow(hub: &WatchHub, host: &str, mut c: Catalog, from: u64) -> Catalog {
        let Start::Replay { mut view, events } = hub.subscribe(Some(host), from).0 else {
            panic!("kept")
        };
        for event in events {
            let mut bodies = Vec::new();
            for piece in view.filter(&event) {
                match piece {
                    Piece::Record(b) => bodies.push(b.clone()),
                    Piece::Network(n) => bodies.extend(hub.network(n).unwrap().chunks().to_vec()),
                    Piece::Dropped(n) => {
                        bodies.extend(hub.network(n).unwrap().release(host, view.wanted()))
                    }
                }
            }
            for f in frames(event.revision, &Arc::from(""), bodies, false) {
                for ch in f.to_message().unwrap().changes {
                    c.apply_change(&Change::try_from(&ch).unwrap());
                }
            }
            c.revision = event.revision;
        }
        c
    }

    #[test]
    fn a_followed_stream_ends_where_a_fresh_snapshot_starts() {
        let hub = WatchHub::new(&base(), 100);
        let start = catalog_of(&hub.subscribe(Some("h1"), 0).0);
        let route = Route {
            network: "a".into(),
            destination: "10.0.2.0/24".parse().unwrap(),
            via: "x1".into(),
        };
        let steps = vec![
            // a new endpoint in b (h1 does not want b): by name
            Change::PutEndpoint(ep("y3", "h2", &[("b", 2, 30)])),
            // a route from a into b: h1 now wants b, whole
            Change::PutRoute(route.clone()),
            Change::PutEndpoint(ep("y4", "h2", &[("b", 2, 40)])),
            // the route goes: b's endpoints by name again
            Change::DeleteRoute(route.key()),
            // y1 leaves a for b: h1 gets it by name
            Change::PutEndpoint(ep("y1", "h2", &[("b", 2, 21)])),
            Change::DeleteEndpoint("y2".into()),
        ];
        let mut fresh = Vec::new();
        for (i, change) in steps.into_iter().enumerate() {
            let rev = 6 + i as u64;
            hub.publish(&applied(rev, vec![change]));
            fresh.push(catalog_of(&hub.subscribe(Some("h1"), 0).0));
        }
        let followed = follow(&hub, "h1", start, 5);
        assert_eq!(followed, *fresh.last().unwrap());
        assert_eq!(followed.endpoints.keys().collect::<Vec<_>>(), ["bare", "x1"]);
        assert_eq!(followed.names.keys().collect::<Vec<_>>(), ["y1", "y3", "y4"]);
        // While the route was there, b was wanted: its endpoints whole, its route too.
        let with_route = &fresh[2];
        assert_eq!(
            with_route.endpoints.keys().collect::<Vec<_>>(),
            ["bare", "x1", "y1", "y2", "y3", "y4"]
        );
        assert!(with_route.names.is_empty());
        assert_eq!(with_route.routes.len(), 1);
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
