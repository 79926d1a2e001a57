//! The replicated state machine.
//!
//! Every controller replica feeds the same committed [`Command`]s, in the same order, to
//! [`State::apply`] and must end with byte-identical state: so nothing here reads a
//! clock, draws a random number or iterates a hash map. A command is validated in full
//! before anything changes, so a refused command leaves the state exactly as it was and
//! replicas never diverge on a half-applied one.
//!
//! What watchers (agents, the DNS, `overlayctl`) need is the [`Catalog`]: the objects
//! plus a revision. Each applied command returns the object-level [`Change`]s it made, so
//! a watcher can replicate the catalog from a stream of [`Applied`] without knowing any
//! of the rules. The allocator state (IPAM with its serial cursors) lives beside the
//! catalog because only the controller decides addresses; MACs follow addresses
//! ([`Mac::from_ip`]), so they need no allocator.
//!
//! Lookups on the hot paths (endpoint create/connect/disconnect/remove) go through
//! indexes derived from the catalog, so they stay O(log n) with 100k+ endpoints. The
//! indexes are rebuilt on load, never serialized, so they cannot disagree with a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::ipam::{Ipam, IpamV1};
use crate::names::validate_name;
use crate::status::EndpointStatus;
use crate::types::*;
use crate::{validate, Command, ModelError, NetworkSpec};

/// Container attachments (CNI, issue 12): interfaces named by the runtime, commands
/// guarded by the endpoint's host.
mod containers;
#[cfg(test)]
mod fixtures;
/// Endpoint statuses (issue 15): agents' reports, reset when an endpoint changes.
mod statuses;

/// How many names an "in use" error lists before summarising the rest as a count.
const LISTED_NAMES: usize = 5;

/// First byte of [`State::to_bytes`], so a future layout can still read old snapshots.
/// Format 5: format 4 plus the endpoint statuses (issue 15). Format 4: hosts with
/// `underlay_prefix`, serial allocators (a cursor per network), no MAC counter (MACs
/// follow addresses), the cluster's meta. Formats 1 to 4 are still read (see
/// [`legacy`]): 4 has no statuses (every endpoint starts `pending` until its host
/// reports), 1 to 3 have lowest-free allocators and a MAC counter, 1 has no cluster
/// meta, 1 and 2 have hosts without a prefix.
const SNAPSHOT_FORMAT: u8 = 5;

/// The desired state as watchers see it: plain objects and the revision they reflect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub revision: u64,
    pub networks: BTreeMap<String, Network>,
    pub endpoints: BTreeMap<String, Endpoint>,
    pub routes: BTreeMap<RouteKey, Route>,
    pub hosts: BTreeMap<String, Host>,
    /// Endpoints known by name only, with their aliases: an agent's catalog holds every
    /// endpoint of the networks its host wants in `endpoints`, and every other one here
    /// (DNS answers NXDOMAIN for them instead of forwarding; see `Change::PutNames`).
    /// Never set on the controller. Not serialized with the catalog: the controller's
    /// snapshot format does not have it, the agent persists it itself.
    /// Shared: the agent publishes a copy of its catalog on every change, and 100,000
    /// names need not be copied with it.
    #[serde(skip)]
    pub names: Arc<BTreeMap<String, Vec<String>>>,
}

/// One object-level change. `Put*` carries the whole new object, so applying a change
/// never depends on what the watcher had before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    PutNetwork(Network),
    DeleteNetwork(String),
    PutEndpoint(Endpoint),
    DeleteEndpoint(String),
    PutRoute(Route),
    DeleteRoute(RouteKey),
    PutHost(Host),
    DeleteHost(String),
    /// Endpoints the watcher knows by name only from now on (each replaces a whole
    /// object the watcher may have had). Only watch streams narrowed to one host send
    /// this; the state machine never makes it.
    PutNames(Vec<NameEntry>),
}

/// An endpoint known by name only: its name and aliases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    pub name: String,
    pub aliases: Vec<String>,
}

impl NameEntry {
    /// `endpoint`'s name and its aliases in every network, each once, sorted.
    pub fn of(endpoint: &Endpoint) -> NameEntry {
        let aliases: BTreeSet<&String> =
            endpoint.attachments.iter().flat_map(|a| &a.aliases).collect();
        NameEntry { name: endpoint.name.clone(), aliases: aliases.into_iter().cloned().collect() }
    }
}

/// The result of one command: the revision the catalog is at afterwards and what
/// changed, in an order that never leaves a dangling reference (routes go before the
/// endpoint or network they point at).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub revision: u64,
    pub changes: Vec<Change>,
}

impl Catalog {
    /// Replicates one change; watchers call this for every change of every [`Applied`].
    pub fn apply_change(&mut self, change: &Change) {
        match change {
            Change::PutNetwork(n) => {
                self.networks.insert(n.name.clone(), n.clone());
            }
            Change::DeleteNetwork(name) => {
                self.networks.remove(name);
            }
            Change::PutEndpoint(e) => {
                self.forget_name(&e.name);
                self.endpoints.insert(e.name.clone(), e.clone());
            }
            Change::DeleteEndpoint(name) => {
                self.forget_name(name);
                self.endpoints.remove(name);
            }
            Change::PutRoute(r) => {
                self.routes.insert(r.key(), r.clone());
            }
            Change::DeleteRoute(key) => {
                self.routes.remove(key);
            }
            Change::PutHost(h) => {
                self.hosts.insert(h.name.clone(), h.clone());
            }
            Change::DeleteHost(name) => {
                self.hosts.remove(name);
            }
            Change::PutNames(entries) => {
                let names = Arc::make_mut(&mut self.names);
                for e in entries {
                    self.endpoints.remove(&e.name);
                    names.insert(e.name.clone(), e.aliases.clone());
                }
            }
        }
    }

    /// Drops `name` from the names known alone, copying the shared map only when it
    /// holds the name.
    fn forget_name(&mut self, name: &str) {
        if self.names.contains_key(name) {
            Arc::make_mut(&mut self.names).remove(name);
        }
    }

    /// Replicates a whole command's effect, revision included, so a watcher's catalog
    /// compares equal to the controller's.
    pub fn apply_applied(&mut self, applied: &Applied) {
        for change in &applied.changes {
            self.apply_change(change);
        }
        self.revision = applied.revision;
    }

    /// The `Put*` changes that rebuild this catalog from an empty one (hosts, networks,
    /// endpoints, then routes), for starting a watch stream with a full picture.
    pub fn snapshot_changes(&self) -> Vec<Change> {
        let hosts = self.hosts.values().cloned().map(Change::PutHost);
        let networks = self.networks.values().cloned().map(Change::PutNetwork);
        let endpoints = self.endpoints.values().cloned().map(Change::PutEndpoint);
        let routes = self.routes.values().cloned().map(Change::PutRoute);
        hosts.chain(networks).chain(endpoints).chain(routes).collect()
    }

    /// Every endpoint attached to `network`, with its attachment there. Scans all
    /// endpoints: fine for listing, not for the apply path.
    pub fn endpoints_in<'a>(
        &'a self,
        network: &'a str,
    ) -> impl Iterator<Item = (&'a Endpoint, &'a Attachment)> + 'a {
        self.endpoints.values().filter_map(move |e| e.attachment(network).map(|a| (e, a)))
    }

    /// The routes of `network`, in destination order.
    pub fn routes_in<'a>(&'a self, network: &'a str) -> impl Iterator<Item = &'a Route> + 'a {
        self.routes
            .range((network.to_string(), LOWEST_NET)..)
            .take_while(move |((n, _), _)| n == network)
            .map(|(_, r)| r)
    }

    /// The next hop that route's endpoints use: the `via` endpoint's address in the
    /// route's network. `None` only on a catalog caught mid-replication.
    pub fn route_via_ip(&self, route: &Route) -> Option<Ipv4Addr> {
        self.endpoints.get(&route.via)?.attachment(&route.network).map(|a| a.ip)
    }

    /// Endpoint count per host name in one pass, for `host ls`. Hosts without endpoints
    /// are absent.
    pub fn endpoint_counts_by_host(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for e in self.endpoints.values() {
            *counts.entry(e.host.as_str()).or_insert(0) += 1;
        }
        counts
    }
}

/// The lowest `Ipv4Network` in `Ord`, to start range scans over routes of one network.
const LOWEST_NET: Ipv4Network = match Ipv4Network::new_checked(Ipv4Addr::UNSPECIFIED, 0) {
    Some(n) => n,
    None => panic!("0.0.0.0/0 is a valid network"),
};

/// A snapshot that [`State::from_bytes`] cannot use.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("state snapshot is empty")]
    Empty,
    #[error("state snapshot has format {0}, this build reads formats 1 to {SNAPSHOT_FORMAT}")]
    Format(u8),
    #[error("state snapshot does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("state snapshot has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("state snapshot is inconsistent: network {0} has no address allocator")]
    MissingIpam(String),
}

/// The controller's whole replicated state.
///
/// `catalog` is public for reading. Changing it directly (rather than through
/// [`apply`](Self::apply)) bypasses the allocators and indexes and is a bug.
#[derive(Debug, Clone)]
pub struct State {
    pub catalog: Catalog,
    /// One allocator per network, keyed by network name.
    ipams: BTreeMap<String, Ipam>,
    meta: ClusterMeta,
    /// Endpoint name -> its status as its host reported it (see [`crate::status`]).
    statuses: BTreeMap<String, EndpointStatus>,
    index: Index,
}

/// What the cluster knows about itself (not part of the catalog watchers replicate).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// 32 hex digits, set once by the first leader (`Command::InitCluster`).
    pub cluster_id: Option<String>,
    /// The current join token, if one was ever made.
    pub join_token: Option<JoinTokenRecord>,
}

/// A join token as the replicated state keeps it: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub nonce: [u8; 16],
    pub hash: [u8; 32],
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

/// Equality is over what is replicated; the index is a function of it.
impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.catalog == other.catalog
            && self.ipams == other.ipams
            && self.meta == other.meta
            && self.statuses == other.statuses
    }
}

impl Eq for State {}

#[derive(Serialize)]
struct StateRef<'a> {
    catalog: &'a Catalog,
    ipams: &'a BTreeMap<String, Ipam>,
    meta: &'a ClusterMeta,
    statuses: &'a BTreeMap<String, EndpointStatus>,
}

#[derive(Deserialize)]
struct StateOwned {
    catalog: Catalog,
    ipams: BTreeMap<String, Ipam>,
    meta: ClusterMeta,
    statuses: BTreeMap<String, EndpointStatus>,
}

impl From<StateOwned> for State {
    fn from(owned: StateOwned) -> State {
        let index = Index::build(&owned.catalog);
        State {
            catalog: owned.catalog,
            ipams: owned.ipams,
            meta: owned.meta,
            statuses: owned.statuses,
            index,
        }
    }
}

impl Serialize for State {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StateRef {
            catalog: &self.catalog,
            ipams: &self.ipams,
            meta: &self.meta,
            statuses: &self.statuses,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        StateOwned::deserialize(deserializer).map(State::from)
    }
}

/// Lookups derived from the catalog that the apply path needs in O(log n).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Index {
    /// Network name -> names of the endpoints attached to it.
    members: BTreeMap<String, BTreeSet<String>>,
    /// Network name -> host -> how many of the host's endpoints are attached to it.
    carriers: BTreeMap<String, BTreeMap<String, usize>>,
    /// Host name -> names of the endpoints on it.
    on_host: BTreeMap<String, BTreeSet<String>>,
    /// Endpoint name -> keys of the routes that go via it.
    routes_via: BTreeMap<String, BTreeSet<RouteKey>>,
    /// First address of each network's subnet -> (last address, network name). Subnets
    /// never overlap, so the neighbours of a new subnet are the only candidates.
    subnets: BTreeMap<u32, (u32, String)>,
    /// VNI -> network name.
    vnis: BTreeMap<u32, String>,
    /// Underlay IP -> host name.
    underlay: BTreeMap<Ipv4Addr, String>,
}

impl Index {
    fn build(catalog: &Catalog) -> Index {
        let mut index = Index::default();
        for n in catalog.networks.values() {
            index.add_network(n);
        }
        for e in catalog.endpoints.values() {
            index.on_host.entry(e.host.clone()).or_default().insert(e.name.clone());
            for a in &e.attachments {
                index.attach(&a.network, &e.name, &e.host);
            }
        }
        for (key, r) in &catalog.routes {
            index.routes_via.entry(r.via.clone()).or_default().insert(key.clone());
        }
        for h in catalog.hosts.values() {
            index.underlay.insert(h.underlay_ip, h.name.clone());
        }
        index
    }

