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
//! attributes, forwarding state, and finally garbage (devices and namespaces nobody
//! wants any more).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_model::Mac;

use crate::desired::{
    EndpointDesired, Fdb, HostDesired, IfaceDesired, NetDesired, RouteSpec, Uplink, BRIDGE_PREFIX,
    PEER_PREFIX, RESOLV_CONF, TAP_PREFIX, VETH_PREFIX, VXLAN_PORT, VXLAN_PREFIX,
};
use crate::firewall::{self, Ruleset};
use crate::observed::{LinkKind, LinkObs, NsObs, ObservedHost, VxlanObs};

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
    WriteResolvConf {
        netns: String,
    },
    ApplyFirewall {
        ruleset: Ruleset,
    },
}

impl Action {
    /// The endpoint namespace this action concerns, for logging.
    pub fn netns(&self) -> Option<&str> {
        match self {
            Action::CreateNamespace { name } | Action::DeleteNamespace { name } => Some(name),
            Action::CreateVeth { netns, .. }
            | Action::AddRoute { netns, .. }
            | Action::DelRoute { netns, .. }
            | Action::WriteResolvConf { netns } => Some(netns),
            Action::DeleteLink { ns: Ns::Netns(n), .. }
            | Action::SetMtu { ns: Ns::Netns(n), .. }
            | Action::SetMac { ns: Ns::Netns(n), .. }
            | Action::SetUp { ns: Ns::Netns(n), .. }
            | Action::AddAddress { ns: Ns::Netns(n), .. }
            | Action::DelAddress { ns: Ns::Netns(n), .. }
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
    garbage: Vec<Action>,
}

impl Out {
    /// The firewall first: nothing may be created before its rules are in place (see
    /// `reconcile`, which holds the rest back when it fails).
    fn finish(self) -> Vec<Action> {
        let mut v = self.firewall;
        v.extend(self.make_room);
        v.extend(self.create);
        v.extend(self.attrs);
        v.extend(self.state);
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
        if observed.foreign.contains(&ed.name) {
            continue;
        }
        for i in &ed.interfaces {
            wanted_host_links.insert(&i.host_name);
        }
        plan_endpoint(ed, observed, &mut out);
    }

    if desired.host_forwarding && !observed.host_forwarding {
        out.state.push(Action::SetForwarding { ns: Ns::Host, on: true });
    }

    let ruleset = firewall::render(&desired.firewall);
    if !firewall::is_current(observed.firewall.as_ref(), &ruleset) {
        out.firewall.push(Action::ApplyFirewall { ruleset });
    }

    // Garbage: owned devices nobody wants (veths first, then uplinks, then bridges).
    let mut garbage: Vec<&String> = observed
        .links
        .keys()
        .filter(|n| is_owned_host_link(n) && !wanted_host_links.contains(n.as_str()))
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
    for name in observed.namespaces.keys() {
        if !desired.endpoints.contains_key(name) {
            out.garbage.push(Action::DeleteNamespace { name: name.clone() });
        }
    }
    out.finish()
}

fn plan_bridge(nd: &NetDesired, observed: &ObservedHost, out: &mut Out) {
    let ns = Ns::Host;
    match observed.links.get(&nd.bridge) {
        Some(link) if link.kind == LinkKind::Bridge => {
            plan_attrs(&ns, &nd.bridge, link, nd.mtu, Some(nd.bridge_mac), out);
            plan_addrs(&ns, &nd.bridge, &link.addrs, nd.gateway, out);
        }
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
/// here it only gets plugged in: bridge, MTU, up. One of the wrong kind is removed so
/// the data plane can create the right one on the next pass.
fn plan_tap(nd: &NetDesired, observed: &ObservedHost, out: &mut Out) {
    match observed.links.get(&nd.uplink) {
        Some(link) if link.kind == LinkKind::Tun => {
            plan_attrs(&Ns::Host, &nd.uplink, link, nd.mtu, None, out);
            if link.master.as_deref() != Some(nd.bridge.as_str()) {
                out.attrs
                    .push(Action::SetMaster { dev: nd.uplink.clone(), master: nd.bridge.clone() });
            }
        }
        Some(_) => {
            out.make_room.push(Action::DeleteLink { ns: Ns::Host, name: nd.uplink.clone() });
        }
        None => {}
    }
}

fn vxlan_ok(v: &VxlanObs, nd: &NetDesired, local: Ipv4Addr) -> bool {
    v.vni == nd.vni && v.local == Some(local) && v.port == VXLAN_PORT && !v.learning && v.proxy
}

fn plan_vxlan(nd: &NetDesired, local: Ipv4Addr, observed: &ObservedHost, out: &mut Out) {
    let existing = observed.links.get(&nd.uplink);
    let (fdb, neigh) = match existing {
        Some(link) if matches!(&link.kind, LinkKind::Vxlan(v) if vxlan_ok(v, nd, local)) => {
            plan_attrs(&Ns::Host, &nd.uplink, link, nd.mtu, None, out);
            if link.master.as_deref() != Some(nd.bridge.as_str()) {
                out.attrs
                    .push(Action::SetMaster { dev: nd.uplink.clone(), master: nd.bridge.clone() });
            }
            (link.fdb.clone(), link.neigh.clone())
        }
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
            Default::default()
        }
    };
    for entry in fdb.difference(&nd.fdb) {
        out.make_room.push(Action::DelFdb { dev: nd.uplink.clone(), entry: *entry });
    }
    for entry in nd.fdb.difference(&fdb) {
        out.state.push(Action::AddFdb { dev: nd.uplink.clone(), entry: *entry });
    }
    for (ip, mac) in &neigh {
        if !nd.neigh.contains_key(ip) {
            out.make_room.push(Action::DelNeigh { dev: nd.uplink.clone(), ip: *ip, mac: *mac });
        }
    }
    for (ip, mac) in &nd.neigh {
        if neigh.get(ip) != Some(mac) {
            out.state.push(Action::AddNeigh { dev: nd.uplink.clone(), ip: *ip, mac: *mac });
        }
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

fn plan_endpoint(ed: &EndpointDesired, observed: &ObservedHost, out: &mut Out) {
    let empty = NsObs::default();
    let nso = match observed.namespaces.get(&ed.name) {
        Some(Some(nso)) => nso,
        _ => {
            out.create.push(Action::CreateNamespace { name: ed.name.clone() });
            &empty
        }
    };
    let ns = Ns::Netns(ed.name.clone());
    if !nso.links.get("lo").is_some_and(|l| l.up) {
        out.attrs.push(Action::SetUp { ns: ns.clone(), dev: "lo".into() });
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
    let outside = observed.links.get(&iface.host_name).filter(|l| l.kind == LinkKind::Veth);
    match (inside, outside) {
        (Some(inside), Some(outside)) => {
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
    use crate::desired::{desired_for_host, LocalHost, ZERO_MAC};
    use crate::observed::FirewallObs;
    use overlay_model::Catalog;

    fn local(name: &str, ip: &str) -> LocalHost {
        LocalHost { name: name.into(), underlay_ip: ip.parse().unwrap(), can_encrypt: false }
    }

    /// What a perfect apply does to the kernel, as data.
    pub fn simulate(obs: &mut ObservedHost, actions: &[Action]) {
        fn links<'a>(
            obs: &'a mut ObservedHost,
            ns: &Ns,
        ) -> &'a mut std::collections::BTreeMap<String, LinkObs> {
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
                    nsobs(obs, &netns).links.insert(inside, i);
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
                Action::SetForwarding { ns: Ns::Host, on } => obs.host_forwarding = on,
                Action::SetForwarding { ns: Ns::Netns(n), on } => nsobs(obs, &n).ip_forward = on,
                Action::WriteResolvConf { netns } => {
                    nsobs(obs, &netns).resolv_conf = Some(RESOLV_CONF.into());
                }
                Action::ApplyFirewall { ruleset } => {
                    obs.firewall =
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
            Action::CreateVeth {
                netns: "web".into(),
                host_name: iface.host_name.clone(),
                peer_tmp: iface.peer_tmp.clone(),
                inside: "eth0".into(),
                mac: Mac::from_counter(1),
                mtu: 1450,
                bridge: "ovb-4096".into(),
            },
            Action::AddAddress {
                ns: Ns::Host,
                dev: "ovb-4096".into(),
                addr: "10.1.0.1/24".parse().unwrap(),
            },
            Action::SetUp { ns: Ns::Netns("web".into()), dev: "lo".into() },
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

        // A new remote endpoint: only its FDB/neigh entries.
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
            ]
        );

        // Remove local endpoint db: its namespace goes (api keeps `back` alive).
        cat.endpoints.remove("db");
        let d = desired_for_host(&cat, &l);
        let actions = converge(&d, &mut obs);
        let db_veth = crate::desired::veth_name("db", "eth0");
        assert_eq!(
            actions,
            vec![
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
}
