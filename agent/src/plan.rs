//! The difference between desired and observed, as a list of actions (pure).
//!
//! `plan(desired, observed)` only emits an action for something that is wrong or
//! missing, so planning again after a successful apply yields nothing, and an agent
//! restart over a correct data plane touches nothing (no traffic interruption). A device
//! is deleted and recreated only when what is wrong cannot be changed in place (a vxlan
//! with the wrong VNI or local address, a device of the wrong kind).
//!
//! Actions come in phases so that each one's prerequisites exist: the firewall (first,
//! so nothing is ever created unprotected), removals that make room, creations,
//! attributes, forwarding state, announcements (gratuitous ARP, see [`crate::garp`]),
//! and finally garbage (devices and namespaces nobody wants any more).
//!
//! Host devices are ours when they carry our alias ([`crate::observed::OWNED_ALIAS`]): only those are
//! changed, replaced or collected. A device with one of our names but without the alias
//! (made by an agent from before aliases, or a TAP the data plane just opened) is
//! adopted when it is of the kind we want under that name, and otherwise left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_model::Mac;

use crate::desired::{
    EndpointDesired, Fdb, HostDesired, IfaceDesired, NetDesired, RouteSpec, Uplink, BRIDGE_PREFIX,
    PEER_PREFIX, RESOLV_CONF, TAP_PREFIX, VETH_PREFIX, VXLAN_PORT, VXLAN_PREFIX,
};
use crate::firewall::{self, Ruleset};
use crate::marks;
use crate::observed::{LinkKind, LinkObs, NsObs, ObservedHost, VxlanObs};

/// Settings of every endpoint namespace that the plan relies on, set explicitly because
/// a new namespace copies its IPv4 settings from the host's initial namespace
/// (`net.core.devconf_inherit_init_net = 0`), whatever that host's administrator or
/// other software chose there:
/// * `rp_filter` off: a multi-homed endpoint gets replies through a route via another
///   network than the one it would send them on;
/// * gratuitous ARP accepted, so announcements replace stale or pending entries;
/// * no entries made from unsolicited ARP (`arp_accept`), so announcements for peers an
///   endpoint never talked to cost nothing in the host's shared neighbour table.
///
/// `all` and `default` here; the same keys per interface in [`iface_sysctls`].
pub const ENDPOINT_SYSCTLS: [(&str, &str); 6] = [
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv4/conf/all/drop_gratuitous_arp", "0"),
    ("net/ipv4/conf/default/drop_gratuitous_arp", "0"),
    ("net/ipv4/conf/all/arp_accept", "0"),
    ("net/ipv4/conf/default/arp_accept", "0"),
];