    fn add_network(&mut self, n: &Network) {
        let (start, end) = bounds(n.subnet);
        self.subnets.insert(start, (end, n.name.clone()));
        self.vnis.insert(n.vni, n.name.clone());
    }

    fn attach(&mut self, network: &str, endpoint: &str, host: &str) {
        self.members.entry(network.to_string()).or_default().insert(endpoint.to_string());
        *self
            .carriers
            .entry(network.to_string())
            .or_default()
            .entry(host.to_string())
            .or_default() += 1;
    }

    fn detach(&mut self, network: &str, endpoint: &str, host: &str) {
        if let Some(set) = self.members.get_mut(network) {
            set.remove(endpoint);
            if set.is_empty() {
                self.members.remove(network);
            }
        }
        if let Some(hosts) = self.carriers.get_mut(network) {
            if let Some(count) = hosts.get_mut(host) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    hosts.remove(host);
                }
            }
            if hosts.is_empty() {
                self.carriers.remove(network);
            }
        }
    }

    fn add_route(&mut self, key: &RouteKey, via: &str) {
        self.routes_via.entry(via.to_string()).or_default().insert(key.clone());
    }

    fn remove_route(&mut self, key: &RouteKey, via: &str) {
        if let Some(set) = self.routes_via.get_mut(via) {
            set.remove(key);
            if set.is_empty() {
                self.routes_via.remove(via);
            }
        }
    }

    /// The network whose subnet overlaps `[start, end]`, lowest first.
    fn overlapping(&self, start: u32, end: u32) -> Option<&str> {
        if let Some((_, (e, name))) = self.subnets.range(..=start).next_back() {
            if *e >= start {
                return Some(name);
            }
        }
        match self.subnets.range(start..).next() {
            Some((s, (_, name))) if *s <= end => Some(name),
            _ => None,
        }
    }
}

/// First and last address of a subnet as integers (host bits ignored).
fn bounds(subnet: Ipv4Network) -> (u32, u32) {
    (u32::from(subnet.network()), u32::from(subnet.broadcast()))
}

/// "a, b, c" or "a, b, c, d, e and 7 more": an error must stay one readable line even
/// when thousands of endpoints are in the way.
fn summarize(names: &BTreeSet<String>) -> String {
    let listed: Vec<&str> = names.iter().take(LISTED_NAMES).map(String::as_str).collect();
    let listed = listed.join(", ");
    match names.len().saturating_sub(LISTED_NAMES) {
        0 => listed,
        more => format!("{listed} and {more} more"),
    }
}

/// A CIDR with host bits set is ambiguous (did the user mean the network or the
/// address?), so it is refused rather than silently masked.
fn check_cidr(net: Ipv4Network) -> Result<(), ModelError> {
    if net.ip() == net.network() {
        Ok(())
    } else {
        Err(ModelError::InvalidCidr(net.to_string()))
    }
}

fn check_aliases(aliases: &[String]) -> Result<(), ModelError> {
    let mut seen = BTreeSet::new();
    for alias in aliases {
        validate_name(alias)?;
        if !seen.insert(alias.as_str()) {
            return Err(ModelError::DuplicateAlias(alias.clone()));
        }
    }
    Ok(())
}

/// `ethN` -> N; anything else sorts last and blocks no index.
fn interface_index(interface: &str) -> Option<u32> {
    interface.strip_prefix("eth")?.parse().ok()
}

impl State {
    pub fn new() -> State {
        State {
            catalog: Catalog::default(),
            ipams: BTreeMap::new(),
            meta: ClusterMeta::default(),
            statuses: BTreeMap::new(),
            index: Index::default(),
        }
    }

    /// Applies one committed command. On `Err` nothing changed; on `Ok` the revision went
    /// up by one if and only if `changes` is non-empty.
    pub fn apply(&mut self, command: &Command) -> Result<Applied, ModelError> {
        let changes = match command {
            Command::CreateNetwork(spec) => self.create_network(spec)?,
            Command::RemoveNetwork { name } => self.remove_network(name)?,
            Command::CreateEndpoint { name, host, network, ip, aliases } => {
                self.create_endpoint(name, host, network, *ip, aliases)?
            }
            Command::RemoveEndpoint { name } => self.remove_endpoint(name)?,
            Command::Connect { network, endpoint, ip, aliases } => {
                self.connect(network, endpoint, *ip, aliases)?
            }
            Command::Disconnect { network, endpoint } => self.disconnect(network, endpoint)?,
            Command::AddRoute { network, destination, via } => {
                self.add_route(network, *destination, via)?
            }
            Command::RemoveRoute { network, destination } => {
                self.remove_route(network, *destination)?
            }
            Command::RegisterHost { name, underlay_ip, underlay_prefix, underlay_mtu, now_ms } => {
                self.register_host(name, *underlay_ip, *underlay_prefix, *underlay_mtu, *now_ms)?
            }
            Command::RegisterHostV1 { name, underlay_ip, underlay_mtu, now_ms } => {
                self.register_host(name, *underlay_ip, 0, *underlay_mtu, *now_ms)?
            }
            Command::RemoveHost { name } => self.remove_host(name)?,
            Command::SetHostStatus { name, status, now_ms } => {
                self.set_host_status(name, *status, *now_ms)?
            }
            Command::SetHostStatuses { statuses, now_ms } => {
                let mut changes = Vec::new();
                for (name, status) in statuses {
                    // A host removed since the monitor looked is no longer its business.
                    if self.catalog.hosts.contains_key(name) {
                        changes.extend(self.set_host_status(name, *status, *now_ms)?);
                    }
                }
                changes
            }
            Command::InitCluster { cluster_id } => self.init_cluster(cluster_id)?,
            Command::SetJoinToken { nonce, hash } => {
                self.meta.join_token = Some(JoinTokenRecord { nonce: *nonce, hash: *hash });
                Vec::new()
            }
            Command::CreateEndpointAs { .. }
            | Command::ConnectAs { .. }
            | Command::DisconnectOn { .. }
            | Command::RemoveEndpointOn { .. } => self.apply_container_command(command)?,
            Command::SetEndpointStatuses { host, revision, statuses } => {
                self.set_statuses(host, *revision, statuses);
                Vec::new()
            }
        };
        if !changes.is_empty() {
            self.catalog.revision += 1;
            self.reset_statuses(&changes);
        }
        Ok(Applied { revision: self.catalog.revision, changes })
    }

    /// The snapshot raft stores: a format byte, then postcard. Deterministic: equal
    /// states give equal bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![SNAPSHOT_FORMAT];
        // Serializing into a Vec fails only for sequences of unknown length, and every
        // collection here knows its length.
        let body = postcard::to_stdvec(self).expect("state serializes to postcard");
        out.extend_from_slice(&body);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<State, SnapshotError> {
        let (&format, body) = bytes.split_first().ok_or(SnapshotError::Empty)?;
        let (state, rest): (State, _) = match format {
            SNAPSHOT_FORMAT => postcard::take_from_bytes(body)?,
            1 => {
                let (v1, rest): (legacy::StateV1, _) = postcard::take_from_bytes(body)?;
                (State::from(StateOwned::from(v1)), rest)
            }
            2 => {
                let (v2, rest): (legacy::StateV2, _) = postcard::take_from_bytes(body)?;
                (State::from(StateOwned::from(v2)), rest)
            }
            3 => {
                let (v3, rest): (legacy::StateV3, _) = postcard::take_from_bytes(body)?;
                (State::from(StateOwned::from(v3)), rest)
            }
            4 => {
                let (v4, rest): (legacy::StateV4, _) = postcard::take_from_bytes(body)?;
                (State::from(StateOwned::from(v4)), rest)
            }
            _ => return Err(SnapshotError::Format(format)),
        };
        if !rest.is_empty() {
            return Err(SnapshotError::TrailingBytes(rest.len()));
        }
        if let Some(name) = state.catalog.networks.keys().find(|n| !state.ipams.contains_key(*n)) {
            return Err(SnapshotError::MissingIpam(name.clone()));
        }
        Ok(state)
    }

    /// FNV-1a 64 over [`to_bytes`](Self::to_bytes): a cheap fingerprint replicas can
    /// compare to detect divergence.
    pub fn digest(&self) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        self.to_bytes().iter().fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
    }

    /// The cluster's id and join token.
    pub fn meta(&self) -> &ClusterMeta {
        &self.meta
    }

    /// A network's allocator, for showing usage.
    pub fn ipam(&self, network: &str) -> Option<&Ipam> {
        self.ipams.get(network)
    }

    /// Endpoints on `host`, from the index (O(log n)).
    pub fn endpoints_on_host(&self, host: &str) -> usize {
        self.index.on_host.get(host).map_or(0, BTreeSet::len)
    }

    /// Endpoints attached to `network`, from the index (O(log n)).
    pub fn attached_count(&self, network: &str) -> usize {
        self.index.members.get(network).map_or(0, BTreeSet::len)
    }

    /// The hosts with an endpoint attached to `network`, from the index.
    pub fn carriers_of<'a>(&'a self, network: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.index.carriers.get(network).into_iter().flat_map(|h| h.keys().map(String::as_str))
    }

    fn network(&self, name: &str) -> Result<&Network, ModelError> {
        self.catalog.networks.get(name).ok_or_else(|| ModelError::NetworkNotFound(name.to_string()))
    }

    fn endpoint(&self, name: &str) -> Result<&Endpoint, ModelError> {
        self.catalog
            .endpoints
            .get(name)
            .ok_or_else(|| ModelError::EndpointNotFound(name.to_string()))
    }

    fn host(&self, name: &str) -> Result<&Host, ModelError> {
        self.catalog.hosts.get(name).ok_or_else(|| ModelError::HostNotFound(name.to_string()))
    }

    /// The address an attachment to `network` would get, without taking it.
    fn pick_ip(
        &self,
        network: &Network,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, ModelError> {
        let exhausted = || ModelError::SubnetExhausted {
            network: network.name.clone(),
            subnet: network.subnet,
        };
        let ipam = self.ipams.get(&network.name).ok_or_else(exhausted)?;
        match requested {
            Some(ip) if !ipam.is_usable(ip) => Err(ModelError::IpOutsideSubnet {
                ip,
                network: network.name.clone(),
                subnet: network.subnet,
            }),
            Some(ip) if !ipam.is_free(ip) => {
                Err(ModelError::IpInUse { ip, network: network.name.clone() })
            }
            Some(ip) => Ok(ip),
            None => ipam.next_free().ok_or_else(exhausted),
        }
    }

    /// Takes an address `pick_ip` chose: an automatic pick (`requested` is `None`) through
    /// the serial allocator, so its cursor moves on. It is the first mutation of a
    /// command, so even the impossible failure leaves the state untouched.
    fn take_ip(
        &mut self,
        network: &str,
        ip: Ipv4Addr,
        requested: Option<Ipv4Addr>,
    ) -> Result<(), ModelError> {
        let in_use = || ModelError::IpInUse { ip, network: network.to_string() };
        let ipam = self.ipams.get_mut(network).ok_or_else(in_use)?;
        if requested.is_some() {
            return ipam.allocate_specific(ip).map_err(|_| in_use());
        }
        // `pick_ip` asked `next_free`, which is exactly what `allocate` takes.
        if ipam.next_free() != Some(ip) {
            return Err(in_use());
        }
        ipam.allocate().map(drop).ok_or_else(in_use)
    }

    fn release_ip(&mut self, network: &str, ip: Ipv4Addr) {
        if let Some(ipam) = self.ipams.get_mut(network) {
            ipam.release(ip);
        }
    }

    /// Deletes routes (catalog and index) and returns their `DeleteRoute` changes.
    fn delete_routes(&mut self, keys: Vec<RouteKey>) -> Vec<Change> {
        let mut changes = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(route) = self.catalog.routes.remove(&key) {
                self.index.remove_route(&key, &route.via);
                changes.push(Change::DeleteRoute(key));
            }
        }
        changes
    }

    /// Routes that go via `endpoint`, optionally only in `network`.
    fn routes_via(&self, endpoint: &str, network: Option<&str>) -> Vec<RouteKey> {
        self.index
            .routes_via
            .get(endpoint)
            .into_iter()
            .flatten()
            .filter(|(n, _)| network.is_none_or(|want| n == want))
            .cloned()
            .collect()
    }

    fn create_network(&mut self, spec: &NetworkSpec) -> Result<Vec<Change>, ModelError> {
        validate_name(&spec.name)?;
        if self.catalog.networks.contains_key(&spec.name) {
            return Err(ModelError::NetworkExists(spec.name.clone()));
        }
        let subnet = spec.subnet;
        // Host bits, size and the reserved ranges (loopback, link-local, multicast,
        // 0.0.0.0/0, ...); then no host's underlay: a bridge address there would steal
        // the host's route to its peers.
        validate::check_subnet(subnet)?;
        if let Some(host) =
            self.catalog.hosts.values().find(|h| validate::overlaps(subnet, h.underlay_network()))
        {
            return Err(ModelError::SubnetOverlapsUnderlay {
                subnet,
                host: host.name.clone(),
                underlay: host.underlay_network(),
            });
        }
        let (start, end) = bounds(subnet);
        if let Some(other) = self.index.overlapping(start, end) {
            let other_subnet = self.network(other)?.subnet;
            return Err(ModelError::SubnetOverlap {
                subnet,
                other: other.to_string(),
                other_subnet,
            });
        }
        let gateway = match spec.gateway {
            None => Ipv4Addr::from(start + 1),
            Some(gw)
                if subnet.contains(gw) && gw != subnet.network() && gw != subnet.broadcast() =>
            {
                gw
            }
            Some(gateway) => return Err(ModelError::GatewayOutsideSubnet { gateway, subnet }),
        };
        if spec.encrypted && spec.encap != Encap::Udp {
            return Err(ModelError::EncryptedNeedsUdp);
        }
        let vni = match spec.vni {
            Some(vni) if !(1..=MAX_VNI).contains(&vni) => return Err(ModelError::InvalidVni(vni)),
            Some(vni) => {
                if let Some(network) = self.index.vnis.get(&vni) {
                    return Err(ModelError::VniInUse { vni, network: network.clone() });
                }
                vni
            }
            None => self.lowest_free_vni()?,
        };
        let mtu = match spec.mtu {
            Some(mtu) if !(MIN_MTU..=MAX_MTU).contains(&mtu) => {
                return Err(ModelError::InvalidMtu(mtu))
            }
            Some(mtu) => mtu,
            None => self.default_mtu(spec.encap.overhead(spec.encrypted)),
        };

        let network = Network {
            name: spec.name.clone(),
            subnet,
            gateway,
            vni,
            mtu,
            encap: spec.encap,
            encrypted: spec.encrypted,
            internal: spec.internal,
        };
        self.ipams.insert(network.name.clone(), Ipam::new(subnet, gateway));
        self.index.add_network(&network);
        self.catalog.networks.insert(network.name.clone(), network.clone());
        Ok(vec![Change::PutNetwork(network)])
    }

    fn lowest_free_vni(&self) -> Result<u32, ModelError> {
        let mut candidate = FIRST_AUTO_VNI;
        for &used in self.index.vnis.range(FIRST_AUTO_VNI..).map(|(v, _)| v) {
            if used != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate > MAX_VNI {
            return Err(ModelError::VniExhausted);
        }
        Ok(candidate)
    }

    /// The largest MTU that crosses every host's underlay without fragmenting. Kept
    /// within the accepted MTU range: a host reporting an absurd underlay MTU must not
    /// make network creation impossible.
    fn default_mtu(&self, overhead: u32) -> u32 {
        let underlay = self
            .catalog
            .hosts
            .values()
            .map(|h| h.underlay_mtu)
            .min()
            .unwrap_or(DEFAULT_UNDERLAY_MTU);
        underlay.saturating_sub(overhead).clamp(MIN_MTU, MAX_MTU)
    }

    fn remove_network(&mut self, name: &str) -> Result<Vec<Change>, ModelError> {
        self.network(name)?;
        if let Some(members) = self.index.members.get(name).filter(|m| !m.is_empty()) {
            return Err(ModelError::NetworkInUse {
                network: name.to_string(),
                endpoints: summarize(members),
            });
        }
        let keys: Vec<RouteKey> = self.catalog.routes_in(name).map(Route::key).collect();
        let mut changes = self.delete_routes(keys);
        if let Some(network) = self.catalog.networks.remove(name) {
            self.index.subnets.remove(&bounds(network.subnet).0);
            self.index.vnis.remove(&network.vni);
        }
        self.ipams.remove(name);
        self.index.members.remove(name);
        changes.push(Change::DeleteNetwork(name.to_string()));
        Ok(changes)
    }

    fn create_endpoint(
        &mut self,
        name: &str,
        host: &str,
        network: &str,
        ip: Option<Ipv4Addr>,
        aliases: &[String],
    ) -> Result<Vec<Change>, ModelError> {
        validate_name(name)?;
        if self.catalog.endpoints.contains_key(name) {
            return Err(ModelError::EndpointExists(name.to_string()));
        }
        self.host(host)?;
        let net = self.network(network)?;
        check_aliases(aliases)?;
        let requested = ip;
        let ip = self.pick_ip(net, requested)?;

        self.take_ip(network, ip, requested)?;
        let attachment = Attachment {
            network: network.to_string(),
            interface: "eth0".to_string(),
            ip,
            mac: Mac::from_ip(ip),
            aliases: aliases.to_vec(),
        };
        let endpoint = Endpoint {
            name: name.to_string(),
            host: host.to_string(),
            attachments: vec![attachment],
        };
        self.index.attach(network, name, host);
        self.index.on_host.entry(host.to_string()).or_default().insert(name.to_string());
        self.catalog.endpoints.insert(name.to_string(), endpoint.clone());
        Ok(vec![Change::PutEndpoint(endpoint)])
    }

    fn remove_endpoint(&mut self, name: &str) -> Result<Vec<Change>, ModelError> {
        self.endpoint(name)?;
        let mut changes = self.delete_routes(self.routes_via(name, None));
        if let Some(endpoint) = self.catalog.endpoints.remove(name) {
            for a in &endpoint.attachments {
                self.release_ip(&a.network, a.ip);
                self.index.detach(&a.network, name, &endpoint.host);
            }
            if let Some(set) = self.index.on_host.get_mut(&endpoint.host) {
                set.remove(name);
                if set.is_empty() {
                    self.index.on_host.remove(&endpoint.host);
                }
            }
        }
        changes.push(Change::DeleteEndpoint(name.to_string()));
        Ok(changes)
    }

    fn connect(
        &mut self,
        network: &str,
        endpoint: &str,
        ip: Option<Ipv4Addr>,
        aliases: &[String],
    ) -> Result<Vec<Change>, ModelError> {
        let net = self.network(network)?;
        let ep = self.endpoint(endpoint)?;
        if ep.attachment(network).is_some() {
            return Err(ModelError::AlreadyAttached {
                endpoint: endpoint.to_string(),
                network: network.to_string(),
            });
        }
        check_aliases(aliases)?;
        let requested = ip;
        let ip = self.pick_ip(net, requested)?;
        // Attachments stay sorted by interface index, so the lowest free index is the
        // first position where the index skips.
        let used: BTreeSet<u32> =
            ep.attachments.iter().filter_map(|a| interface_index(&a.interface)).collect();
        let n = (0u32..).find(|n| !used.contains(n)).unwrap_or(0);
        let position = ep
            .attachments
            .iter()
            .position(|a| interface_index(&a.interface).is_none_or(|i| i > n))
            .unwrap_or(ep.attachments.len());

        self.take_ip(network, ip, requested)?;
        let attachment = Attachment {
            network: network.to_string(),
            interface: format!("eth{n}"),
            ip,
            mac: Mac::from_ip(ip),
            aliases: aliases.to_vec(),
        };
        let Some(ep) = self.catalog.endpoints.get_mut(endpoint) else {
            return Err(ModelError::EndpointNotFound(endpoint.to_string()));
        };
        self.index.attach(network, endpoint, &ep.host);
        ep.attachments.insert(position, attachment);
        Ok(vec![Change::PutEndpoint(ep.clone())])
    }

    fn disconnect(&mut self, network: &str, endpoint: &str) -> Result<Vec<Change>, ModelError> {
        self.network(network)?;
        let ep = self.endpoint(endpoint)?;
        let Some(position) = ep.attachments.iter().position(|a| a.network == network) else {
            return Err(ModelError::NotAttached {
                endpoint: endpoint.to_string(),
                network: network.to_string(),
            });
        };
        // Disconnecting the last network is allowed, as Docker's: the endpoint stays
        // (its namespace with loopback only) until it is connected again or removed.
        let mut changes = self.delete_routes(self.routes_via(endpoint, Some(network)));
        let Some(ep) = self.catalog.endpoints.get_mut(endpoint) else {
            return Err(ModelError::EndpointNotFound(endpoint.to_string()));
        };
        let attachment = ep.attachments.remove(position);
        let put = Change::PutEndpoint(ep.clone());
        let host = ep.host.clone();
        self.release_ip(network, attachment.ip);
        self.index.detach(network, endpoint, &host);
        changes.push(put);
        Ok(changes)
    }

    fn add_route(
        &mut self,
        network: &str,
        destination: Ipv4Network,
        via: &str,
    ) -> Result<Vec<Change>, ModelError> {
        let net = self.network(network)?;
        check_cidr(destination)?;
        if destination.is_subnet_of(net.subnet) {
            return Err(ModelError::RouteToOwnSubnet { destination, network: network.to_string() });
        }
        let key: RouteKey = (network.to_string(), destination);
        if self.catalog.routes.contains_key(&key) {
            return Err(ModelError::RouteExists { destination, network: network.to_string() });
        }
        if self.endpoint(via)?.attachment(network).is_none() {
            return Err(ModelError::ViaNotAttached {
                endpoint: via.to_string(),
                network: network.to_string(),
            });
        }

        let route = Route { network: network.to_string(), destination, via: via.to_string() };
        self.index.add_route(&key, via);
        self.catalog.routes.insert(key, route.clone());
        Ok(vec![Change::PutRoute(route)])
    }

    fn remove_route(
        &mut self,
        network: &str,
        destination: Ipv4Network,
    ) -> Result<Vec<Change>, ModelError> {
        self.network(network)?;
        let key: RouteKey = (network.to_string(), destination);
        if !self.catalog.routes.contains_key(&key) {
            return Err(ModelError::RouteNotFound { destination, network: network.to_string() });
        }
        Ok(self.delete_routes(vec![key]))
    }

    fn register_host(
        &mut self,
        name: &str,
        underlay_ip: Ipv4Addr,
        underlay_prefix: u8,
        underlay_mtu: u32,
        now_ms: u64,
    ) -> Result<Vec<Change>, ModelError> {
        validate_name(name)?;
        // Peers send encapsulated traffic to this address: one that no host can own
        // would black-hole every network the host carries.
        validate::check_underlay_ip(underlay_ip)?;
        if underlay_prefix > 32 {
            return Err(ModelError::InvalidCidr(format!("{underlay_ip}/{underlay_prefix}")));
        }
        if let Some(other) = self.index.underlay.get(&underlay_ip).filter(|h| *h != name) {
            return Err(ModelError::UnderlayIpInUse { ip: underlay_ip, host: other.clone() });
        }
        let host = Host {
            name: name.to_string(),
            underlay_ip,
            underlay_mtu: if underlay_mtu == 0 { DEFAULT_UNDERLAY_MTU } else { underlay_mtu },
            status: HostStatus::Ready,
            status_changed_ms: now_ms,
            underlay_prefix,
        };
        if let Some(old) = self.catalog.hosts.get(name) {
            if *old == host {
                return Ok(Vec::new());
            }
            let old_ip = old.underlay_ip;
            self.index.underlay.remove(&old_ip);
        }
        self.index.underlay.insert(underlay_ip, name.to_string());
        self.catalog.hosts.insert(name.to_string(), host.clone());
        Ok(vec![Change::PutHost(host)])
    }

    fn remove_host(&mut self, name: &str) -> Result<Vec<Change>, ModelError> {
        self.host(name)?;
        if let Some(endpoints) = self.index.on_host.get(name).filter(|e| !e.is_empty()) {
            return Err(ModelError::HostInUse {
                host: name.to_string(),
                endpoints: summarize(endpoints),
            });
        }
        if let Some(host) = self.catalog.hosts.remove(name) {
            self.index.underlay.remove(&host.underlay_ip);
        }
        Ok(vec![Change::DeleteHost(name.to_string())])
    }

    fn init_cluster(&mut self, cluster_id: &str) -> Result<Vec<Change>, ModelError> {
        if cluster_id.len() != 32 || !cluster_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ModelError::InvalidClusterId(cluster_id.to_string()));
        }
        // The first id wins: two leaders in a row may both have proposed one.
        if self.meta.cluster_id.is_none() {
            self.meta.cluster_id = Some(cluster_id.to_ascii_lowercase());
        }
        Ok(Vec::new())
    }

    fn set_host_status(
        &mut self,
        name: &str,
        status: HostStatus,
        now_ms: u64,
    ) -> Result<Vec<Change>, ModelError> {
        if self.host(name)?.status == status {
            return Ok(Vec::new());
        }
        let Some(host) = self.catalog.hosts.get_mut(name) else {
            return Err(ModelError::HostNotFound(name.to_string()));
        };
        host.status = status;
        host.status_changed_ms = now_ms;
        Ok(vec![Change::PutHost(host.clone())])
    }
}