/// The per-interface settings of `iface` (an interface inside an endpoint namespace):
/// the effective value combines `all` with these, and an interface keeps the copy of
/// `default` it got when it appeared in the namespace.
pub fn iface_sysctls(iface: &str) -> [(String, &'static str); 3] {
    ["rp_filter", "drop_gratuitous_arp", "arp_accept"]
        .map(|knob| (format!("net/ipv4/conf/{iface}/{knob}"), "0"))
}

/// At most this many announcements of remote endpoints per network and pass: more means
/// a catch-up burst (thousands of endpoints learned at once), where the clients' own
/// ARP retries are cheaper than a storm of frames.
pub const MAX_ANNOUNCEMENTS: usize = 1024;

/// Which network namespace an action works in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ns {
    Host,
    /// An endpoint namespace, `/var/run/netns/NAME`.
    Netns(String),
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ns::Host => f.write_str("host"),
            Ns::Netns(n) => write!(f, "netns {n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Records the namespace as ours, then creates it.
    CreateNamespace {
        name: String,
    },
    /// Deletes the namespace, its `/etc/netns/NAME` and our record of it.
    DeleteNamespace {
        name: String,
    },
    /// Sets the alias of the namespace's `lo` to `mark`: what tells the agent the
    /// namespace is its own when its record is lost (see [`crate::marks`]).
    MarkNamespace {
        name: String,
        mark: String,
    },
    CreateBridge {
        name: String,
        mtu: u32,
        mac: Mac,
    },
    /// `id VNI local IP dstport 4789 nolearning proxy`, master `bridge`, up.
    CreateVxlan {
        name: String,
        vni: u32,
        local: Ipv4Addr,
        mtu: u32,
        bridge: String,
    },
    /// A veth pair: `host_name` in the host namespace (up, master `bridge`), the other
    /// end created as `peer_tmp`, moved into `netns` and renamed `inside`.
    CreateVeth {
        netns: String,
        host_name: String,
        peer_tmp: String,
        inside: String,
        mac: Mac,
        mtu: u32,
        bridge: String,
    },
    DeleteLink {
        ns: Ns,
        name: String,
    },
    SetMtu {
        ns: Ns,
        dev: String,
        mtu: u32,
    },
    SetMac {
        ns: Ns,
        dev: String,
        mac: Mac,
    },
    SetMaster {
        dev: String,
        master: String,
    },
    /// Marks a host device as ours ([`crate::observed::OWNED_ALIAS`]): one the agent created, or one
    /// adopted because it has a name and kind we want.
    SetAlias {
        dev: String,
    },
    SetUp {
        ns: Ns,
        dev: String,
    },
    AddAddress {
        ns: Ns,
        dev: String,
        addr: Ipv4Network,
    },
    DelAddress {
        ns: Ns,
        dev: String,
        addr: Ipv4Network,
    },
    AddFdb {
        dev: String,
        entry: Fdb,
    },
    DelFdb {
        dev: String,
        entry: Fdb,
    },
    /// Adds or replaces a permanent neighbour.
    AddNeigh {
        dev: String,
        ip: Ipv4Addr,
        mac: Mac,
    },
    DelNeigh {
        dev: String,
        ip: Ipv4Addr,
        mac: Mac,
    },
    AddRoute {
        netns: String,
        route: RouteSpec,
    },
    DelRoute {
        netns: String,
        route: RouteSpec,
    },
    SetForwarding {
        ns: Ns,
        on: bool,
    },
    /// Writes `/proc/sys/KEY = VALUE` inside the endpoint namespace, for each pair.
    SetSysctls {
        netns: String,
        values: Vec<(String, String)>,
    },
    /// A gratuitous ARP "`ip` is at `mac`" sent out of `dev` in `ns`: an endpoint's own
    /// `ethN` when it appears, or (in the host) the host side of a local endpoint's veth,
    /// to tell that endpoint of a remote one.
    Announce {
        ns: Ns,
        dev: String,
        ip: Ipv4Addr,
        mac: Mac,
    },
    WriteResolvConf {
        netns: String,
    },
    ApplyFirewall {
        ruleset: Ruleset,
    },
    /// Installs the bridge shortcut (see [`crate::shortcut`]).
    ApplyShortcut {
        ruleset: Ruleset,
    },
}

impl Action {
    /// Announcements are best effort: a lost one costs a client one ARP retry, so their
    /// failures are neither retried, nor reported above debug level, nor make an
    /// endpoint fail.
    pub fn is_best_effort(&self) -> bool {
        matches!(self, Action::Announce { .. })
    }

    /// The endpoint namespace this action concerns, for logging.
    pub fn netns(&self) -> Option<&str> {
        match self {
            Action::CreateNamespace { name }
            | Action::DeleteNamespace { name }
            | Action::MarkNamespace { name, .. } => Some(name),
            Action::CreateVeth { netns, .. }
            | Action::AddRoute { netns, .. }
            | Action::DelRoute { netns, .. }
            | Action::SetSysctls { netns, .. }
            | Action::WriteResolvConf { netns } => Some(netns),
            Action::DeleteLink { ns: Ns::Netns(n), .. }
            | Action::SetMtu { ns: Ns::Netns(n), .. }
            | Action::SetMac { ns: Ns::Netns(n), .. }
            | Action::SetUp { ns: Ns::Netns(n), .. }
            | Action::AddAddress { ns: Ns::Netns(n), .. }
            | Action::DelAddress { ns: Ns::Netns(n), .. }
            | Action::Announce { ns: Ns::Netns(n), .. }
            | Action::SetForwarding { ns: Ns::Netns(n), .. } => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::ApplyFirewall { ruleset } => {
                write!(f, "ApplyFirewall {{ {} rules, {} }}", ruleset.rules, ruleset.digest)
            }
            Action::ApplyShortcut { ruleset } => {
                write!(f, "ApplyShortcut {{ {} rules, {} }}", ruleset.rules, ruleset.digest)
            }
            other => write!(f, "{other:?}"),
        }
    }
}

/// Phased output.
#[derive(Default)]
struct Out {
    make_room: Vec<Action>,
    create: Vec<Action>,
    attrs: Vec<Action>,
    state: Vec<Action>,
    firewall: Vec<Action>,
    shortcut: Vec<Action>,
    announce: Vec<Action>,
    garbage: Vec<Action>,
}

impl Out {
    /// The firewall first: nothing may be created before its rules are in place (see
    /// `reconcile`, which holds the rest back when it fails).
    fn finish(self) -> Vec<Action> {
        let mut v = self.firewall;
        v.extend(self.make_room);
        v.extend(self.create);
        v.extend(self.shortcut);
        v.extend(self.attrs);
        v.extend(self.state);
        v.extend(self.announce);
        v.extend(self.garbage);
        v
    }
}

/// Prefixes of every device the agent creates in the host namespace.
pub const OWNED_HOST_PREFIXES: [&str; 5] =
    [BRIDGE_PREFIX, VXLAN_PREFIX, TAP_PREFIX, VETH_PREFIX, PEER_PREFIX];

pub fn is_owned_host_link(name: &str) -> bool {
    OWNED_HOST_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The actions that take `observed` to `desired`.
pub fn plan(desired: &HostDesired, observed: &ObservedHost) -> Vec<Action> {
    let mut out = Out::default();
    let mut wanted_host_links: BTreeSet<&str> = BTreeSet::new();

    for nd in desired.networks.values() {
        wanted_host_links.insert(&nd.bridge);
        wanted_host_links.insert(&nd.uplink);
        plan_bridge(nd, observed, &mut out);
        match nd.uplink_kind {
            Uplink::Vxlan => {
                if let Some(local) = desired.underlay_ip {
                    plan_vxlan(nd, local, observed, &mut out);
                }
            }
            Uplink::Tap { .. } => plan_tap(nd, observed, &mut out),
        }
    }

    for ed in desired.endpoints.values() {
        // Wanted even when the namespace is skipped: its veths are not garbage.
        for i in &ed.interfaces {
            wanted_host_links.insert(&i.host_name);
        }
        if left_alone(ed, observed) {
            continue;
        }
        plan_endpoint(ed, &desired.owner, observed, &mut out);
    }

    if desired.host_forwarding && !observed.host_forwarding {
        out.state.push(Action::SetForwarding { ns: Ns::Host, on: true });
    }

    let ruleset = firewall::render(&desired.firewall);
    if !firewall::is_current(observed.firewall.as_ref(), &ruleset) {
        out.firewall.push(Action::ApplyFirewall { ruleset });
    }

    plan_shortcut(desired, observed, &mut out);

    plan_announcements(desired, observed, &mut out);

    // Garbage: owned devices nobody wants (veths first, then uplinks, then bridges).
    let mut garbage: Vec<&String> = observed
        .links
        .iter()
        .filter(|(n, l)| {
            l.owned && is_owned_host_link(n) && !wanted_host_links.contains(n.as_str())
        })
        .map(|(n, _)| n)
        .collect();
    garbage.sort_by_key(|n| {
        let rank = if n.starts_with(BRIDGE_PREFIX) {
            2
        } else if n.starts_with(VXLAN_PREFIX) || n.starts_with(TAP_PREFIX) {
            1
        } else {
            0
        };
        (rank, n.as_str())
    });
    for name in garbage {
        out.garbage.push(Action::DeleteLink { ns: Ns::Host, name: name.clone() });
    }
    // Ours by the record, so removable even when unreadable.
    for name in observed.namespaces.keys().chain(observed.unreadable.keys()) {
        if !desired.endpoints.contains_key(name) {
            out.garbage.push(Action::DeleteNamespace { name: name.clone() });
        }
    }
    out.finish()
}

/// The bridge shortcut for the devices that exist or are created now, installed after
/// they are created and before anything gets an address (so no frame meets a table
/// that does not know a new local endpoint yet). Installed again whenever this plan
/// creates a device the table names: the kernel resolved the old one's index.
fn plan_shortcut(desired: &HostDesired, observed: &ObservedHost, out: &mut Out) {
    let created: BTreeSet<&str> = out
        .create
        .iter()
        .filter_map(|a| match a {
            Action::CreateVeth { host_name, .. } => Some(host_name.as_str()),
            Action::CreateVxlan { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    let named = crate::shortcut::devices(desired);
    let present: BTreeSet<&str> = named
        .iter()
        .copied()
        .filter(|d| observed.links.contains_key(*d) || created.contains(d))
        .collect();
    let ruleset = crate::shortcut::render(desired, &present);
    let recreated = created.iter().any(|d| named.contains(d));
    if recreated || !firewall::is_current(observed.shortcut.as_ref(), &ruleset) {
        out.shortcut.push(Action::ApplyShortcut { ruleset });
    }
}

/// Endpoints whose namespace is someone else's, or could not be read this pass.
fn left_alone(ed: &EndpointDesired, observed: &ObservedHost) -> bool {
    observed.foreign.contains(&ed.name) || observed.unreadable.contains_key(&ed.name)
}

/// Whether a device of this kind may be adopted under a given name.
type Adoptable = fn(&LinkKind) -> bool;

/// Host devices that hold a name the desired state needs but are not ours and not of
/// the kind we would adopt: nothing is planned for them, and the caller reports them.
pub fn in_the_way(desired: &HostDesired, observed: &ObservedHost) -> Vec<String> {
    let mut wanted: Vec<(&str, Adoptable)> = Vec::new();
    for nd in desired.networks.values() {
        wanted.push((&nd.bridge, |k| *k == LinkKind::Bridge));
        match nd.uplink_kind {
            Uplink::Vxlan => wanted.push((&nd.uplink, |k| matches!(k, LinkKind::Vxlan(_)))),
            Uplink::Tap { .. } => wanted.push((&nd.uplink, |k| *k == LinkKind::Tun)),
        }
    }
    for ed in desired.endpoints.values().filter(|ed| !left_alone(ed, observed)) {
        for i in &ed.interfaces {
            wanted.push((&i.host_name, |k| *k == LinkKind::Veth));
        }
    }
    wanted
        .into_iter()
        .filter(|(name, adoptable)| {
            observed.links.get(*name).is_some_and(|l| !l.owned && !adoptable(&l.kind))
        })
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Marks a device we keep as ours if it is not yet.
fn adopt(dev: &str, link: &LinkObs, out: &mut Out) {
    if !link.owned {
        out.attrs.push(Action::SetAlias { dev: dev.to_string() });
    }
}

fn plan_bridge(nd: &NetDesired, observed: &ObservedHost, out: &mut Out) {
    let ns = Ns::Host;
    match observed.links.get(&nd.bridge) {
        Some(link) if link.kind == LinkKind::Bridge => {
            adopt(&nd.bridge, link, out);
            plan_attrs(&ns, &nd.bridge, link, nd.mtu, Some(nd.bridge_mac), out);
            plan_addrs(&ns, &nd.bridge, &link.addrs, nd.gateway, out);
        }
        // Someone else's device under our name: never touched (see `in_the_way`).
        Some(link) if !link.owned => {}
        other => {
            if other.is_some() {
                out.make_room.push(Action::DeleteLink { ns: ns.clone(), name: nd.bridge.clone() });
            }
            out.create.push(Action::CreateBridge {
                name: nd.bridge.clone(),
                mtu: nd.mtu,
                mac: nd.bridge_mac,
            });
            out.attrs.push(Action::AddAddress { ns, dev: nd.bridge.clone(), addr: nd.gateway });
        }
    }
}

/// The TAP uplink of a UDP network. The UDP data plane creates it (TUNSETIFF is an
/// ioctl, not netlink) before every pass and carries its forwarding facts itself, so
/// here it only gets adopted and plugged in: bridge, MTU, up. One of the wrong kind is
/// removed (if ours) so the data plane can create the right one on the next pass.
fn plan_tap(nd: &NetDesired, observed: &ObservedHost, out: &mut Out) {
    match observed.links.get(&nd.uplink) {
        Some(link) if link.kind == LinkKind::Tun => {
            adopt(&nd.uplink, link, out);
            plan_attrs(&Ns::Host, &nd.uplink, link, nd.mtu, None, out);
            if link.master.as_deref() != Some(nd.bridge.as_str()) {
                out.attrs
                    .push(Action::SetMaster { dev: nd.uplink.clone(), master: nd.bridge.clone() });
            }
        }
        Some(link) if link.owned => {
            out.make_room.push(Action::DeleteLink { ns: Ns::Host, name: nd.uplink.clone() });
        }
        _ => {}
    }
}

fn vxlan_ok(v: &VxlanObs, nd: &NetDesired, local: Ipv4Addr) -> bool {
    v.vni == nd.vni && v.local == Some(local) && v.port == VXLAN_PORT && !v.learning && v.proxy
}

fn plan_vxlan(nd: &NetDesired, local: Ipv4Addr, observed: &ObservedHost, out: &mut Out) {
    let existing = observed.links.get(&nd.uplink);
    match existing {
        Some(link) if matches!(&link.kind, LinkKind::Vxlan(v) if vxlan_ok(v, nd, local)) => {
            adopt(&nd.uplink, link, out);
            plan_attrs(&Ns::Host, &nd.uplink, link, nd.mtu, None, out);
            if link.master.as_deref() != Some(nd.bridge.as_str()) {
                out.attrs
                    .push(Action::SetMaster { dev: nd.uplink.clone(), master: nd.bridge.clone() });
            }
            plan_entries(nd, &link.fdb, &link.neigh, out);
        }
        // Not ours and not what we want: never touched (see `in_the_way`).
        Some(link) if !link.owned => {}
        other => {
            if other.is_some() {
                out.make_room.push(Action::DeleteLink { ns: Ns::Host, name: nd.uplink.clone() });
            }
            out.create.push(Action::CreateVxlan {
                name: nd.uplink.clone(),
                vni: nd.vni,
                local,
                mtu: nd.mtu,
                bridge: nd.bridge.clone(),
            });
            plan_entries(nd, &BTreeSet::new(), &BTreeMap::new(), out);
        }
    }
}

/// The FDB and neighbour entries that take an uplink from `fdb`/`neigh` to `nd`'s.
fn plan_entries(
    nd: &NetDesired,
    fdb: &BTreeSet<Fdb>,
    neigh: &BTreeMap<Ipv4Addr, Mac>,
    out: &mut Out,
) {
    for entry in fdb.difference(&nd.fdb) {
        out.make_room.push(Action::DelFdb { dev: nd.uplink.clone(), entry: *entry });
    }
    for entry in nd.fdb.difference(fdb) {
        out.state.push(Action::AddFdb { dev: nd.uplink.clone(), entry: *entry });
    }
    // One walk of both maps in address order (not a lookup per entry: 10,000s of them
    // with many remote endpoints, every pass).
    let diff = crate::diff::map_diff(neigh, &nd.neigh);
    for (ip, mac) in diff.removed {
        out.make_room.push(Action::DelNeigh { dev: nd.uplink.clone(), ip: *ip, mac: *mac });
    }
    for (ip, mac) in diff.changed {
        out.state.push(Action::AddNeigh { dev: nd.uplink.clone(), ip: *ip, mac: *mac });
    }
}

/// The first stage of a pass: what lets local endpoints reach remote ones, planned from
/// the host's devices alone (`links`) so that it is applied before every endpoint
/// namespace is observed — that takes a thread and several netlink dumps per endpoint,
/// and a peer asking for a new remote endpoint waits for this stage only. For uplinks
/// that are otherwise right: their FDB and neighbour entries, and announcements of the
/// remote endpoints new to them to the local endpoints' veths plugged into the
/// network's bridge. The full [`plan`] afterwards finds this done (the caller folds
/// what succeeded into its observation with [`fold`]).
pub fn plan_forwarding(
    desired: &HostDesired,
    links: &BTreeMap<String, LinkObs>,
    tap_neigh: &BTreeMap<String, BTreeMap<Ipv4Addr, Mac>>,
) -> Vec<Action> {
    let mut out = Out::default();
    for nd in desired.networks.values() {
        let known = match nd.uplink_kind {
            Uplink::Vxlan => {
                let Some(local) = desired.underlay_ip else { continue };
                let Some(link) = links.get(&nd.uplink).filter(|l| {
                    l.owned && matches!(&l.kind, LinkKind::Vxlan(v) if vxlan_ok(v, nd, local))
                }) else {
                    continue;
                };
                plan_entries(nd, &link.fdb, &link.neigh, &mut out);
                &link.neigh
            }
            Uplink::Tap { .. } => match tap_neigh.get(&nd.uplink) {
                Some(known) => known,
                None => continue,
            },
        };
        let ports: Vec<&str> = desired
            .endpoints
            .values()
            .flat_map(|ed| ed.interfaces.iter())
            .filter(|i| i.network == nd.name)
            .filter(|i| {
                links.get(&i.host_name).is_some_and(|l| {
                    l.owned && l.kind == LinkKind::Veth && l.master.as_deref() == Some(&nd.bridge)
                })
            })
            .map(|i| i.host_name.as_str())
            .collect();
        announce_remote(nd, known, &ports, &mut out);
    }
    let mut actions = out.make_room;
    actions.extend(out.state);
    actions.extend(out.announce);
    actions
}

/// Announcements of `nd`'s remote endpoints that `known` lacks (or has with another
/// MAC) to each of `ports` (host sides of local veths), unless that is a burst.
fn announce_remote(
    nd: &NetDesired,
    known: &BTreeMap<Ipv4Addr, Mac>,
    ports: &[&str],
    out: &mut Out,
) {
    let fresh: Vec<(&Ipv4Addr, &Mac)> =
        nd.neigh.iter().filter(|(ip, mac)| known.get(ip) != Some(mac)).collect();
    if fresh.is_empty() || fresh.len() * ports.len() > MAX_ANNOUNCEMENTS {
        return;
    }
    for (ip, mac) in fresh {
        for port in ports {
            out.announce.push(Action::Announce {
                ns: Ns::Host,
                dev: port.to_string(),
                ip: *ip,
                mac: *mac,
            });
        }
    }
}

/// Records in `links` what a successful FDB or neighbour action did (other actions are
/// left to the next observation).
pub fn fold(links: &mut BTreeMap<String, LinkObs>, action: &Action) {
    match action {
        Action::AddFdb { dev, entry } => {
            links.get_mut(dev).map(|l| l.fdb.insert(*entry));
        }
        Action::DelFdb { dev, entry } => {
            links.get_mut(dev).map(|l| l.fdb.remove(entry));
        }
        Action::AddNeigh { dev, ip, mac } => {
            links.get_mut(dev).map(|l| l.neigh.insert(*ip, *mac));
        }
        Action::DelNeigh { dev, ip, .. } => {
            links.get_mut(dev).map(|l| l.neigh.remove(ip));
        }
        _ => {}
    }
}

/// MTU, MAC and up-state of an existing device.
fn plan_attrs(ns: &Ns, dev: &str, link: &LinkObs, mtu: u32, mac: Option<Mac>, out: &mut Out) {
    if link.mtu != mtu {
        out.attrs.push(Action::SetMtu { ns: ns.clone(), dev: dev.to_string(), mtu });
    }
    if let Some(mac) = mac {
        if link.mac != Some(mac) {
            out.attrs.push(Action::SetMac { ns: ns.clone(), dev: dev.to_string(), mac });
        }
    }
    if !link.up {
        out.attrs.push(Action::SetUp { ns: ns.clone(), dev: dev.to_string() });
    }
}

/// Exactly one address, `want`, on `dev`.
fn plan_addrs(ns: &Ns, dev: &str, have: &BTreeSet<Ipv4Network>, want: Ipv4Network, out: &mut Out) {
    for addr in have {
        if *addr != want {
            out.make_room.push(Action::DelAddress {
                ns: ns.clone(),
                dev: dev.to_string(),
                addr: *addr,
            });
        }
    }
    if !have.contains(&want) {
        out.attrs.push(Action::AddAddress { ns: ns.clone(), dev: dev.to_string(), addr: want });
    }
}

fn plan_endpoint(
    ed: &EndpointDesired,
    host: &marks::Owner,
    observed: &ObservedHost,
    out: &mut Out,
) {
    match observed.namespaces.get(&ed.name) {
        Some(Some(nso)) => plan_endpoint_in(ed, host, nso, observed, out),
        _ => {
            out.create.push(Action::CreateNamespace { name: ed.name.clone() });
            // Before any interface moves in (an interface copies `default` then), and
            // whatever the namespace inherited from the host's initial one.
            out.create
                .push(Action::SetForwarding { ns: Ns::Netns(ed.name.clone()), on: ed.ip_forward });
            let values: Vec<(String, String)> =
                ENDPOINT_SYSCTLS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            out.create.push(Action::SetSysctls { netns: ed.name.clone(), values: values.clone() });
            let fresh = NsObs {
                ip_forward: ed.ip_forward,
                sysctls: values.into_iter().collect(),
                ..NsObs::default()
            };
            plan_endpoint_in(ed, host, &fresh, observed, out);
        }
    }
}

/// An endpoint whose namespace exists (or is being created, as `nso` describes it).
fn plan_endpoint_in(
    ed: &EndpointDesired,
    host: &marks::Owner,
    nso: &NsObs,
    observed: &ObservedHost,
    out: &mut Out,
) {
    let ns = Ns::Netns(ed.name.clone());
    if !nso.links.get("lo").is_some_and(|l| l.up) {
        out.attrs.push(Action::SetUp { ns: ns.clone(), dev: "lo".into() });
    }
    let lo_alias = nso.links.get("lo").and_then(|l| l.alias.as_deref());
    if marks::needs_marking(lo_alias, host, ed.container.as_deref()) {
        let mark = marks::format(host, ed.container.as_deref());
        out.attrs.push(Action::MarkNamespace { name: ed.name.clone(), mark });
    }
    if nso.resolv_conf.as_deref() != Some(RESOLV_CONF) {
        out.state.push(Action::WriteResolvConf { netns: ed.name.clone() });
    }
    for iface in &ed.interfaces {
        plan_iface(ed, iface, nso, observed, out);
    }
    // Interfaces inside that are no longer wanted (after `network disconnect`).
    for (name, link) in &nso.links {
        if link.kind != LinkKind::Loopback && !ed.interfaces.iter().any(|i| &i.name == name) {
            out.garbage.push(Action::DeleteLink { ns: ns.clone(), name: name.clone() });
        }
    }
    for route in nso.routes.difference(&ed.routes) {
        out.make_room.push(Action::DelRoute { netns: ed.name.clone(), route: *route });
    }
    for route in ed.routes.difference(&nso.routes) {
        out.state.push(Action::AddRoute { netns: ed.name.clone(), route: *route });
    }
    if nso.ip_forward != ed.ip_forward {
        out.state.push(Action::SetForwarding { ns, on: ed.ip_forward });
    }
    // An interface yet to be created copies `default` (set above) as it moves in; only
    // the ones already there can have kept other values.
    let present = ed.interfaces.iter().filter(|i| nso.links.contains_key(&i.name));
    let wanted = ENDPOINT_SYSCTLS
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .chain(present.flat_map(|i| iface_sysctls(&i.name)));
    let values: Vec<(String, String)> = wanted
        .filter(|(k, v)| nso.sysctls.get(k).map(String::as_str) != Some(*v))
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    if !values.is_empty() {
        out.state.push(Action::SetSysctls { netns: ed.name.clone(), values });
    }
}

/// The interface was in place before this pass: both ends of its veth exist, and the
/// inside one has its address and MAC.
fn iface_in_place(iface: &IfaceDesired, nso: Option<&NsObs>, observed: &ObservedHost) -> bool {
    let inside = nso.and_then(|n| n.links.get(&iface.name)).is_some_and(|l| {
        l.kind == LinkKind::Veth && l.addrs.contains(&iface.addr) && l.mac == Some(iface.mac)
    });
    inside && observed.links.get(&iface.host_name).is_some_and(|l| l.kind == LinkKind::Veth)
}

/// Gratuitous ARP: an endpoint interface that appears (or gets a new address or MAC)
/// announces itself; a remote endpoint new to this host (or with a new MAC) is announced
/// to the local endpoints of its network that were already there, so a client that
/// asked for it before this host knew it gets its answer now, not at its next ARP retry.
fn plan_announcements(desired: &HostDesired, observed: &ObservedHost, out: &mut Out) {
    let nso = |ed: &EndpointDesired| observed.namespaces.get(&ed.name).and_then(Option::as_ref);
    let endpoints: Vec<&EndpointDesired> =
        desired.endpoints.values().filter(|ed| !left_alone(ed, observed)).collect();
    for ed in &endpoints {
        for i in ed.interfaces.iter().filter(|i| !iface_in_place(i, nso(ed), observed)) {
            out.announce.push(Action::Announce {
                ns: Ns::Netns(ed.name.clone()),
                dev: i.name.clone(),
                ip: i.addr.ip(),
                mac: i.mac,
            });
        }
    }
    for nd in desired.networks.values() {
        // What this host already told its endpoints' neighbours about; unknown for an
        // uplink just created (its endpoints are new too, with nothing cached).
        let known = match nd.uplink_kind {
            Uplink::Vxlan => observed
                .links
                .get(&nd.uplink)
                .filter(|l| l.owned && matches!(&l.kind, LinkKind::Vxlan(v) if v.vni == nd.vni))
                .map(|l| &l.neigh),
            Uplink::Tap { .. } => observed.tap_neigh.get(&nd.uplink),
        };
        let Some(known) = known else { continue };
        let ports: Vec<&str> = endpoints
            .iter()
            .flat_map(|ed| {
                ed.interfaces
                    .iter()
                    .filter(|i| i.network == nd.name && iface_in_place(i, nso(ed), observed))
                    .map(|i| i.host_name.as_str())
            })
            .collect();
        announce_remote(nd, known, &ports, out);
    }
}

fn plan_iface(
    ed: &EndpointDesired,
    iface: &IfaceDesired,
    nso: &NsObs,
    observed: &ObservedHost,
    out: &mut Out,
) {
    let ns = Ns::Netns(ed.name.clone());
    let inside = nso.links.get(&iface.name).filter(|l| l.kind == LinkKind::Veth);
    let host_side = observed.links.get(&iface.host_name);
    if host_side.is_some_and(|l| !l.owned && l.kind != LinkKind::Veth) {
        return; // someone else's device under our veth's name (see `in_the_way`)
    }
    let outside = host_side.filter(|l| l.kind == LinkKind::Veth);
    match (inside, outside) {
        (Some(inside), Some(outside)) => {
            adopt(&iface.host_name, outside, out);
            plan_attrs(&Ns::Host, &iface.host_name, outside, iface.mtu, None, out);
            if outside.master.as_deref() != Some(iface.bridge.as_str()) {
                out.attrs.push(Action::SetMaster {
                    dev: iface.host_name.clone(),
                    master: iface.bridge.clone(),
                });
            }
            plan_attrs(&ns, &iface.name, inside, iface.mtu, Some(iface.mac), out);
            plan_addrs(&ns, &iface.name, &inside.addrs, iface.addr, out);
        }
        _ => {
            // Half a pair (or the wrong kind of device) is useless: start over.
            if observed.links.contains_key(&iface.host_name) {
                out.make_room
                    .push(Action::DeleteLink { ns: Ns::Host, name: iface.host_name.clone() });
            }
            if nso.links.contains_key(&iface.name) {
                out.make_room.push(Action::DeleteLink { ns: ns.clone(), name: iface.name.clone() });
            }
            out.create.push(Action::CreateVeth {
                netns: ed.name.clone(),
                host_name: iface.host_name.clone(),
                peer_tmp: iface.peer_tmp.clone(),
                inside: iface.name.clone(),
                mac: iface.mac,
                mtu: iface.mtu,
                bridge: iface.bridge.clone(),
            });
            out.attrs.push(Action::AddAddress { ns, dev: iface.name.clone(), addr: iface.addr });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::desired::tests::catalog;
    use crate::desired::tests::local;
    use crate::desired::{desired_for_host, ZERO_MAC};
    use crate::observed::FirewallObs;
    use overlay_model::Catalog;

    /// What a perfect apply does to the kernel, as data.
    pub fn simulate(obs: &mut ObservedHost, actions: &[Action]) {
        fn links<'a>(obs: &'a mut ObservedHost, ns: &Ns) -> &'a mut BTreeMap<String, LinkObs> {
            match ns {
                Ns::Host => &mut obs.links,
                Ns::Netns(n) => &mut obs.namespaces.get_mut(n).unwrap().as_mut().unwrap().links,
            }
        }
        fn nsobs<'a>(obs: &'a mut ObservedHost, n: &str) -> &'a mut NsObs {
            obs.namespaces.get_mut(n).unwrap().as_mut().unwrap()
        }
        for a in actions {
            match a.clone() {
                Action::CreateNamespace { name } => {
                    let mut ns = NsObs::default();
                    ns.links.insert("lo".into(), LinkObs::new(LinkKind::Loopback, 65536));
                    obs.namespaces.insert(name, Some(ns));
                }
                Action::DeleteNamespace { name } => {
                    obs.namespaces.remove(&name);
                }
                Action::CreateBridge { name, mtu, mac } => {
                    let mut l = LinkObs::new(LinkKind::Bridge, mtu);
                    l.mac = Some(mac);
                    l.up = true;
                    obs.links.insert(name, l);
                }
                Action::CreateVxlan { name, vni, local, mtu, bridge } => {
                    let v = VxlanObs {
                        vni,
                        local: Some(local),
                        port: VXLAN_PORT,
                        learning: false,
                        proxy: true,
                    };
                    let mut l = LinkObs::new(LinkKind::Vxlan(v), mtu);
                    l.up = true;
                    l.master = Some(bridge);
                    obs.links.insert(name, l);
                }
                Action::CreateVeth { netns, host_name, inside, mac, mtu, bridge, .. } => {
                    let mut h = LinkObs::new(LinkKind::Veth, mtu);
                    h.up = true;
                    h.master = Some(bridge);
                    obs.links.insert(host_name, h);
                    let mut i = LinkObs::new(LinkKind::Veth, mtu);
                    i.up = true;
                    i.mac = Some(mac);
                    let ns = nsobs(obs, &netns);
                    // As the kernel does: a new interface copies the namespace's `default`.
                    for (key, _) in iface_sysctls(&inside) {
                        let knob = key.rsplit('/').next().unwrap();
                        let default = format!("net/ipv4/conf/default/{knob}");
                        if let Some(v) = ns.sysctls.get(&default).cloned() {
                            ns.sysctls.insert(key, v);
                        }
                    }
                    ns.links.insert(inside, i);
                }
                Action::DeleteLink { ns, name } => {
                    links(obs, &ns).remove(&name);
                }
                Action::SetMtu { ns, dev, mtu } => links(obs, &ns).get_mut(&dev).unwrap().mtu = mtu,
                Action::SetMac { ns, dev, mac } => {
                    links(obs, &ns).get_mut(&dev).unwrap().mac = Some(mac)
                }
                Action::SetMaster { dev, master } => {
                    obs.links.get_mut(&dev).unwrap().master = Some(master)
                }
                Action::SetUp { ns, dev } => links(obs, &ns).get_mut(&dev).unwrap().up = true,
                Action::AddAddress { ns, dev, addr } => {
                    links(obs, &ns).get_mut(&dev).unwrap().addrs.insert(addr);
                }
                Action::DelAddress { ns, dev, addr } => {
                    links(obs, &ns).get_mut(&dev).unwrap().addrs.remove(&addr);
                }
                Action::AddFdb { dev, entry } => {
                    obs.links.get_mut(&dev).unwrap().fdb.insert(entry);
                }
                Action::DelFdb { dev, entry } => {
                    obs.links.get_mut(&dev).unwrap().fdb.remove(&entry);
                }
                Action::AddNeigh { dev, ip, mac } => {
                    obs.links.get_mut(&dev).unwrap().neigh.insert(ip, mac);
                }
                Action::DelNeigh { dev, ip, .. } => {
                    obs.links.get_mut(&dev).unwrap().neigh.remove(&ip);
                }
                Action::AddRoute { netns, route } => {
                    nsobs(obs, &netns).routes.insert(route);
                }
                Action::DelRoute { netns, route } => {
                    nsobs(obs, &netns).routes.remove(&route);
                }
                Action::SetAlias { dev } => obs.links.get_mut(&dev).unwrap().owned = true,
                Action::MarkNamespace { name, mark } => {
                    let lo = nsobs(obs, &name).links.get_mut("lo").unwrap();
                    lo.alias = Some(mark);
                }
                Action::SetSysctls { netns, values } => {
                    nsobs(obs, &netns).sysctls.extend(values);
                }
                // Changes neighbour caches inside endpoints, which are not observed.
                Action::Announce { .. } => {}
                Action::SetForwarding { ns: Ns::Host, on } => obs.host_forwarding = on,
                Action::SetForwarding { ns: Ns::Netns(n), on } => nsobs(obs, &n).ip_forward = on,
                Action::WriteResolvConf { netns } => {
                    nsobs(obs, &netns).resolv_conf = Some(RESOLV_CONF.into());
                }
                Action::ApplyFirewall { ruleset } => {
                    obs.firewall =
                        Some(FirewallObs { digest: ruleset.digest, rules: ruleset.rules });
                }
                Action::ApplyShortcut { ruleset } => {
                    obs.shortcut =
                        Some(FirewallObs { digest: ruleset.digest, rules: ruleset.rules });
                }
            }
        }
    }

    fn converge(desired: &HostDesired, obs: &mut ObservedHost) -> Vec<Action> {
        let actions = plan(desired, obs);
        simulate(obs, &actions);
        actions
    }

    #[test]
    fn from_scratch_exact_actions() {
        // One network, one local endpoint, one remote endpoint.
        let mut cat = catalog();
        cat.endpoints.retain(|n, _| n == "web" || n == "gw");
        cat.routes.clear();
        cat.networks.remove("back");
        for e in cat.endpoints.values_mut() {
            e.attachments.retain(|a| a.network == "front");
        }
        let d = desired_for_host(&cat, &local("h1", "192.0.2.1"));
        let actions = plan(&d, &ObservedHost::default());
        let h3: Ipv4Addr = "192.0.2.3".parse().unwrap();
        let gw_mac = Mac::from_counter(5);
        let iface = &d.endpoints["web"].interfaces[0];
        let fw = firewall::render(&d.firewall);
        // Every device the shortcut names is created by this plan.
        let shortcut = crate::shortcut::render(&d, &crate::shortcut::devices(&d));
        assert_eq!(shortcut.rules, 5, "{}", shortcut.body);
        let expected = vec![
            Action::ApplyFirewall { ruleset: fw },
            Action::CreateBridge {
                name: "ovb-4096".into(),
                mtu: 1450,
                mac: crate::desired::bridge_mac(4096),
            },
            Action::CreateVxlan {
                name: "ovx-4096".into(),
                vni: 4096,
                local: "192.0.2.1".parse().unwrap(),
                mtu: 1450,
                bridge: "ovb-4096".into(),
            },
            Action::CreateNamespace { name: "web".into() },
            Action::SetForwarding { ns: Ns::Netns("web".into()), on: false },
            Action::SetSysctls {
                netns: "web".into(),
                values: ENDPOINT_SYSCTLS
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            Action::CreateVeth {
                netns: "web".into(),
                host_name: iface.host_name.clone(),
                peer_tmp: iface.peer_tmp.clone(),
                inside: "eth0".into(),
                mac: Mac::from_counter(1),
                mtu: 1450,
                bridge: "ovb-4096".into(),
            },
            // Before anything has an address, so no frame meets an older table.
            Action::ApplyShortcut { ruleset: shortcut },
            Action::AddAddress {
                ns: Ns::Host,
                dev: "ovb-4096".into(),
                addr: "10.1.0.1/24".parse().unwrap(),
            },
            Action::SetUp { ns: Ns::Netns("web".into()), dev: "lo".into() },
            // The mark that tells the agent the namespace is its own (see `marks`).
            Action::MarkNamespace { name: "web".into(), mark: "overlay-agent host=h1".into() },
            Action::AddAddress {
                ns: Ns::Netns("web".into()),
                dev: "eth0".into(),
                addr: "10.1.0.2/24".parse().unwrap(),
            },
            Action::AddFdb { dev: "ovx-4096".into(), entry: Fdb { mac: ZERO_MAC, dst: h3 } },
            Action::AddFdb { dev: "ovx-4096".into(), entry: Fdb { mac: gw_mac, dst: h3 } },
            Action::AddNeigh {
                dev: "ovx-4096".into(),
                ip: "10.1.0.9".parse().unwrap(),
                mac: gw_mac,
            },
            Action::WriteResolvConf { netns: "web".into() },
            Action::AddRoute {
                netns: "web".into(),
                route: RouteSpec {
                    dest: crate::desired::default_net(),
                    via: "10.1.0.1".parse().unwrap(),
                },
            },
            Action::SetForwarding { ns: Ns::Host, on: true },
            // The new interface announces itself.
            Action::Announce {
                ns: Ns::Netns("web".into()),
                dev: "eth0".into(),
                ip: "10.1.0.2".parse().unwrap(),
                mac: Mac::from_counter(1),
            },
        ];
        assert_eq!(actions, expected);
    }

    #[test]
    fn planning_after_applying_is_empty_on_every_host() {
        for (h, ip) in [("h1", "192.0.2.1"), ("h2", "192.0.2.2"), ("h3", "192.0.2.3")] {
            let d = desired_for_host(&catalog(), &local(h, ip));
            let mut obs = ObservedHost::default();
            assert!(!converge(&d, &mut obs).is_empty());
            assert_eq!(plan(&d, &obs), vec![], "host {h}");
        }
    }

    #[test]
    fn catalog_changes_converge_without_recreating_what_is_right() {
        let l = local("h2", "192.0.2.2");
        let mut cat = catalog();
        let mut obs = ObservedHost::default();
        converge(&desired_for_host(&cat, &l), &mut obs);

        // A new remote endpoint: only its FDB/neigh entries, and it is announced to the
        // local endpoints of its network (api; db is not in front).
        let e = crate::desired::tests::ep("new", "h1", &[("front", "10.1.0.20", 50)]);
        cat.endpoints.insert(e.name.clone(), e);
        let d = desired_for_host(&cat, &l);
        let actions = converge(&d, &mut obs);
        let dst: Ipv4Addr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            actions,
            vec![
                Action::AddFdb {
                    dev: "ovx-4096".into(),
                    entry: Fdb { mac: Mac::from_counter(50), dst }
                },
                Action::AddNeigh {
                    dev: "ovx-4096".into(),
                    ip: "10.1.0.20".parse().unwrap(),
                    mac: Mac::from_counter(50)
                },
                Action::Announce {
                    ns: Ns::Host,
                    dev: crate::desired::veth_name("api", "eth0"),
                    ip: "10.1.0.20".parse().unwrap(),
                    mac: Mac::from_counter(50)
                },
            ]
        );

        // Remove local endpoint db: its namespace goes (api keeps `back` alive).
        cat.endpoints.remove("db");
        let d = desired_for_host(&cat, &l);
        let actions = converge(&d, &mut obs);
        let db_veth = crate::desired::veth_name("db", "eth0");
        let present = crate::shortcut::devices(&d);
        assert!(!present.contains(db_veth.as_str()));
        assert_eq!(
            actions,
            vec![
                // The shortcut forgets db's veth before it goes.
                Action::ApplyShortcut { ruleset: crate::shortcut::render(&d, &present) },
                Action::DeleteLink { ns: Ns::Host, name: db_veth },
                Action::DeleteNamespace { name: "db".into() },
            ]
        );
        assert_eq!(plan(&d, &obs), vec![]);

        // Remove every endpoint on h2: everything owned goes, the firewall shrinks.
        cat.endpoints.retain(|_, e| e.host != "h2");
        let d = desired_for_host(&cat, &l);
        converge(&d, &mut obs);
        assert!(obs.links.is_empty(), "{:?}", obs.links.keys());
        assert!(obs.namespaces.is_empty());
        assert_eq!(plan(&d, &obs), vec![]);
    }

    #[test]
    fn a_tap_uplink_is_plugged_in_and_never_given_vxlan_entries() {
        let mut cat = catalog();
        cat.networks.get_mut("front").unwrap().encap = overlay_model::Encap::Udp;
        let d = desired_for_host(&cat, &local("h1", "192.0.2.1"));
        // The UDP data plane created the TAP before the pass: down, unplugged, MTU 1500.
        let mut obs = ObservedHost::default();
        obs.links.insert("ovu-4096".into(), LinkObs::new(LinkKind::Tun, 1500));
        let actions = converge(&d, &mut obs);
        let on_tap: Vec<_> =
            actions.iter().filter(|a| format!("{a:?}").contains("ovu-4096")).cloned().collect();
        assert_eq!(
            on_tap,
            vec![
                Action::SetMtu { ns: Ns::Host, dev: "ovu-4096".into(), mtu: 1450 },
                Action::SetUp { ns: Ns::Host, dev: "ovu-4096".into() },
                Action::SetMaster { dev: "ovu-4096".into(), master: "ovb-4096".into() },
            ]
        );
        assert!(!actions.iter().any(|a| matches!(
            a,
            Action::CreateVxlan { .. } | Action::AddFdb { .. } | Action::AddNeigh { .. }
        )));
        assert!(plan(&d, &obs).is_empty());

        // Not created yet: nothing to do for it (the data plane creates it first).
        obs.links.remove("ovu-4096");
        assert!(plan(&d, &obs).is_empty());

        // The network leaves the host: the TAP is garbage, removed before the bridge.
        obs.links.insert("ovu-4096".into(), LinkObs::new(LinkKind::Tun, 1450));
        let empty = desired_for_host(&Catalog::default(), &local("h1", "192.0.2.1"));
        let gone: Vec<_> = plan(&empty, &obs)
            .into_iter()
            .filter_map(|a| match a {
                Action::DeleteLink { ns: Ns::Host, name } if !name.starts_with(VETH_PREFIX) => {
                    Some(name)
                }
                _ => None,
            })
            .collect();
        assert_eq!(gone, vec!["ovu-4096".to_string(), "ovb-4096".to_string()]);
    }

    #[test]
    fn drift_is_repaired_minimally() {
        let l = local("h1", "192.0.2.1");
        let d = desired_for_host(&catalog(), &l);
        let mut obs = ObservedHost::default();
        converge(&d, &mut obs);

        let h2: Ipv4Addr = "192.0.2.2".parse().unwrap();
        let entry = Fdb { mac: Mac::from_counter(2), dst: h2 };
        obs.links.get_mut("ovx-4096").unwrap().fdb.remove(&entry);
        let stray = Fdb { mac: Mac::from_counter(99), dst: h2 };
        obs.links.get_mut("ovx-4096").unwrap().fdb.insert(stray);
        let web = obs.namespaces.get_mut("web").unwrap().as_mut().unwrap();
        let default = *web.routes.iter().next().unwrap();
        web.routes.remove(&default);
        web.links.get_mut("eth0").unwrap().mtu = 1500;
        assert_eq!(
            plan(&d, &obs),
            vec![
                Action::DelFdb { dev: "ovx-4096".into(), entry: stray },
                Action::SetMtu { ns: Ns::Netns("web".into()), dev: "eth0".into(), mtu: 1450 },
                Action::AddFdb { dev: "ovx-4096".into(), entry },
                Action::AddRoute { netns: "web".into(), route: default },
            ]
        );

        // The host-side veth deleted by hand: the pair is recreated.
        let mut obs2 = obs.clone();
        let veth = crate::desired::veth_name("web", "eth0");
        obs2.links.remove(&veth);
        let web = obs2.namespaces.get_mut("web").unwrap().as_mut().unwrap();
        web.links.remove("eth0");
        let actions = plan(&d, &obs2);
        assert!(actions.iter().any(|a| matches!(a, Action::CreateVeth { .. })));
        simulate(&mut obs2, &actions);

        // A vxlan with the wrong VNI is replaced.
        let mut obs3 = obs.clone();
        if let LinkKind::Vxlan(v) = &mut obs3.links.get_mut("ovx-4096").unwrap().kind {
            v.vni = 1;
        }
        let actions = plan(&d, &obs3);
        assert_eq!(actions[0], Action::DeleteLink { ns: Ns::Host, name: "ovx-4096".into() });
        simulate(&mut obs3, &actions);
        assert_eq!(plan(&d, &obs3), vec![]);
    }

    #[test]
    fn foreign_namespaces_and_links_are_never_touched() {
        let l = local("h1", "192.0.2.1");
        let d = desired_for_host(&catalog(), &l);
        let mut obs = ObservedHost::default();
        obs.foreign.insert("web".into());
        obs.links.insert("eth0".into(), LinkObs::new(LinkKind::Other("dummy".into()), 1500));
        let actions = plan(&d, &obs);
        assert!(actions.iter().all(|a| a.netns() != Some("web")), "{actions:?}");
        assert!(!actions
            .iter()
            .any(|a| matches!(a, Action::DeleteLink { name, .. } if name == "eth0")));
    }

    /// A converged host h2 (api on front+back, db on back) and its desired state.
    fn converged_h2() -> (HostDesired, ObservedHost) {
        let d = desired_for_host(&catalog(), &local("h2", "192.0.2.2"));
        let mut obs = ObservedHost::default();
        converge(&d, &mut obs);
        assert_eq!(plan(&d, &obs), vec![]);
        (d, obs)
    }

    #[test]
    fn namespace_settings_are_set_whatever_was_inherited() {
        let (d, mut obs) = converged_h2();
        // As a namespace made on a host with ip_forward=1 and strict rp_filter looks.
        let db = obs.namespaces.get_mut("db").unwrap().as_mut().unwrap();
        db.ip_forward = true;
        db.sysctls.insert("net/ipv4/conf/all/rp_filter".into(), "1".into());
        db.sysctls.insert("net/ipv4/conf/eth0/rp_filter".into(), "1".into());
        db.sysctls.remove("net/ipv4/conf/default/arp_accept");
        assert_eq!(
            plan(&d, &obs),
            vec![
                Action::SetForwarding { ns: Ns::Netns("db".into()), on: false },
                Action::SetSysctls {
                    netns: "db".into(),
                    values: vec![
                        ("net/ipv4/conf/all/rp_filter".into(), "0".into()),
                        ("net/ipv4/conf/default/arp_accept".into(), "0".into()),
                        ("net/ipv4/conf/eth0/rp_filter".into(), "0".into()),
                    ],
                },
            ]
        );
    }

    #[test]
    fn an_unreadable_namespace_is_left_alone_and_the_rest_goes_on() {
        let (d, mut obs) = converged_h2();
        let api = obs.namespaces.remove("api").unwrap();
        obs.unreadable.insert("api".into(), "permission denied".into());
        // db drifted meanwhile: repaired; api: nothing, and its veths are not garbage.
        let db = obs.namespaces.get_mut("db").unwrap().as_mut().unwrap();
        let default = *db.routes.iter().next().unwrap();
        db.routes.remove(&default);
        assert_eq!(plan(&d, &obs), vec![Action::AddRoute { netns: "db".into(), route: default }]);
        // Unwanted, it is deleted all the same (ours by the record).
        let mut cat = catalog();
        cat.endpoints.remove("api");
        let d = desired_for_host(&cat, &local("h2", "192.0.2.2"));
        let actions = plan(&d, &obs);
        assert!(actions.contains(&Action::DeleteNamespace { name: "api".into() }), "{actions:?}");
        drop(api);
    }

    #[test]
    fn only_devices_with_our_alias_are_changed_or_collected() {
        let (d, mut obs) = converged_h2();
        // Made by an agent from before aliases: adopted, nothing recreated.
        obs.links.get_mut("ovb-4096").unwrap().owned = false;
        obs.links.get_mut("ovx-4097").unwrap().owned = false;
        // A user's devices that happen to share our prefixes: never touched.
        let mut users = LinkObs::new(LinkKind::Other("dummy".into()), 1500);
        users.owned = false;
        obs.links.insert("ovb-9999".into(), users.clone());
        obs.links.insert(
            "ovvmine".into(),
            LinkObs { owned: false, ..LinkObs::new(LinkKind::Veth, 1500) },
        );
        // Ours and unwanted: collected.
        obs.links.insert(
            "ovx-5000".into(),
            LinkObs::new(
                LinkKind::Vxlan(VxlanObs {
                    vni: 5000,
                    local: None,
                    port: VXLAN_PORT,
                    learning: false,
                    proxy: true,
                }),
                1450,
            ),
        );
        assert_eq!(
            plan(&d, &obs),
            vec![
                // Networks in name order: back (4097), then front (4096).
                Action::SetAlias { dev: "ovx-4097".into() },
                Action::SetAlias { dev: "ovb-4096".into() },
                Action::DeleteLink { ns: Ns::Host, name: "ovx-5000".into() },
            ]
        );
        assert!(in_the_way(&d, &obs).is_empty());
        // A foreign device of the wrong kind under a name we need: left alone, reported,
        // and nothing is planned on top of it.
        obs.links.insert("ovb-4096".into(), users);
        let actions = plan(&d, &obs);
        assert!(actions.iter().all(|a| !format!("{a:?}").contains("\"ovb-4096\"")), "{actions:?}");
        assert_eq!(in_the_way(&d, &obs), vec!["ovb-4096".to_string()]);
    }

    #[test]
    fn remote_endpoints_new_to_a_tap_uplink_are_announced_once() {
        let mut cat = catalog();
        cat.networks.get_mut("front").unwrap().encap = overlay_model::Encap::Udp;
        let l = local("h2", "192.0.2.2");
        let d = desired_for_host(&cat, &l);
        let mut obs = ObservedHost::default();
        obs.links.insert("ovu-4096".into(), LinkObs::new(LinkKind::Tun, 1450));
        converge(&d, &mut obs);
        // The agent just started: what the data plane knew is unknown, nothing announced.
        assert_eq!(plan(&d, &obs), vec![]);
        obs.tap_neigh.insert("ovu-4096".into(), d.networks["front"].neigh.clone());
        assert_eq!(plan(&d, &obs), vec![]);
        // web (h1) moves to another address's MAC: announced to api, the local endpoint.
        let web = cat.endpoints.get_mut("web").unwrap();
        web.attachments[0].mac = Mac::from_ip("10.1.0.2".parse().unwrap());
        let d = desired_for_host(&cat, &l);
        assert_eq!(
            plan(&d, &obs),
            vec![Action::Announce {
                ns: Ns::Host,
                dev: crate::desired::veth_name("api", "eth0"),
                ip: "10.1.0.2".parse().unwrap(),
                mac: Mac::from_ip("10.1.0.2".parse().unwrap()),
            }]
        );
    }

    #[test]
    fn a_burst_of_new_remote_endpoints_is_not_announced() {
        let (_, mut obs) = converged_h2();
        let mut cat = catalog();
        for i in 0..=MAX_ANNOUNCEMENTS as u32 {
            let ip = std::net::Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 4, 0)) + i);
            let e = crate::desired::tests::ep(
                &format!("n{i}"),
                "h1",
                &[("front", &ip.to_string(), 1000 + u64::from(i))],
            );
            cat.endpoints.insert(e.name.clone(), e);
        }
        let d = desired_for_host(&cat, &local("h2", "192.0.2.2"));
        let actions = plan(&d, &obs);
        assert!(actions.iter().all(|a| !matches!(a, Action::Announce { .. })));
        simulate(&mut obs, &actions);
        assert_eq!(plan(&d, &obs), vec![]);
    }

    #[test]
    fn an_interface_that_gets_a_new_address_announces_it() {
        let (mut d, mut obs) = converged_h2();
        let db = d.endpoints.get_mut("db").unwrap();
        db.interfaces[0].addr = "10.2.0.7/24".parse().unwrap();
        let actions = plan(&d, &obs);
        assert_eq!(
            actions.last(),
            Some(&Action::Announce {
                ns: Ns::Netns("db".into()),
                dev: "eth0".into(),
                ip: "10.2.0.7".parse().unwrap(),
                mac: Mac::from_counter(4),
            })
        );
        simulate(&mut obs, &actions);
        assert_eq!(plan(&d, &obs), vec![]);
    }

    #[test]
    fn neighbours_wrong_missing_or_unwanted_are_put_right() {
        let (d, mut obs) = converged_h2();
        let vx = obs.links.get_mut("ovx-4096").unwrap();
        let (&web_ip, &web_mac) = vx.neigh.iter().next().unwrap();
        let stray: Ipv4Addr = "10.1.0.200".parse().unwrap();
        let low: Ipv4Addr = "10.1.0.0".parse().unwrap();
        // One with another MAC, one unwanted below and one above every wanted address.
        vx.neigh.insert(web_ip, Mac::from_counter(99));
        vx.neigh.insert(stray, Mac::from_counter(98));
        vx.neigh.insert(low, Mac::from_counter(97));
        let dev = "ovx-4096".to_string();
        let actions: Vec<Action> = plan(&d, &obs)
            .into_iter()
            .filter(|a| matches!(a, Action::AddNeigh { .. } | Action::DelNeigh { .. }))
            .collect();
        assert_eq!(
            actions,
            vec![
                Action::DelNeigh { dev: dev.clone(), ip: low, mac: Mac::from_counter(97) },
                Action::DelNeigh { dev: dev.clone(), ip: stray, mac: Mac::from_counter(98) },
                Action::AddNeigh { dev, ip: web_ip, mac: web_mac },
            ]
        );
        // And nothing once the neighbours match again (missing ones are added).
        let vx = obs.links.get_mut("ovx-4096").unwrap();
        vx.neigh.clear();
        let adds = plan(&d, &obs).iter().filter(|a| matches!(a, Action::AddNeigh { .. })).count();
        assert_eq!(adds, d.networks["front"].neigh.len());
    }

    #[test]
    fn forwarding_first_then_nothing_left_for_the_full_plan() {
        let (_, mut obs) = converged_h2();
        let mut cat = catalog();
        let e = crate::desired::tests::ep("new", "h1", &[("front", "10.1.0.20", 50)]);
        cat.endpoints.insert(e.name.clone(), e);
        let d = desired_for_host(&cat, &local("h2", "192.0.2.2"));
        let (ip, mac) = ("10.1.0.20".parse().unwrap(), Mac::from_counter(50));
        let fast = plan_forwarding(&d, &obs.links, &obs.tap_neigh);
        assert_eq!(
            fast,
            vec![
                Action::AddFdb {
                    dev: "ovx-4096".into(),
                    entry: Fdb { mac, dst: "192.0.2.1".parse().unwrap() }
                },
                Action::AddNeigh { dev: "ovx-4096".into(), ip, mac },
                Action::Announce {
                    ns: Ns::Host,
                    dev: crate::desired::veth_name("api", "eth0"),
                    ip,
                    mac
                },
            ]
        );
        for a in &fast {
            fold(&mut obs.links, a);
        }
        assert_eq!(plan(&d, &obs), vec![]);
        // A veth not (yet) plugged into the bridge is not announced to; an uplink that
        // is not right is left to the full plan.
        let mut links = obs.links.clone();
        links.get_mut(&crate::desired::veth_name("api", "eth0")).unwrap().master = None;
        let e = crate::desired::tests::ep("newer", "h1", &[("front", "10.1.0.21", 51)]);
        cat.endpoints.insert(e.name.clone(), e);
        let d = desired_for_host(&cat, &local("h2", "192.0.2.2"));
        let fast = plan_forwarding(&d, &links, &obs.tap_neigh);
        assert_eq!(fast.len(), 2, "{fast:?}");
        assert!(fast.iter().all(|a| !matches!(a, Action::Announce { .. })));
        links.get_mut("ovx-4096").unwrap().kind = LinkKind::Bridge;
        assert_eq!(plan_forwarding(&d, &links, &obs.tap_neigh), vec![]);
    }
}