/// Snapshot formats 1 (no [`ClusterMeta`]) and 2 (with it): both with hosts that have
/// no `underlay_prefix`.
mod legacy {
    use super::*;

    #[derive(Deserialize)]
    struct HostV2 {
        name: String,
        underlay_ip: Ipv4Addr,
        underlay_mtu: u32,
        status: HostStatus,
        status_changed_ms: u64,
    }

    #[derive(Deserialize)]
    struct CatalogV2 {
        revision: u64,
        networks: BTreeMap<String, Network>,
        endpoints: BTreeMap<String, Endpoint>,
        routes: BTreeMap<RouteKey, Route>,
        hosts: BTreeMap<String, HostV2>,
    }

    impl From<CatalogV2> for Catalog {
        /// The same catalog; the prefixes are unknown (0).
        fn from(c: CatalogV2) -> Catalog {
            let hosts = c
                .hosts
                .into_iter()
                .map(|(k, h)| {
                    let host = Host {
                        name: h.name,
                        underlay_ip: h.underlay_ip,
                        underlay_mtu: h.underlay_mtu,
                        status: h.status,
                        status_changed_ms: h.status_changed_ms,
                        underlay_prefix: 0,
                    };
                    (k, host)
                })
                .collect();
            Catalog {
                revision: c.revision,
                networks: c.networks,
                endpoints: c.endpoints,
                routes: c.routes,
                hosts,
                names: Default::default(),
            }
        }
    }

    /// Formats 1 to 3: lowest-free allocators and the MAC counter (dropped: new
    /// attachments get [`Mac::from_ip`], old ones keep the MACs they have).
    #[derive(Deserialize)]
    pub(super) struct StateV1 {
        catalog: CatalogV2,
        ipams: BTreeMap<String, IpamV1>,
        _next_mac: u64,
    }

    #[derive(Deserialize)]
    pub(super) struct StateV2 {
        catalog: CatalogV2,
        ipams: BTreeMap<String, IpamV1>,
        _next_mac: u64,
        meta: ClusterMeta,
    }

    /// Format 4: today's state without endpoint statuses.
    #[derive(Deserialize)]
    pub(super) struct StateV4 {
        catalog: Catalog,
        ipams: BTreeMap<String, Ipam>,
        meta: ClusterMeta,
    }

    impl From<StateV4> for StateOwned {
        /// Every endpoint is `pending` until its host reports again.
        fn from(v4: StateV4) -> StateOwned {
            StateOwned {
                catalog: v4.catalog,
                ipams: v4.ipams,
                meta: v4.meta,
                statuses: BTreeMap::new(),
            }
        }
    }

    #[derive(Deserialize)]
    pub(super) struct StateV3 {
        catalog: Catalog,
        ipams: BTreeMap<String, IpamV1>,
        _next_mac: u64,
        meta: ClusterMeta,
    }

    /// Each allocator's cursor goes just past the highest address attached in its
    /// network, so allocation continues upwards from what is in use (deterministic: a
    /// function of the snapshot alone).
    fn upgrade(catalog: &Catalog, ipams: BTreeMap<String, IpamV1>) -> BTreeMap<String, Ipam> {
        let mut last_used: BTreeMap<&str, Ipv4Addr> = BTreeMap::new();
        for a in catalog.endpoints.values().flat_map(|e| &e.attachments) {
            let top = last_used.entry(a.network.as_str()).or_insert(a.ip);
            *top = (*top).max(a.ip);
        }
        ipams
            .into_iter()
            .map(|(name, v1)| {
                let last = last_used.get(name.as_str()).copied();
                (name, v1.upgrade(last))
            })
            .collect()
    }

    impl From<StateV1> for StateOwned {
        fn from(v1: StateV1) -> StateOwned {
            let catalog: Catalog = v1.catalog.into();
            let ipams = upgrade(&catalog, v1.ipams);
            StateOwned { catalog, ipams, meta: ClusterMeta::default(), statuses: BTreeMap::new() }
        }
    }

    impl From<StateV2> for StateOwned {
        fn from(v2: StateV2) -> StateOwned {
            let catalog: Catalog = v2.catalog.into();
            let ipams = upgrade(&catalog, v2.ipams);
            StateOwned { catalog, ipams, meta: v2.meta, statuses: BTreeMap::new() }
        }
    }

    impl From<StateV3> for StateOwned {
        fn from(v3: StateV3) -> StateOwned {
            let ipams = upgrade(&v3.catalog, v3.ipams);
            StateOwned { catalog: v3.catalog, ipams, meta: v3.meta, statuses: BTreeMap::new() }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::fixtures::spec;
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn create_network(name: &str, subnet: &str) -> Command {
        Command::CreateNetwork(spec(name, subnet))
    }

    /// Registers a host on a /24 underlay.
    fn register(name: &str, underlay: &str, mtu: u32) -> Command {
        Command::RegisterHost {
            name: name.into(),
            underlay_ip: ip(underlay),
            underlay_prefix: 24,
            underlay_mtu: mtu,
            now_ms: 1000,
        }
    }

    fn create_endpoint(name: &str, host: &str, network: &str) -> Command {
        Command::CreateEndpoint {
            name: name.into(),
            host: host.into(),
            network: network.into(),
            ip: None,
            aliases: vec![],
        }
    }

    fn connect(network: &str, endpoint: &str) -> Command {
        Command::Connect {
            network: network.into(),
            endpoint: endpoint.into(),
            ip: None,
            aliases: vec![],
        }
    }

    fn disconnect(network: &str, endpoint: &str) -> Command {
        Command::Disconnect { network: network.into(), endpoint: endpoint.into() }
    }

    fn add_route(network: &str, destination: &str, via: &str) -> Command {
        Command::AddRoute {
            network: network.into(),
            destination: net(destination),
            via: via.into(),
        }
    }

    fn attachment(network: &str, interface: &str, ip_: &str) -> Attachment {
        Attachment {
            network: network.into(),
            interface: interface.into(),
            ip: ip(ip_),
            mac: Mac::from_ip(ip(ip_)),
            aliases: vec![],
        }
    }

    fn frontend() -> Network {
        Network {
            name: "frontend".into(),
            subnet: net("10.0.1.0/24"),
            gateway: ip("10.0.1.1"),
            vni: FIRST_AUTO_VNI,
            mtu: 1450,
            encap: Encap::Vxlan,
            encrypted: false,
            internal: false,
        }
    }

    /// Checks the invariants that tie the derived and allocator state to the catalog.
    fn check_consistent(state: &State) {
        assert_eq!(state.index, Index::build(&state.catalog), "index drifted from catalog");
        assert_eq!(
            state.ipams.keys().collect::<Vec<_>>(),
            state.catalog.networks.keys().collect::<Vec<_>>()
        );
        for (name, ipam) in &state.ipams {
            assert_eq!(
                ipam.allocated_count() as usize,
                state.catalog.endpoints_in(name).count(),
                "{name}"
            );
            for (e, a) in state.catalog.endpoints_in(name) {
                assert!(!ipam.is_free(a.ip), "{} {} {}", e.name, name, a.ip);
            }
        }
    }

    fn ok(state: &mut State, command: Command) -> Applied {
        let applied = state.apply(&command).unwrap_or_else(|e| panic!("{command:?}: {e}"));
        check_consistent(state);
        applied
    }

    /// Applies a command that must be refused, and checks that it changed nothing.
    fn refused(state: &mut State, command: Command) -> ModelError {
        let before = state.clone();
        let err = state.apply(&command).expect_err("command should be refused");
        assert_eq!(*state, before);
        assert_eq!(state.index, before.index);
        assert_eq!(state.to_bytes(), before.to_bytes());
        err
    }

    /// A host `h1` (underlay MTU 1500) and network `frontend` (10.0.1.0/24); revision 2.
    fn setup() -> State {
        let mut state = State::new();
        ok(&mut state, register("h1", "192.168.0.1", 1500));
        ok(&mut state, create_network("frontend", "10.0.1.0/24"));
        state
    }

    #[test]
    fn create_network_chooses_gateway_vni_and_mtu() {
        let mut state = State::new();
        assert_eq!(
            ok(&mut state, create_network("frontend", "10.0.1.0/24")),
            Applied { revision: 1, changes: vec![Change::PutNetwork(frontend())] }
        );
        assert_eq!(state.ipam("frontend").unwrap().lowest_free(), Some(ip("10.0.1.2")));
    }

    #[test]
    fn create_network_takes_explicit_values() {
        let mut state = State::new();
        let mut s = spec("backend", "10.0.2.0/24");
        s.gateway = Some(ip("10.0.2.254"));
        s.vni = Some(42);
        s.mtu = Some(9000);
        s.encap = Encap::Udp;
        s.encrypted = true;
        s.internal = true;
        let want = Network {
            name: "backend".into(),
            subnet: net("10.0.2.0/24"),
            gateway: ip("10.0.2.254"),
            vni: 42,
            mtu: 9000,
            encap: Encap::Udp,
            encrypted: true,
            internal: true,
        };
        assert_eq!(
            ok(&mut state, Command::CreateNetwork(s)),
            Applied { revision: 1, changes: vec![Change::PutNetwork(want)] }
        );
        let ipam = state.ipam("backend").unwrap();
        assert!(!ipam.is_free(ip("10.0.2.254")));
        assert!(ipam.is_free(ip("10.0.2.1")));
    }

    #[test]
    fn default_mtu_is_lowest_underlay_minus_overhead() {
        let mtu_of = |hosts: &[u32], encap: Encap, encrypted: bool| {
            let mut state = State::new();
            for (i, mtu) in hosts.iter().enumerate() {
                ok(&mut state, register(&format!("h{i}"), &format!("192.168.0.{}", i + 1), *mtu));
            }
            let mut s = spec("n", "10.0.0.0/24");
            s.encap = encap;
            s.encrypted = encrypted;
            match ok(&mut state, Command::CreateNetwork(s)).changes.as_slice() {
                [Change::PutNetwork(n)] => n.mtu,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(mtu_of(&[], Encap::Vxlan, false), 1450);
        assert_eq!(mtu_of(&[9000, 1500, 9000], Encap::Vxlan, false), 1450);
        assert_eq!(mtu_of(&[9000], Encap::Vxlan, false), 8950);
        assert_eq!(mtu_of(&[9000], Encap::Udp, false), 8950);
        assert_eq!(mtu_of(&[1500], Encap::Udp, true), 1400);
        // 0 means "not detected": the default underlay MTU.
        assert_eq!(mtu_of(&[0, 9000], Encap::Vxlan, false), 1450);
        // Absurd underlays are clamped into the accepted range.
        assert_eq!(mtu_of(&[65535], Encap::Vxlan, false), MAX_MTU);
        assert_eq!(mtu_of(&[600], Encap::Vxlan, false), MIN_MTU);
    }

    #[test]
    fn auto_vni_is_lowest_unused_from_4096() {
        let mut state = State::new();
        let vni_of = |applied: Applied| match applied.changes.as_slice() {
            [Change::PutNetwork(n)] => n.vni,
            other => panic!("{other:?}"),
        };
        let mut low = spec("low", "10.9.0.0/24");
        low.vni = Some(7);
        assert_eq!(vni_of(ok(&mut state, Command::CreateNetwork(low))), 7);
        assert_eq!(vni_of(ok(&mut state, create_network("a", "10.0.0.0/24"))), 4096);
        assert_eq!(vni_of(ok(&mut state, create_network("b", "10.0.1.0/24"))), 4097);
        assert_eq!(vni_of(ok(&mut state, create_network("c", "10.0.2.0/24"))), 4098);
        ok(&mut state, Command::RemoveNetwork { name: "b".into() });
        assert_eq!(vni_of(ok(&mut state, create_network("d", "10.0.3.0/24"))), 4097);
        assert_eq!(vni_of(ok(&mut state, create_network("e", "10.0.4.0/24"))), 4099);
        let mut explicit = spec("f", "10.0.5.0/24");
        explicit.vni = Some(4100);
        ok(&mut state, Command::CreateNetwork(explicit));
        assert_eq!(vni_of(ok(&mut state, create_network("g", "10.0.6.0/24"))), 4101);
    }

    #[test]
    fn explicit_vni_must_be_in_range_and_unused() {
        let mut state = setup();
        for bad in [0, MAX_VNI + 1, u32::MAX] {
            let mut s = spec("x", "10.0.2.0/24");
            s.vni = Some(bad);
            assert_eq!(refused(&mut state, Command::CreateNetwork(s)), ModelError::InvalidVni(bad));
        }
        let mut s = spec("x", "10.0.2.0/24");
        s.vni = Some(4096);
        let err = refused(&mut state, Command::CreateNetwork(s));
        assert_eq!(err, ModelError::VniInUse { vni: 4096, network: "frontend".into() });
        assert_eq!(err.to_string(), "VNI 4096 is already used by network frontend");
        let mut s = spec("x", "10.0.2.0/24");
        s.vni = Some(MAX_VNI);
        ok(&mut state, Command::CreateNetwork(s));
    }

    #[test]
    fn overlapping_subnets_are_refused_with_the_spec_message() {
        let mut state = setup();
        let err = refused(&mut state, create_network("x", "10.0.1.0/25"));
        assert_eq!(
            err,
            ModelError::SubnetOverlap {
                subnet: net("10.0.1.0/25"),
                other: "frontend".into(),
                other_subnet: net("10.0.1.0/24")
            }
        );
        assert_eq!(err.to_string(), "subnet 10.0.1.0/25 overlaps network frontend (10.0.1.0/24)");
        for overlapping in ["10.0.1.0/24", "10.0.1.128/25", "10.0.1.252/30", "10.0.0.0/16"] {
            assert!(
                matches!(
                    refused(&mut state, create_network("x", overlapping)),
                    ModelError::SubnetOverlap { .. }
                ),
                "{overlapping}"
            );
        }
        ok(&mut state, create_network("below", "10.0.0.0/24"));
        ok(&mut state, create_network("above", "10.0.2.0/24"));
        // With several overlaps, the lowest one is named.
        assert_eq!(
            refused(&mut state, create_network("x", "10.0.0.0/16")),
            ModelError::SubnetOverlap {
                subnet: net("10.0.0.0/16"),
                other: "below".into(),
                other_subnet: net("10.0.0.0/24")
            }
        );
    }

    #[test]
    fn create_network_validation_errors() {
        let mut state = setup();
        assert_eq!(
            refused(&mut state, create_network("Bad_Name", "10.0.2.0/24")),
            ModelError::InvalidName("Bad_Name".into())
        );
        assert_eq!(
            refused(&mut state, create_network("frontend", "10.0.2.0/24")),
            ModelError::NetworkExists("frontend".into())
        );
        assert_eq!(
            refused(&mut state, create_network("x", "10.0.2.5/24")),
            ModelError::InvalidCidr("10.0.2.5/24".into())
        );
        for small in ["10.0.2.0/31", "10.0.2.0/32"] {
            let err = refused(&mut state, create_network("x", small));
            assert_eq!(err, ModelError::SubnetTooSmall { subnet: net(small) });
        }
        ok(&mut state, create_network("tiny", "10.0.3.0/30"));
        for gw in ["10.0.2.0", "10.0.2.255", "10.0.3.1"] {
            let mut s = spec("x", "10.0.2.0/24");
            s.gateway = Some(ip(gw));
            let err = refused(&mut state, Command::CreateNetwork(s));
            assert_eq!(
                err,
                ModelError::GatewayOutsideSubnet { gateway: ip(gw), subnet: net("10.0.2.0/24") }
            );
        }
        let mut s = spec("x", "10.0.2.0/24");
        s.encrypted = true;
        assert_eq!(refused(&mut state, Command::CreateNetwork(s)), ModelError::EncryptedNeedsUdp);
        for mtu in [0, 575, 9001] {
            let mut s = spec("x", "10.0.2.0/24");
            s.mtu = Some(mtu);
            assert_eq!(refused(&mut state, Command::CreateNetwork(s)), ModelError::InvalidMtu(mtu));
        }
        for mtu in [576, 9000] {
            let mut s = spec(&format!("m{mtu}"), &format!("10.{}.0.0/24", mtu / 100));
            s.mtu = Some(mtu);
            ok(&mut state, Command::CreateNetwork(s));
        }
    }

    #[test]
    fn subnets_on_reserved_ranges_or_an_underlay_are_refused_naming_the_value() {
        let mut state = setup();
        // h1 is 192.168.0.1/24; h2 registered by an agent that did not say its prefix.
        ok(
            &mut state,
            Command::RegisterHostV1 {
                name: "h2".into(),
                underlay_ip: ip("172.20.5.7"),
                underlay_mtu: 1500,
                now_ms: 1,
            },
        );
        for (subnet, want) in [
            (
                "192.168.0.0/24",
                "subnet 192.168.0.0/24 overlaps the underlay network 192.168.0.0/24 of host h1",
            ),
            (
                "192.168.0.128/25",
                "subnet 192.168.0.128/25 overlaps the underlay network 192.168.0.0/24 of host h1",
            ),
            (
                "192.168.0.0/16",
                "subnet 192.168.0.0/16 overlaps the underlay network 192.168.0.0/24 of host h1",
            ),
            (
                "172.20.5.0/24",
                "subnet 172.20.5.0/24 overlaps the underlay network 172.20.5.7/32 of host h2",
            ),
            ("127.0.0.0/8", "subnet 127.0.0.0/8 overlaps the loopback range (127.0.0.0/8)"),
            (
                "169.254.0.0/16",
                "subnet 169.254.0.0/16 overlaps the link-local range (169.254.0.0/16)",
            ),
            ("224.0.0.0/4", "subnet 224.0.0.0/4 overlaps the multicast range (224.0.0.0/4)"),
            ("0.0.0.0/0", "subnet 0.0.0.0/0 overlaps the whole IPv4 address space (0.0.0.0/0)"),
        ] {
            let err = refused(&mut state, create_network("x", subnet)).to_string();
            assert!(err.starts_with(want), "{subnet}: {err}");
        }
        // Next to an underlay is fine.
        ok(&mut state, create_network("beside", "192.168.1.0/24"));
        ok(&mut state, create_network("near-h2", "172.20.6.0/24"));
        assert_eq!(
            refused(
                &mut state,
                Command::RegisterHost {
                    name: "h3".into(),
                    underlay_ip: ip("192.168.9.1"),
                    underlay_prefix: 33,
                    underlay_mtu: 1500,
                    now_ms: 1,
                }
            ),
            ModelError::InvalidCidr("192.168.9.1/33".into())
        );
    }

    #[test]
    fn remove_network_refused_while_attached() {
        let mut state = setup();
        assert_eq!(
            refused(&mut state, Command::RemoveNetwork { name: "nope".into() }),
            ModelError::NetworkNotFound("nope".into())
        );
        for name in ["g", "a", "f", "b", "e", "c", "d"] {
            ok(&mut state, create_endpoint(name, "h1", "frontend"));
        }
        let err = refused(&mut state, Command::RemoveNetwork { name: "frontend".into() });
        assert_eq!(
            err,
            ModelError::NetworkInUse {
                network: "frontend".into(),
                endpoints: "a, b, c, d, e and 2 more".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "network frontend still has endpoints attached: a, b, c, d, e and 2 more"
        );
        for name in ["a", "b", "c", "d", "e"] {
            ok(&mut state, Command::RemoveEndpoint { name: name.into() });
        }
        assert_eq!(
            refused(&mut state, Command::RemoveNetwork { name: "frontend".into() }),
            ModelError::NetworkInUse { network: "frontend".into(), endpoints: "f, g".into() }
        );
        for name in ["f", "g"] {
            ok(&mut state, Command::RemoveEndpoint { name: name.into() });
        }
        let rev = state.catalog.revision;
        assert_eq!(
            ok(&mut state, Command::RemoveNetwork { name: "frontend".into() }),
            Applied { revision: rev + 1, changes: vec![Change::DeleteNetwork("frontend".into())] }
        );
        assert!(state.ipam("frontend").is_none());
        // Name, subnet and VNI are all free again.
        assert_eq!(
            ok(&mut state, create_network("frontend", "10.0.1.0/24")).changes,
            vec![Change::PutNetwork(frontend())]
        );
    }

    #[test]
    fn remove_network_removes_its_routes() {
        // Routes can only exist while their via endpoint is attached, so this reaches
        // into the catalog to check the cleanup that protects against stale routes.
        let mut state = setup();
        let route = Route {
            network: "frontend".into(),
            destination: net("10.9.0.0/16"),
            via: "gone".into(),
        };
        state.catalog.routes.insert(route.key(), route.clone());
        state.index = Index::build(&state.catalog);
        let applied = state.apply(&Command::RemoveNetwork { name: "frontend".into() }).unwrap();
        assert_eq!(
            applied.changes,
            vec![Change::DeleteRoute(route.key()), Change::DeleteNetwork("frontend".into())]
        );
        check_consistent(&state);
    }

    #[test]
    fn create_endpoint_allocates_ip_and_mac() {
        let mut state = setup();
        let want = Endpoint {
            name: "web".into(),
            host: "h1".into(),
            attachments: vec![attachment("frontend", "eth0", "10.0.1.2")],
        };
        assert_eq!(
            ok(&mut state, create_endpoint("web", "h1", "frontend")),
            Applied { revision: 3, changes: vec![Change::PutEndpoint(want)] }
        );
        let cmd = Command::CreateEndpoint {
            name: "db".into(),
            host: "h1".into(),
            network: "frontend".into(),
            ip: Some(ip("10.0.1.200")),
            aliases: strings(&["database", "pg"]),
        };
        let mut a = attachment("frontend", "eth0", "10.0.1.200");
        a.aliases = strings(&["database", "pg"]);
        let want = Endpoint { name: "db".into(), host: "h1".into(), attachments: vec![a] };
        assert_eq!(
            ok(&mut state, cmd),
            Applied { revision: 4, changes: vec![Change::PutEndpoint(want)] }
        );
        assert_eq!(state.endpoints_on_host("h1"), 2);
        assert_eq!(state.attached_count("frontend"), 2);
    }

    #[test]
    fn create_endpoint_validation_errors() {
        let mut state = setup();
        ok(&mut state, create_endpoint("web", "h1", "frontend"));
        assert_eq!(
            refused(&mut state, create_endpoint("-web", "h1", "frontend")),
            ModelError::InvalidName("-web".into())
        );
        assert_eq!(
            refused(&mut state, create_endpoint("web", "h1", "frontend")),
            ModelError::EndpointExists("web".into())
        );
        let err = refused(&mut state, create_endpoint("x", "h9", "frontend"));
        assert_eq!(err, ModelError::HostNotFound("h9".into()));
        assert_eq!(err.to_string(), "host h9 is not registered (see overlayctl host ls)");
        assert_eq!(
            refused(&mut state, create_endpoint("x", "h1", "nope")),
            ModelError::NetworkNotFound("nope".into())
        );
        let with = |ip_: Option<&str>, aliases: &[&str]| Command::CreateEndpoint {
            name: "x".into(),
            host: "h1".into(),
            network: "frontend".into(),
            ip: ip_.map(ip),
            aliases: strings(aliases),
        };
        assert_eq!(
            refused(&mut state, with(None, &["ok", "Bad"])),
            ModelError::InvalidName("Bad".into())
        );
        assert_eq!(
            refused(&mut state, with(None, &["a", "b", "a"])),
            ModelError::DuplicateAlias("a".into())
        );
        for outside in ["10.0.1.0", "10.0.1.255", "10.0.2.7"] {
            let err = refused(&mut state, with(Some(outside), &[]));
            assert_eq!(
                err,
                ModelError::IpOutsideSubnet {
                    ip: ip(outside),
                    network: "frontend".into(),
                    subnet: net("10.0.1.0/24")
                }
            );
        }
        assert_eq!(
            refused(&mut state, with(Some("10.0.1.2"), &[])).to_string(),
            "IP 10.0.1.2 is already in use in network frontend"
        );
        assert_eq!(
            refused(&mut state, with(Some("10.0.1.1"), &[])),
            ModelError::IpInUse { ip: ip("10.0.1.1"), network: "frontend".into() }
        );
    }

    #[test]
    fn exhausted_subnet_is_refused() {
        let mut state = setup();
        ok(&mut state, create_network("tiny", "10.0.3.0/30"));
        ok(&mut state, create_endpoint("a", "h1", "tiny"));
        let err = refused(&mut state, create_endpoint("b", "h1", "tiny"));
        assert_eq!(
            err,
            ModelError::SubnetExhausted { network: "tiny".into(), subnet: net("10.0.3.0/30") }
        );
        assert_eq!(err.to_string(), "network tiny (10.0.3.0/30) has no free addresses left");
        ok(&mut state, create_endpoint("b", "h1", "frontend"));
        assert_eq!(refused(&mut state, connect("tiny", "b")), err);
    }

    #[test]
    fn connect_uses_lowest_free_interface() {
        let mut state = setup();
        ok(&mut state, create_network("backend", "10.0.2.0/24"));
        ok(&mut state, create_network("mgmt", "10.0.3.0/24"));
        ok(&mut state, create_endpoint("gw", "h1", "frontend"));
        let cmd = Command::Connect {
            network: "backend".into(),
            endpoint: "gw".into(),
            ip: Some(ip("10.0.2.9")),
            aliases: strings(&["router"]),
        };
        let mut back = attachment("backend", "eth1", "10.0.2.9");
        back.aliases = strings(&["router"]);
        let front = attachment("frontend", "eth0", "10.0.1.2");
        let want = Endpoint {
            name: "gw".into(),
            host: "h1".into(),
            attachments: vec![front.clone(), back.clone()],
        };
        assert_eq!(
            ok(&mut state, cmd),
            Applied { revision: 6, changes: vec![Change::PutEndpoint(want)] }
        );
        let mgmt = attachment("mgmt", "eth2", "10.0.3.2");
        ok(&mut state, connect("mgmt", "gw"));
        ok(&mut state, disconnect("backend", "gw"));
        // eth1 is free again and comes back in order, with the MAC of its new address.
        let back = attachment("backend", "eth1", "10.0.2.2");
        let want =
            Endpoint { name: "gw".into(), host: "h1".into(), attachments: vec![front, back, mgmt] };
        assert_eq!(
            ok(&mut state, connect("backend", "gw")).changes,
            vec![Change::PutEndpoint(want)]
        );
        assert_eq!(state.attached_count("backend"), 1);
    }

    #[test]
    fn connect_validation_errors() {
        let mut state = setup();
        ok(&mut state, create_network("backend", "10.0.2.0/24"));
        ok(&mut state, create_endpoint("web", "h1", "frontend"));
        assert_eq!(
            refused(&mut state, connect("nope", "web")),
            ModelError::NetworkNotFound("nope".into())
        );
        assert_eq!(
            refused(&mut state, connect("backend", "nope")),
            ModelError::EndpointNotFound("nope".into())
        );
        let err = refused(&mut state, connect("frontend", "web"));
        assert_eq!(
            err,
            ModelError::AlreadyAttached { endpoint: "web".into(), network: "frontend".into() }
        );
        let with = |ip_: &str, aliases: &[&str]| Command::Connect {
            network: "backend".into(),
            endpoint: "web".into(),
            ip: Some(ip(ip_)),
            aliases: strings(aliases),
        };
        assert_eq!(
            refused(&mut state, with("10.0.2.3", &["x", "x"])),
            ModelError::DuplicateAlias("x".into())
        );
        assert_eq!(
            refused(&mut state, with("10.0.1.3", &[])),
            ModelError::IpOutsideSubnet {
                ip: ip("10.0.1.3"),
                network: "backend".into(),
                subnet: net("10.0.2.0/24")
            }
        );
        assert_eq!(
            refused(&mut state, with("10.0.2.1", &[])),
            ModelError::IpInUse { ip: ip("10.0.2.1"), network: "backend".into() }
        );
    }

    #[test]
    fn disconnect_releases_ip_and_cascades_routes() {
        let mut state = setup();
        ok(&mut state, create_network("backend", "10.0.2.0/24"));
        ok(&mut state, create_endpoint("gw", "h1", "frontend"));
        ok(&mut state, connect("backend", "gw"));
        ok(&mut state, add_route("frontend", "10.0.2.0/24", "gw"));
        ok(&mut state, add_route("backend", "10.0.1.0/24", "gw"));
        ok(&mut state, add_route("backend", "10.0.9.0/24", "gw"));
        let rev = state.catalog.revision;
        let want = Endpoint {
            name: "gw".into(),
            host: "h1".into(),
            attachments: vec![attachment("frontend", "eth0", "10.0.1.2")],
        };
        assert_eq!(
            ok(&mut state, disconnect("backend", "gw")),
            Applied {
                revision: rev + 1,
                changes: vec![
                    Change::DeleteRoute(("backend".into(), net("10.0.1.0/24"))),
                    Change::DeleteRoute(("backend".into(), net("10.0.9.0/24"))),
                    Change::PutEndpoint(want),
                ]
            }
        );
        // The frontend route via gw stays; the released address is free but not handed
        // out while unused ones remain (serial allocation).
        assert_eq!(state.catalog.routes.len(), 1);
        assert!(state.ipam("backend").unwrap().is_free(ip("10.0.2.2")));
        ok(&mut state, create_endpoint("x", "h1", "backend"));
        assert_eq!(state.catalog.endpoints["x"].attachments[0].ip, ip("10.0.2.3"));
        // Asked for by name, it is given at once, with the same MAC as before.
        let cmd = Command::Connect {
            network: "backend".into(),
            endpoint: "web2".into(),
            ip: Some(ip("10.0.2.2")),
            aliases: vec![],
        };
        ok(&mut state, create_endpoint("web2", "h1", "frontend"));
        ok(&mut state, cmd);
        let again = state.catalog.endpoints["web2"].attachment("backend").unwrap();
        assert_eq!(again.mac, Mac::from_ip(ip("10.0.2.2")));
    }

    #[test]
    fn disconnect_from_the_last_network_keeps_the_endpoint() {
        let mut state = setup();
        ok(&mut state, create_endpoint("web", "h1", "frontend"));
        ok(&mut state, add_route("frontend", "10.0.9.0/24", "web"));
        let rev = state.catalog.revision;
        let alone = Endpoint { name: "web".into(), host: "h1".into(), attachments: vec![] };
        assert_eq!(
            ok(&mut state, disconnect("frontend", "web")),
            Applied {
                revision: rev + 1,
                changes: vec![
                    Change::DeleteRoute(("frontend".into(), net("10.0.9.0/24"))),
                    Change::PutEndpoint(alone),
                ]
            }
        );
        assert_eq!(state.endpoints_on_host("h1"), 1);
        assert_eq!(state.attached_count("frontend"), 0);
        // The network can go now; the host cannot (it still has the endpoint).
        ok(&mut state, create_network("spare", "10.0.8.0/24"));
        ok(&mut state, Command::RemoveNetwork { name: "spare".into() });
        assert_eq!(
            refused(&mut state, Command::RemoveHost { name: "h1".into() }),
            ModelError::HostInUse { host: "h1".into(), endpoints: "web".into() }
        );
        // Connected again, it gets eth0 back (and a fresh address: serial allocation).
        ok(&mut state, connect("frontend", "web"));
        let a = &state.catalog.endpoints["web"].attachments;
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].interface.as_str(), a[0].ip), ("eth0", ip("10.0.1.3")));
        ok(&mut state, disconnect("frontend", "web"));
        ok(&mut state, Command::RemoveEndpoint { name: "web".into() });
        assert_eq!(state.endpoints_on_host("h1"), 0);
    }

    #[test]
    fn disconnect_validation_errors() {
        let mut state = setup();
        ok(&mut state, create_network("backend", "10.0.2.0/24"));
        ok(&mut state, create_endpoint("web", "h1", "frontend"));
        assert_eq!(
            refused(&mut state, disconnect("nope", "web")),
            ModelError::NetworkNotFound("nope".into())
        );
        assert_eq!(
            refused(&mut state, disconnect("frontend", "nope")),
            ModelError::EndpointNotFound("nope".into())
        );
        assert_eq!(
            refused(&mut state, disconnect("backend", "web")),
            ModelError::NotAttached { endpoint: "web".into(), network: "backend".into() }
        );
    }

    #[test]
    fn remove_endpoint_releases_everything_and_cascades_routes() {
        let mut state = setup();
        ok(&mut state, create_network("backend", "10.0.2.0/24"));
        ok(&mut state, create_endpoint("web", "h1", "frontend"));
        ok(&mut state, create_endpoint("gw", "h1", "frontend"));
        ok(&mut state, connect("backend", "gw"));
        ok(&mut state, add_route("frontend", "10.0.2.0/24", "gw"));
        ok(&mut state, add_route("backend", "10.0.1.0/24", "gw"));
        ok(&mut state, add_route("backend", "10.0.8.0/24", "gw"));
        ok(&mut state, add_route("frontend", "10.0.7.0/24", "web"));
        let rev = state.catalog.revision;
        assert_eq!(
            refused(&mut state, Command::RemoveEndpoint { name: "nope".into() }),
            ModelError::EndpointNotFound("nope".into())
        );
        assert_eq!(
            ok(&mut state, Command::RemoveEndpoint { name: "gw".into() }),
            Applied {
                revision: rev + 1,
                changes: vec![
                    Change::DeleteRoute(("backend".into(), net("10.0.1.0/24"))),
                    Change::DeleteRoute(("backend".into(), net("10.0.8.0/24"))),
                    Change::DeleteRoute(("frontend".into(), net("10.0.2.0/24"))),
                    Change::DeleteEndpoint("gw".into()),
                ]
            }
        );
        assert_eq!(
            state.catalog.routes.keys().collect::<Vec<_>>(),
            vec![&("frontend".to_string(), net("10.0.7.0/24"))]
        );
        assert!(state.ipam("frontend").unwrap().is_free(ip("10.0.1.3")));
        assert!(state.ipam("backend").unwrap().is_free(ip("10.0.2.2")));
        // Freed addresses wait while unused ones remain (serial allocation).
        let applied = ok(&mut state, create_endpoint("new", "h1", "frontend"));
        let want = Endpoint {
            name: "new".into(),
            host: "h1".into(),
            attachments: vec![attachment("frontend", "eth0", "10.0.1.4")],
        };
        assert_eq!(applied.changes, vec![Change::PutEndpoint(want)]);
    }

    #[test]
    fn add_and_remove_route() {
        let mut state = setup();
        ok(&mut state, create_network("backend", "10.0.2.0/24"));
        ok(&mut state, create_endpoint("web", "h1", "frontend"));
        ok(&mut state, create_endpoint("gw", "h1", "frontend"));
        ok(&mut state, connect("backend", "gw"));
        let route =
            Route { network: "frontend".into(), destination: net("10.0.2.0/24"), via: "gw".into() };
        let rev = state.catalog.revision;
        assert_eq!(
            ok(&mut state, add_route("frontend", "10.0.2.0/24", "gw")),
            Applied { revision: rev + 1, changes: vec![Change::PutRoute(route.clone())] }
        );
        assert_eq!(state.catalog.route_via_ip(&route), Some(ip("10.0.1.3")));
        assert_eq!(state.catalog.routes_in("frontend").collect::<Vec<_>>(), vec![&route]);
        assert_eq!(state.catalog.routes_in("backend").count(), 0);
        // A supernet of the own subnet (e.g. a default route) is allowed: the connected
        // route stays more specific.
        ok(&mut state, add_route("frontend", "0.0.0.0/0", "gw"));

        assert_eq!(
            refused(&mut state, add_route("nope", "10.0.2.0/24", "gw")),
            ModelError::NetworkNotFound("nope".into())
        );
        assert_eq!(
            refused(&mut state, add_route("frontend", "10.0.2.1/24", "gw")),
            ModelError::InvalidCidr("10.0.2.1/24".into())
        );
        for own in ["10.0.1.0/24", "10.0.1.128/25", "10.0.1.7/32"] {
            let err = refused(&mut state, add_route("frontend", own, "gw"));
            assert_eq!(
                err,
                ModelError::RouteToOwnSubnet { destination: net(own), network: "frontend".into() }
            );
        }
        assert_eq!(
            refused(&mut state, add_route("frontend", "10.0.2.0/24", "web")),
            ModelError::RouteExists { destination: net("10.0.2.0/24"), network: "frontend".into() }
        );
        assert_eq!(
            refused(&mut state, add_route("frontend", "10.0.3.0/24", "nope")),
            ModelError::EndpointNotFound("nope".into())
        );
        let err = refused(&mut state, add_route("backend", "10.0.3.0/24", "web"));
        assert_eq!(
            err,
            ModelError::ViaNotAttached { endpoint: "web".into(), network: "backend".into() }
        );
        assert_eq!(err.to_string(), "--via endpoint web is not attached to network backend");

        let remove =
            |n: &str, d: &str| Command::RemoveRoute { network: n.into(), destination: net(d) };
        assert_eq!(
            refused(&mut state, remove("nope", "10.0.2.0/24")),
            ModelError::NetworkNotFound("nope".into())
        );
        assert_eq!(
            refused(&mut state, remove("backend", "10.0.2.0/24")),
            ModelError::RouteNotFound {
                destination: net("10.0.2.0/24"),
                network: "backend".into()
            }
        );
        let rev = state.catalog.revision;
        assert_eq!(
            ok(&mut state, remove("frontend", "10.0.2.0/24")),
            Applied { revision: rev + 1, changes: vec![Change::DeleteRoute(route.key())] }
        );
    }

    #[test]
    fn register_host_creates_updates_and_refuses_duplicates() {
        let mut state = State::new();
        let h1 = Host {
            name: "h1".into(),
            underlay_ip: ip("192.168.0.1"),
            underlay_mtu: DEFAULT_UNDERLAY_MTU,
            status: HostStatus::Ready,
            status_changed_ms: 1000,
            underlay_prefix: 24,
        };
        assert_eq!(
            ok(&mut state, register("h1", "192.168.0.1", 0)),
            Applied { revision: 1, changes: vec![Change::PutHost(h1.clone())] }
        );
        // Identical re-registration changes nothing.
        assert_eq!(
            ok(&mut state, register("h1", "192.168.0.1", 1500)),
            Applied { revision: 1, changes: vec![] }
        );
        let err = refused(&mut state, register("h2", "192.168.0.1", 1500));
        assert_eq!(err, ModelError::UnderlayIpInUse { ip: ip("192.168.0.1"), host: "h1".into() });
        assert_eq!(err.to_string(), "underlay IP 192.168.0.1 is already used by host h1");
        assert_eq!(
            refused(&mut state, register("H2", "192.168.0.2", 1500)),
            ModelError::InvalidName("H2".into())
        );
        for bad in ["0.0.0.0", "255.255.255.255", "239.1.1.1"] {
            assert_eq!(
                refused(&mut state, register("h2", bad, 1500)),
                ModelError::InvalidIp(bad.into())
            );
        }
        // Going down, then re-registering from a new address with a new MTU.
        ok(
            &mut state,
            Command::SetHostStatus { name: "h1".into(), status: HostStatus::Down, now_ms: 2000 },
        );
        let moved = Command::RegisterHost {
            name: "h1".into(),
            underlay_ip: ip("192.168.0.9"),
            underlay_prefix: 24,
            underlay_mtu: 9000,
            now_ms: 3000,
        };
        let want = Host {
            underlay_ip: ip("192.168.0.9"),
            underlay_mtu: 9000,
            status_changed_ms: 3000,
            ..h1
        };
        assert_eq!(
            ok(&mut state, moved),
            Applied { revision: 3, changes: vec![Change::PutHost(want)] }
        );
        // The old address is free for another host.
        ok(&mut state, register("h2", "192.168.0.1", 1500));
    }

    #[test]
    fn remove_host_refused_while_it_has_endpoints() {
        let mut state = setup();
        assert_eq!(
            refused(&mut state, Command::RemoveHost { name: "h9".into() }),
            ModelError::HostNotFound("h9".into())
        );
        ok(&mut state, create_endpoint("web", "h1", "frontend"));
        ok(&mut state, create_endpoint("db", "h1", "frontend"));
        let err = refused(&mut state, Command::RemoveHost { name: "h1".into() });
        assert_eq!(err, ModelError::HostInUse { host: "h1".into(), endpoints: "db, web".into() });
        assert_eq!(err.to_string(), "host h1 still has endpoints: db, web");
        ok(&mut state, Command::RemoveEndpoint { name: "web".into() });
        ok(&mut state, Command::RemoveEndpoint { name: "db".into() });
        let rev = state.catalog.revision;
        assert_eq!(
            ok(&mut state, Command::RemoveHost { name: "h1".into() }),
            Applied { revision: rev + 1, changes: vec![Change::DeleteHost("h1".into())] }
        );
        ok(&mut state, register("h2", "192.168.0.1", 1500));
    }

    #[test]
    fn set_host_status_changes_only_on_transition() {
        let mut state = setup();
        let set = |status, now_ms| Command::SetHostStatus { name: "h1".into(), status, now_ms };
        assert_eq!(
            ok(&mut state, set(HostStatus::Ready, 5000)),
            Applied { revision: 2, changes: vec![] }
        );
        let down = Host {
            name: "h1".into(),
            underlay_ip: ip("192.168.0.1"),
            underlay_mtu: 1500,
            status: HostStatus::Down,
            status_changed_ms: 5000,
            underlay_prefix: 24,
        };
        assert_eq!(
            ok(&mut state, set(HostStatus::Down, 5000)),
            Applied { revision: 3, changes: vec![Change::PutHost(down)] }
        );
        assert_eq!(
            ok(&mut state, set(HostStatus::Down, 6000)),
            Applied { revision: 3, changes: vec![] }
        );
        assert_eq!(
            refused(
                &mut state,
                Command::SetHostStatus { name: "h9".into(), status: HostStatus::Down, now_ms: 1 }
            ),
            ModelError::HostNotFound("h9".into())
        );
    }

    #[test]
    fn host_statuses_change_together_in_one_revision() {
        let mut state = setup();
        ok(&mut state, register("h2", "192.168.0.2", 1500));
        ok(&mut state, register("h3", "192.168.0.3", 1500));
        let rev = state.catalog.revision;
        let applied = ok(
            &mut state,
            Command::SetHostStatuses {
                statuses: vec![
                    ("h1".into(), HostStatus::Down),
                    // Already ready: no change.
                    ("h2".into(), HostStatus::Ready),
                    // Removed meanwhile: skipped, the others still apply.
                    ("h9".into(), HostStatus::Down),
                    ("h3".into(), HostStatus::Down),
                ],
                now_ms: 7000,
            },
        );
        assert_eq!(applied.revision, rev + 1, "one revision for the whole pass");
        let changed: Vec<_> = applied
            .changes
            .iter()
            .map(|c| match c {
                Change::PutHost(h) => (h.name.as_str(), h.status, h.status_changed_ms),
                other => panic!("unexpected change {other:?}"),
            })
            .collect();
        assert_eq!(changed, vec![("h1", HostStatus::Down, 7000), ("h3", HostStatus::Down, 7000)]);
        assert_eq!(state.catalog.hosts["h2"].status, HostStatus::Ready);
        // Nothing to change: no revision.
        let again = ok(
            &mut state,
            Command::SetHostStatuses {
                statuses: vec![("h1".into(), HostStatus::Down)],
                now_ms: 8000,
            },
        );
        assert_eq!(again, Applied { revision: rev + 1, changes: vec![] });
    }

    #[test]
    fn snapshot_round_trips_and_rejects_garbage() {
        let mut state = setup();
        ok(&mut state, create_network("backend", "10.0.2.0/24"));
        ok(&mut state, create_endpoint("gw", "h1", "frontend"));
        ok(&mut state, connect("backend", "gw"));
        ok(&mut state, add_route("frontend", "10.0.2.0/24", "gw"));
        let bytes = state.to_bytes();
        let back = State::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.index, state.index);
        assert_eq!(back.digest(), state.digest());
        assert_ne!(State::new().digest(), state.digest());

        assert!(matches!(State::from_bytes(&[]), Err(SnapshotError::Empty)));
        assert!(matches!(State::from_bytes(&[9, 0]), Err(SnapshotError::Format(9))));
        assert!(matches!(
            State::from_bytes(&bytes[..bytes.len() / 2]),
            Err(SnapshotError::Decode(_))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(State::from_bytes(&long), Err(SnapshotError::TrailingBytes(1))));
        let mut broken = state.clone();
        broken.ipams.remove("backend");
        assert!(
            matches!(State::from_bytes(&broken.to_bytes()), Err(SnapshotError::MissingIpam(n)) if n == "backend")
        );
    }

    #[test]
    fn catalog_helpers() {
        let mut state = setup();
        ok(&mut state, register("h2", "192.168.0.2", 1500));
        ok(&mut state, register("h3", "192.168.0.3", 1500));
        ok(&mut state, create_network("backend", "10.0.2.0/24"));
        ok(&mut state, create_endpoint("a", "h1", "frontend"));
        ok(&mut state, create_endpoint("b", "h2", "backend"));
        ok(&mut state, create_endpoint("c", "h2", "frontend"));
        let names: Vec<_> =
            state.catalog.endpoints_in("frontend").map(|(e, a)| (e.name.as_str(), a.ip)).collect();
        assert_eq!(names, vec![("a", ip("10.0.1.2")), ("c", ip("10.0.1.3"))]);
        assert_eq!(state.endpoints_on_host("h2"), 2);
        assert_eq!(state.endpoints_on_host("h3"), 0);
        assert_eq!(state.catalog.endpoint_counts_by_host(), BTreeMap::from([("h1", 1), ("h2", 2)]));
        ok(&mut state, add_route("backend", "10.0.1.0/24", "b"));
        let mut rebuilt = Catalog::default();
        for change in state.catalog.snapshot_changes() {
            rebuilt.apply_change(&change);
        }
        rebuilt.revision = state.catalog.revision;
        assert_eq!(rebuilt, state.catalog);
    }

    #[test]
    fn revision_counts_changing_commands_only() {
        let mut state = State::new();
        let mut watcher = Catalog::default();
        let commands = [
            register("h1", "192.168.0.1", 1500),
            register("h1", "192.168.0.1", 1500),
            create_network("frontend", "10.0.1.0/24"),
            create_network("frontend", "10.0.1.0/24"),
            create_endpoint("a", "h1", "frontend"),
            Command::SetHostStatus { name: "h1".into(), status: HostStatus::Ready, now_ms: 9 },
            Command::RemoveEndpoint { name: "a".into() },
        ];
        let mut revisions = Vec::new();
        for c in &commands {
            match state.apply(c) {
                Ok(applied) => {
                    watcher.apply_applied(&applied);
                    revisions.push(Some(applied.revision));
                }
                Err(_) => revisions.push(None),
            }
        }
        assert_eq!(revisions, vec![Some(1), Some(1), Some(2), None, Some(3), Some(3), Some(4)]);
        assert_eq!(watcher, state.catalog);
    }

    /// Nothing on the endpoint paths may scan all endpoints: 20k creates, removes and
    /// re-creates must stay fast even in a debug build.
    #[test]
    fn many_endpoints() {
        let mut state = State::new();
        for h in 0..4 {
            state
                .apply(&register(&format!("h{h}"), &format!("192.168.0.{}", h + 1), 1500))
                .unwrap();
        }
        state.apply(&create_network("big", "10.0.0.0/16")).unwrap();
        state.apply(&create_network("other", "10.1.0.0/16")).unwrap();
        const N: u32 = 20_000;
        for i in 0..N {
            state.apply(&create_endpoint(&format!("e{i}"), &format!("h{}", i % 4), "big")).unwrap();
        }
        for i in (0..N).step_by(3) {
            state.apply(&connect("other", &format!("e{i}"))).unwrap();
        }
        for i in (0..N).step_by(2) {
            state.apply(&Command::RemoveEndpoint { name: format!("e{i}") }).unwrap();
        }
        // Allocation goes on past the last address handed out (10.0.0.2 + 19,999), not
        // back to the freed ones (e0's 10.0.0.2 first among them).
        state.apply(&create_endpoint("again", "h0", "big")).unwrap();
        assert_eq!(state.catalog.endpoints["again"].attachments[0].ip, ip("10.0.78.34"));
        assert_eq!(state.attached_count("big"), (N / 2 + 1) as usize);
        assert_eq!(state.endpoints_on_host("h1"), (N / 4) as usize);
        check_consistent(&state);
        assert_eq!(State::from_bytes(&state.to_bytes()).unwrap(), state);
    }

    /// Snapshots as earlier builds laid them out (postcard is positional, so these
    /// structs encode exactly as the old `State` did): lowest-free allocators and a MAC
    /// counter in formats 1 to 3, no cluster meta in format 1, hosts without
    /// `underlay_prefix` in formats 1 and 2.
    fn legacy_bytes(state: &State, format: u8) -> Vec<u8> {
        #[derive(Serialize)]
        struct HostV2<'a> {
            name: &'a str,
            underlay_ip: Ipv4Addr,
            underlay_mtu: u32,
            status: HostStatus,
            status_changed_ms: u64,
        }
        #[derive(Serialize)]
        struct CatalogV2<'a> {
            revision: u64,
            networks: &'a BTreeMap<String, Network>,
            endpoints: &'a BTreeMap<String, Endpoint>,
            routes: &'a BTreeMap<RouteKey, Route>,
            hosts: BTreeMap<String, HostV2<'a>>,
        }
        #[derive(Serialize)]
        struct IpamV1Bytes {
            subnet: Ipv4Network,
            gateway: Ipv4Addr,
            free: BTreeMap<u32, u32>,
            free_count: u32,
        }
        #[derive(Serialize)]
        struct V1<C> {
            catalog: C,
            ipams: BTreeMap<String, IpamV1Bytes>,
            next_mac: u64,
        }
        let c = &state.catalog;
        let hosts = c
            .hosts
            .values()
            .map(|h| {
                let old = HostV2 {
                    name: &h.name,
                    underlay_ip: h.underlay_ip,
                    underlay_mtu: h.underlay_mtu,
                    status: h.status,
                    status_changed_ms: h.status_changed_ms,
                };
                (h.name.clone(), old)
            })
            .collect();
        let old_catalog = CatalogV2 {
            revision: c.revision,
            networks: &c.networks,
            endpoints: &c.endpoints,
            routes: &c.routes,
            hosts,
        };
        let ipams = state
            .ipams
            .iter()
            .map(|(name, ipam)| {
                let free = ipam.free_ranges().map(|(s, e)| (u32::from(s), u32::from(e))).collect();
                let v1 = IpamV1Bytes {
                    subnet: ipam.subnet(),
                    gateway: ipam.gateway(),
                    free,
                    free_count: ipam.free_count(),
                };
                (name.clone(), v1)
            })
            .collect();
        let body = match format {
            1 | 2 => postcard::to_stdvec(&V1 { catalog: &old_catalog, ipams, next_mac: 42 }),
            _ => postcard::to_stdvec(&V1 { catalog: c, ipams, next_mac: 42 }),
        };
        let mut out = vec![format];
        out.extend(body.unwrap());
        // Postcard is positional: the meta that followed the counter is appended.
        if format >= 2 {
            out.extend(postcard::to_stdvec(state.meta()).unwrap());
        }
        out
    }

    #[test]
    fn formats_1_to_3_still_load() {
        let mut state = setup();
        ok(&mut state, create_endpoint("web", "h1", "frontend"));
        ok(&mut state, Command::InitCluster { cluster_id: "ab".repeat(16) });
        let mut no_prefix = state.clone();
        no_prefix.catalog.hosts.values_mut().for_each(|h| h.underlay_prefix = 0);
        let mut no_meta = no_prefix.clone();
        no_meta.meta = ClusterMeta::default();
        for (format, want) in [(1, &no_meta), (2, &no_prefix), (3, &state)] {
            let back = State::from_bytes(&legacy_bytes(&state, format)).unwrap();
            assert_eq!(back.catalog, want.catalog, "format {format}");
            assert_eq!(back.meta(), want.meta(), "format {format}");
            assert_eq!(back.index, state.index, "format {format}");
            check_consistent(&back);
            // Written again, it is the current format.
            assert_eq!(back.to_bytes()[0], SNAPSHOT_FORMAT);
        }
    }

    #[test]
    fn format_1_snapshots_load_with_serial_cursors_and_their_macs() {
        let mut state = setup();
        ok(&mut state, create_network("backend", "10.0.2.0/24"));
        for name in ["a", "b", "c", "d"] {
            ok(&mut state, create_endpoint(name, "h1", "frontend"));
        }
        ok(&mut state, Command::RemoveEndpoint { name: "b".into() });
        // An attachment from the counter era keeps its MAC.
        let legacy = Mac::from_counter(3);
        state.catalog.endpoints.get_mut("c").unwrap().attachments[0].mac = legacy;
        let mut back = State::from_bytes(&legacy_bytes(&state, 3)).unwrap();
        assert_eq!(back.catalog, state.catalog);
        assert_eq!(back.index, state.index);
        check_consistent(&back);
        // a, c, d hold .2, .4, .5: the next address is .6, not the freed .3.
        assert_eq!(back.ipam("frontend").unwrap().cursor(), ip("10.0.1.6"));
        assert_eq!(back.ipam("backend").unwrap().cursor(), ip("10.0.2.1"));
        ok(&mut back, create_endpoint("e", "h1", "frontend"));
        assert_eq!(back.catalog.endpoints["e"].attachments[0].ip, ip("10.0.1.6"));
        assert_eq!(back.catalog.endpoints["c"].attachments[0].mac, legacy);
        // Saved again, it is the current format, and stays what it is.
        let bytes = back.to_bytes();
        assert_eq!(bytes[0], SNAPSHOT_FORMAT);
        assert_eq!(State::from_bytes(&bytes).unwrap(), back);
    }

    mod properties {
        use std::collections::{BTreeSet, HashSet};

        use proptest::prelude::*;

        use super::*;

        const NETWORKS: [&str; 3] = ["n0", "n1", "n2"];
        /// Small and partly overlapping, so exhaustion and overlap errors happen often.
        const SUBNETS: [&str; 6] = [
            "10.0.0.0/29",
            "10.0.0.0/28",
            "10.0.1.0/30",
            "10.0.2.0/28",
            "10.0.0.8/29",
            "10.0.3.0/29",
        ];
        const ENDPOINTS: [&str; 6] = ["e0", "e1", "e2", "e3", "e4", "e5"];
        const DESTINATIONS: [&str; 2] = ["192.168.50.0/24", "10.0.2.0/28"];

        fn arb_command() -> impl Strategy<Value = Command> {
            let n = || (0..NETWORKS.len()).prop_map(|i| NETWORKS[i].to_string());
            let e = || (0..ENDPOINTS.len()).prop_map(|i| ENDPOINTS[i].to_string());
            // Explicit addresses as an offset into 10.0.0.0/22: sometimes free, sometimes
            // taken, sometimes outside.
            let maybe_ip = || {
                proptest::option::weighted(
                    0.25,
                    (0u32..40).prop_map(|o| Ipv4Addr::from(0x0a00_0000 + o)),
                )
            };
            prop_oneof![
                2 => (n(), 0..SUBNETS.len(), any::<bool>()).prop_map(|(name, s, gw)| {
                    let mut spec = spec(&name, SUBNETS[s]);
                    if gw {
                        spec.gateway = Some(Ipv4Addr::from(u32::from(net(SUBNETS[s]).network()) + 2));
                    }
                    Command::CreateNetwork(spec)
                }),
                1 => n().prop_map(|name| Command::RemoveNetwork { name }),
                5 => (e(), n(), maybe_ip(), any::<bool>()).prop_map(|(name, network, ip, two)| Command::CreateEndpoint {
                    host: if two { "h2".into() } else { "h1".into() },
                    name,
                    network,
                    ip,
                    aliases: vec![],
                }),
                5 => (n(), e(), maybe_ip()).prop_map(|(network, endpoint, ip)| Command::Connect {
                    network,
                    endpoint,
                    ip,
                    aliases: vec!["alias".into()],
                }),
                4 => (n(), e()).prop_map(|(network, endpoint)| Command::Disconnect { network, endpoint }),
                2 => e().prop_map(|name| Command::RemoveEndpoint { name }),
                3 => (n(), 0..DESTINATIONS.len(), e()).prop_map(|(network, d, via)| Command::AddRoute {
                    network,
                    destination: net(DESTINATIONS[d]),
                    via,
                }),
                1 => (n(), 0..DESTINATIONS.len()).prop_map(|(network, d)| Command::RemoveRoute {
                    network,
                    destination: net(DESTINATIONS[d]),
                }),
                1 => (any::<bool>(), any::<bool>(), 0u64..100).prop_map(|(h2, down, now_ms)| Command::SetHostStatus {
                    name: if h2 { "h2".into() } else { "h1".into() },
                    status: if down { HostStatus::Down } else { HostStatus::Ready },
                    now_ms,
                }),
                1 => Just(Command::RemoveHost { name: "h2".into() }),
                1 => Just(register("h2", "192.168.0.2", 9000)),
            ]
        }

        /// The address a fresh allocation in `network` must return with the allocator's
        /// cursor at `cursor`: the lowest usable address at or after it that is neither
        /// the gateway nor attached, else (wrapping) the lowest such address.
        fn expected_next(catalog: &Catalog, network: &str, cursor: u32) -> Option<Ipv4Addr> {
            let n = catalog.networks.get(network)?;
            let used: BTreeSet<Ipv4Addr> =
                catalog.endpoints_in(network).map(|(_, a)| a.ip).collect();
            let free = |a: &Ipv4Addr| *a != n.gateway && !used.contains(a);
            let (first, end) = (u32::from(n.subnet.network()) + 1, u32::from(n.subnet.broadcast()));
            (cursor.max(first)..end)
                .map(Ipv4Addr::from)
                .find(free)
                .or_else(|| (first..end).map(Ipv4Addr::from).find(free))
        }

        fn check_addresses(state: &State) -> Result<(), TestCaseError> {
            let mut macs = HashSet::new();
            for (name, n) in &state.catalog.networks {
                let mut ips = HashSet::new();
                for (e, a) in state.catalog.endpoints_in(name) {
                    prop_assert!(ips.insert(a.ip), "duplicate IP {} in {}", a.ip, name);
                    prop_assert!(n.subnet.contains(a.ip), "{} {}", e.name, a.ip);
                    prop_assert!(a.ip != n.subnet.network() && a.ip != n.subnet.broadcast());
                    prop_assert!(a.ip != n.gateway, "{} has the gateway address", e.name);
                }
            }
            for e in state.catalog.endpoints.values() {
                prop_assert!(state.catalog.hosts.contains_key(&e.host));
                for a in &e.attachments {
                    prop_assert!(macs.insert(a.mac), "duplicate MAC {}", a.mac);
                    prop_assert_eq!(a.mac, Mac::from_ip(a.ip), "the MAC follows the address");
                    prop_assert!(state.catalog.networks.contains_key(&a.network));
                }
            }
            for r in state.catalog.routes.values() {
                prop_assert!(state.catalog.route_via_ip(r).is_some(), "dangling route {r:?}");
            }
            Ok(())
        }

        fn base() -> State {
            let mut state = State::new();
            state.apply(&register("h1", "192.168.0.1", 1500)).expect("h1");
            state.apply(&register("h2", "192.168.0.2", 9000)).expect("h2");
            state.apply(&create_network("n0", "10.0.0.0/28")).expect("n0");
            state.apply(&create_network("n1", "10.0.2.0/28")).expect("n1");
            state
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn random_commands_keep_every_invariant(commands in proptest::collection::vec(arb_command(), 1..120)) {
                let mut state = base();
                let mut watcher = state.catalog.clone();
                // A model of each allocator's serial cursor.
                let mut cursors: BTreeMap<String, u32> = state.catalog.networks.values()
                    .map(|n| (n.name.clone(), u32::from(n.subnet.network()) + 1)).collect();
                let mut twin = base();
                for command in &commands {
                    let before = state.clone();
                    let auto_ip = match command {
                        Command::CreateEndpoint { network, ip: None, .. } | Command::Connect { network, ip: None, .. } => {
                            let cursor = cursors.get(network).copied().unwrap_or(0);
                            Some((network.clone(), expected_next(&state.catalog, network, cursor)))
                        }
                        _ => None,
                    };
                    let result = state.apply(command);
                    prop_assert_eq!(&twin.apply(command), &result);
                    match result {
                        Err(_) => {
                            prop_assert_eq!(&state, &before);
                            prop_assert_eq!(&state.index, &before.index);
                        }
                        Ok(applied) => {
                            let bump = u64::from(!applied.changes.is_empty());
                            prop_assert_eq!(applied.revision, before.catalog.revision + bump);
                            watcher.apply_applied(&applied);
                            if let Some((network, want)) = auto_ip {
                                let got = applied.changes.iter().find_map(|c| match c {
                                    Change::PutEndpoint(e) => e.attachment(&network).map(|a| a.ip),
                                    _ => None,
                                });
                                prop_assert_eq!(got, want, "serial allocation in {}", network);
                                if let Some(ip) = got {
                                    cursors.insert(network.clone(), u32::from(ip) + 1);
                                }
                            }
                            match command {
                                Command::CreateNetwork(spec) => {
                                    cursors.insert(spec.name.clone(), u32::from(spec.subnet.network()) + 1);
                                }
                                Command::RemoveNetwork { name } => {
                                    cursors.remove(name);
                                }
                                _ => {}
                            }
                        }
                    }
                    prop_assert_eq!(&watcher, &state.catalog);
                    check_addresses(&state)?;
                    check_consistent(&state);
                }
                let back = State::from_bytes(&state.to_bytes()).expect("round trip");
                prop_assert_eq!(&back, &state);
                prop_assert_eq!(back.digest(), state.digest());
                prop_assert_eq!(twin.digest(), state.digest());
            }
        }
    }
}
