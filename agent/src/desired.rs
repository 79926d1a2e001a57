//! What this host's kernel should look like, computed from the catalog (pure).
//!
//! [`desired_for_host`] turns the cluster-wide [`Catalog`] into [`HostDesired`]: plain
//! data naming every device, address, forwarding entry, route and firewall rule this
//! host must have. No I/O happens here, so it is tested with literal catalogs.
//!
//! ## How remote endpoints are reached: proxy ARP via static neighbours
//!
//! Every vxlan device is created with `nolearning proxy`, and the agent programs for
//! every remote endpoint in the network
//!
//! * an FDB entry `MAC dst HOST_UNDERLAY_IP` (unicast frames go straight to its host),
//! * a permanent neighbour entry `IP lladdr MAC` on the vxlan device, which the kernel
//!   uses to answer ARP requests locally (`proxy`): ARP never crosses the underlay,
//! * all-zero FDB entries `00:00:00:00:00:00 dst IP` for each remote host carrying the
//!   network, so the remaining broadcast/multicast (not ARP) is replicated head-end.
//!
//! We chose proxy over replication-only because every host answers on the *same*
//! gateway address: with ARP replicated, an endpoint's "who has GATEWAY?" would reach
//! every host and be answered by all of them, and the endpoint could pick a remote
//! host's bridge as its gateway. With proxy, the vxlan device swallows every ARP
//! request (answering the ones it knows), so the gateway is always the local bridge and
//! ARP costs no underlay traffic. The catalog knows every address, so nothing is lost
//! by not flooding ARP — except the answer to a client that asks before its host has
//! the entry: that one is given by an announcement (gratuitous ARP, see
//! [`crate::garp`]) as soon as the entry is programmed, rather than at the client's
//! next ARP retry a second later. MACs follow addresses (the controller derives them),
//! so a cached entry stays right when an address moves between endpoints or hosts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_model::names::validate_name;
use overlay_model::{validate, Attachment, Catalog, Encap, Mac, ModelError, Network, Route};

/// Prefix of the per-network bridges (`ovb-<VNI>`).
pub const BRIDGE_PREFIX: &str = "ovb-";
/// Prefix of the per-network vxlan devices (`ovx-<VNI>`).
pub const VXLAN_PREFIX: &str = "ovx-";
/// Prefix of the per-network TAP devices of `--encap udp` networks (`ovu-<VNI>`),
/// created and read by the user-space UDP data plane (crate `overlay-udp`).
pub const TAP_PREFIX: &str = "ovu-";
/// Prefix of the host side of endpoint veths (`ovv<12 hex>`).
pub const VETH_PREFIX: &str = "ovv";
/// Prefix of the endpoint side of a veth while it is still in the host namespace
/// (`ovp<12 hex>`); a leftover one is garbage from an interrupted create.
pub const PEER_PREFIX: &str = "ovp";
/// The VXLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// What `/etc/netns/NAME/resolv.conf` says.
pub const RESOLV_CONF: &str = "nameserver 127.0.0.11\n";

/// This host as the agent knows it from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalHost {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    /// A host certificate is configured, so `--encrypted` networks can be carried.
    pub can_encrypt: bool,
}

/// How a network's frames leave this host: the bridge's uplink port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    /// Kernel VXLAN device `ovx-<VNI>`; the agent programs its FDB and neighbours.
    Vxlan,
    /// TAP device `ovu-<VNI>` read by the user-space UDP data plane, which gets the
    /// same FDB/neighbour facts as plain data instead of netlink entries.
    Tap { encrypted: bool },
}

/// One remote endpoint's MAC and the host it lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// The all-zero MAC: FDB entries with it are the BUM flood list.
pub const ZERO_MAC: Mac = Mac([0; 6]);

/// A route inside an endpoint namespace: `dest via gateway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteSpec {
    pub dest: Ipv4Network,
    pub via: Ipv4Addr,
}

/// One network as this host carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDesired {
    pub name: String,
    pub bridge: String,
    /// `ovx-<VNI>` or `ovu-<VNI>`, per [`NetDesired::uplink_kind`].
    pub uplink: String,
    pub uplink_kind: Uplink,
    pub vni: u32,
    pub mtu: u32,
    pub subnet: Ipv4Network,
    /// The gateway address with the subnet's prefix, on the bridge.
    pub gateway: Ipv4Network,
    /// Same on every host so a cached gateway MAC never goes stale.
    pub bridge_mac: Mac,
    pub internal: bool,
    /// Remote endpoints' MACs and the flood list (entries with [`ZERO_MAC`]): on the
    /// vxlan device, or handed to the UDP data plane for a TAP uplink.
    pub fdb: BTreeSet<Fdb>,
    /// Remote endpoint IP -> MAC, answered by the vxlan proxy (or the UDP data plane).
    pub neigh: BTreeMap<Ipv4Addr, Mac>,
}

/// One interface of a local endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceDesired {
    /// `ethN` inside the namespace.
    pub name: String,
    /// `ovv…` in the host namespace, plugged into `bridge`.
    pub host_name: String,
    /// `ovp…`: the inside end's name before it moves into the namespace.
    pub peer_tmp: String,
    pub network: String,
    pub bridge: String,
    pub addr: Ipv4Network,
    pub mac: Mac,
    pub mtu: u32,
}

/// One local endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointDesired {
    /// Endpoint name = namespace name (`/var/run/netns/NAME`).
    pub name: String,
    pub interfaces: Vec<IfaceDesired>,
    /// Default route (`0.0.0.0/0`) plus the catalog's routes.
    pub routes: BTreeSet<RouteSpec>,
    /// On when this endpoint is the `via` of some route.
    pub ip_forward: bool,
    /// The container whose namespace this is, when CNI attached it (set by
    /// [`crate::cni::Cni::adjust`]): it goes into the namespace's mark (see
    /// [`crate::marks`]).
    pub container: Option<String>,
}

/// The firewall's input: which bridges exist and what they may do, who the hosts are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallDesired {
    /// (bridge, subnet) of non-internal networks: masqueraded when leaving the host.
    pub external: Vec<(String, Ipv4Network)>,
    /// Bridges of internal networks: nothing is forwarded in or out of them.
    pub internal: Vec<String>,
    /// The bridges' own MACs: a frame on a bridge addressed to one is routed (or for
    /// the host); every other frame is bridged.
    pub gateway_macs: BTreeSet<Mac>,
    /// (bridge, gateway address): the one host address an endpoint may ping.
    pub gateways: BTreeSet<(String, Ipv4Addr)>,
    /// Underlay addresses of every registered host, this one included: the only
    /// sources of data-plane packets.
    pub hosts: BTreeSet<Ipv4Addr>,
    /// Ports and addresses from the agent's configuration (set by the caller of
    /// [`desired_for_host`], which only sees the catalog).
    pub guard: crate::firewall::Guard,
}

/// Everything this host should have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostDesired {
    pub networks: BTreeMap<String, NetDesired>,
    pub endpoints: BTreeMap<String, EndpointDesired>,
    pub firewall: FirewallDesired,
    /// The host must forward (some non-internal network needs egress).
    pub host_forwarding: bool,
    /// Networks carried here that this host cannot realise (`--encrypted` without a
    /// host certificate).
    pub unsupported: Vec<String>,
    /// Local IP of the vxlan devices.
    pub underlay_ip: Option<Ipv4Addr>,
    /// What the catalog holds that failed validation here and was left out, one line
    /// each, naming the object and why; everything else proceeds.
    pub rejected: Vec<String>,
    /// This host (and its cluster, once known): what the marks of its namespaces say
    /// (see [`crate::marks`]).
    pub owner: crate::marks::Owner,
}

/// `ovb-<VNI>`: at most 12 characters (VNIs are 24 bits), stable for a network's life.
pub fn bridge_name(vni: u32) -> String {
    format!("{BRIDGE_PREFIX}{vni}")
}

/// `ovx-<VNI>`.
pub fn vxlan_name(vni: u32) -> String {
    format!("{VXLAN_PREFIX}{vni}")
}

/// `ovu-<VNI>`.
pub fn tap_name(vni: u32) -> String {
    format!("{TAP_PREFIX}{vni}")
}

/// 48 bits of FNV-1a over `endpoint/interface`, as 12 hex digits: with the 3-letter
/// prefix, exactly the 15 characters Linux allows.
fn short_hash(endpoint: &str, interface: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in endpoint.bytes().chain(std::iter::once(b'/')).chain(interface.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// Host-side veth name of an endpoint interface.
pub fn veth_name(endpoint: &str, interface: &str) -> String {
    format!("{VETH_PREFIX}{}", short_hash(endpoint, interface))
}

/// Temporary name of the inside end.
pub fn peer_name(endpoint: &str, interface: &str) -> String {
    format!("{PEER_PREFIX}{}", short_hash(endpoint, interface))
}

/// The bridge MAC of a network: locally administered, `06:6f:76:` + VNI, so it can
/// never equal a controller-assigned endpoint MAC (those start with `02:`).
pub fn bridge_mac(vni: u32) -> Mac {
    let b = vni.to_be_bytes();
    Mac([0x06, 0x6f, 0x76, b[1], b[2], b[3]])
}

/// A network this host may realise: everything that becomes a device name, address,
/// MTU or VNI is checked again (the catalog comes over the network), and its subnet
/// must not overlap this host's underlay (a bridge address there would take over the
/// route to the other hosts).
fn check_network(net: &Network, me: &str, underlays: &[Ipv4Network]) -> Result<(), ModelError> {
    validate_name(&net.name)?;
    validate::check_subnet(net.subnet)?;
    validate::check_host_address(net.gateway, net.subnet)?;
    validate::check_vni(net.vni)?;
    validate::check_mtu(net.mtu)?;
    if let Some(u) = underlays.iter().find(|u| validate::overlaps(net.subnet, **u)) {
        return Err(ModelError::SubnetOverlapsUnderlay {
            subnet: net.subnet,
            host: me.to_string(),
            underlay: *u,
        });
    }
    Ok(())
}

/// An attachment's interface name, address (a usable one of `net`) and MAC.
fn check_attachment(att: &Attachment, net: &Network) -> Result<(), ModelError> {
    validate::check_interface(&att.interface)?;
    if validate::check_host_address(att.ip, net.subnet).is_err() {
        return Err(ModelError::IpOutsideSubnet {
            ip: att.ip,
            network: net.name.clone(),
            subnet: net.subnet,
        });
    }
    validate::check_unicast_mac(att.mac)
}

/// A route's destination (host bits zero) and next hop (inside the network's subnet).
fn check_route(route: &Route, via: Ipv4Addr, subnet: Ipv4Network) -> Result<(), ModelError> {
    let dest = route.destination;
    if dest.ip() != dest.network() {
        return Err(ModelError::InvalidCidr(dest.to_string()));
    }
    validate::check_host_address(via, subnet)
}

/// The desired state of `local` given the whole catalog. Objects that fail validation
/// are left out and listed in [`HostDesired::rejected`].
pub fn desired_for_host(catalog: &Catalog, local: &LocalHost) -> HostDesired {
    let mut out = HostDesired {
        underlay_ip: Some(local.underlay_ip),
        owner: crate::marks::Owner { host: local.name.clone(), cluster: None },
        ..HostDesired::default()
    };
    let mut rejected = Vec::new();

    // Hosts whose underlay address can be sent to; others get no entries.
    let mut host_ips: BTreeMap<&str, Ipv4Addr> = BTreeMap::new();
    for h in catalog.hosts.values() {
        match validate_name(&h.name).and(validate::check_underlay_ip(h.underlay_ip)) {
            Ok(()) => {
                host_ips.insert(&h.name, h.underlay_ip);
            }
            Err(e) => rejected.push(format!("host {:?} skipped: {e}", h.name)),
        }
    }
    out.firewall.hosts = host_ips.values().copied().collect();
    out.firewall.hosts.insert(local.underlay_ip);
    let host_ip = |host: &str| -> Option<Ipv4Addr> {
        let ip = *host_ips.get(host)?;
        (ip != local.underlay_ip && host != local.name).then_some(ip)
    };
    // This host's underlay network as registered (widest first), and its own address.
    let mut underlays: Vec<Ipv4Network> = catalog
        .hosts
        .get(&local.name)
        .filter(|h| h.underlay_ip == local.underlay_ip)
        .map(|h| h.underlay_network())
        .into_iter()
        .collect();
    underlays.push(Ipv4Network::from(local.underlay_ip));

    // Local endpoints: their names become namespace names and paths.
    let mut local_eps = Vec::new();
    for e in catalog.endpoints.values().filter(|e| e.host == local.name) {
        match validate_name(&e.name) {
            Ok(()) => local_eps.push(e),
            Err(err) => rejected.push(format!("endpoint {:?} skipped: {err}", e.name)),
        }
    }
    let carried: BTreeSet<&str> =
        local_eps.iter().flat_map(|e| e.attachments.iter().map(|a| a.network.as_str())).collect();

    // Every carried network's endpoints in one pass over the catalog (not one per
    // network).
    let mut members: BTreeMap<&str, Vec<(&overlay_model::Endpoint, &Attachment)>> = BTreeMap::new();
    for ep in catalog.endpoints.values() {
        for att in &ep.attachments {
            if carried.contains(att.network.as_str()) {
                members.entry(att.network.as_str()).or_default().push((ep, att));
            }
        }
    }
    for name in &carried {
        let Some(net) = catalog.networks.get(*name) else { continue };
        if let Err(e) = check_network(net, &local.name, &underlays) {
            rejected.push(format!("network {:?} skipped: {e}", net.name));
            continue;
        }
        let (uplink, uplink_kind) = match net.encap {
            Encap::Vxlan => (vxlan_name(net.vni), Uplink::Vxlan),
            Encap::Udp if net.encrypted && !local.can_encrypt => {
                out.unsupported.push(net.name.clone());
                continue;
            }
            Encap::Udp => (tap_name(net.vni), Uplink::Tap { encrypted: net.encrypted }),
        };
        let mut fdb = BTreeSet::new();
        let mut neigh = BTreeMap::new();
        for &(ep, att) in members.get(name).map(Vec::as_slice).unwrap_or_default() {
            if ep.host == local.name {
                continue;
            }
            let Some(dst) = host_ip(&ep.host) else { continue };
            if let Err(e) = check_attachment(att, net) {
                rejected
                    .push(format!("endpoint {:?} in network {}: skipped: {e}", ep.name, net.name));
                continue;
            }
            fdb.insert(Fdb { mac: att.mac, dst });
            fdb.insert(Fdb { mac: ZERO_MAC, dst });
            neigh.insert(att.ip, att.mac);
        }
        let gateway = Ipv4Network::new(net.gateway, net.subnet.prefix()).unwrap_or(net.subnet);
        let nd = NetDesired {
            name: net.name.clone(),
            bridge: bridge_name(net.vni),
            uplink,
            uplink_kind,
            vni: net.vni,
            mtu: net.mtu,
            subnet: net.subnet,
            gateway,
            bridge_mac: bridge_mac(net.vni),
            internal: net.internal,
            fdb,
            neigh,
        };
        if nd.internal {
            out.firewall.internal.push(nd.bridge.clone());
        } else {
            out.firewall.external.push((nd.bridge.clone(), nd.subnet));
            out.host_forwarding = true;
        }
        out.firewall.gateway_macs.insert(nd.bridge_mac);
        out.firewall.gateways.insert((nd.bridge.clone(), nd.gateway.ip()));
        out.networks.insert(net.name.clone(), nd);
    }

    let vias: BTreeSet<&str> = catalog.routes.values().map(|r| r.via.as_str()).collect();
    for ep in local_eps {
        let mut interfaces: Vec<IfaceDesired> = Vec::new();
        for att in &ep.attachments {
            let Some(nd) = out.networks.get(&att.network) else { continue };
            let Some(net) = catalog.networks.get(&att.network) else { continue };
            let duplicate = interfaces.iter().any(|i| i.name == att.interface);
            let checked = check_attachment(att, net).and_then(|()| match duplicate {
                true => Err(ModelError::InvalidInterface(att.interface.clone())),
                false => Ok(()),
            });
            if let Err(e) = checked {
                rejected.push(format!(
                    "endpoint {:?}: attachment to network {} skipped: {e}",
                    ep.name, att.network
                ));
                continue;
            }
            let addr = Ipv4Network::new(att.ip, nd.subnet.prefix()).unwrap_or(nd.subnet);
            interfaces.push(IfaceDesired {
                name: att.interface.clone(),
                host_name: veth_name(&ep.name, &att.interface),
                peer_tmp: peer_name(&ep.name, &att.interface),
                network: nd.name.clone(),
                bridge: nd.bridge.clone(),
                addr,
                mac: att.mac,
                mtu: nd.mtu,
            });
        }
        let routes = endpoint_routes(catalog, &ep.name, &interfaces, &out.networks, &mut rejected);
        out.endpoints.insert(
            ep.name.clone(),
            EndpointDesired {
                name: ep.name.clone(),
                interfaces,
                routes,
                ip_forward: vias.contains(ep.name.as_str()),
                container: None,
            },
        );
    }
    // A route is seen once per local endpoint in its network: report it once.
    let mut seen = BTreeSet::new();
    rejected.retain(|r| seen.insert(r.clone()));
    out.rejected = rejected;
    out
}

/// The routes of endpoint `name` with `interfaces`: the catalog's routes of its networks
/// (not via itself), then a default route via the gateway of its first non-internal
/// network unless a route already covers `0.0.0.0/0` (an egress endpoint). At most one
/// route per destination, the first in interface order, so two networks routing the
/// same destination differently cannot leave a route the kernel refuses (and the plan
/// retrying it forever); and none to a destination inside a subnet the endpoint is
/// attached to, which it reaches directly. A route whose destination or next hop does
/// not check out is left out and listed in `rejected`.
fn endpoint_routes(
    catalog: &Catalog,
    name: &str,
    interfaces: &[IfaceDesired],
    networks: &BTreeMap<String, NetDesired>,
    rejected: &mut Vec<String>,
) -> BTreeSet<RouteSpec> {
    let attached: Vec<Ipv4Network> = interfaces
        .iter()
        .filter_map(|i| Ipv4Network::new(i.addr.network(), i.addr.prefix()).ok())
        .collect();
    let mut by_dest: BTreeMap<Ipv4Network, Ipv4Addr> = BTreeMap::new();
    for iface in interfaces {
        for route in catalog.routes_in(&iface.network) {
            let dest = route.destination;
            if route.via == name || attached.iter().any(|s| dest.is_subnet_of(*s)) {
                continue;
            }
            let Some(via) = catalog.route_via_ip(route) else { continue };
            let Some(subnet) = networks.get(&iface.network).map(|nd| nd.subnet) else { continue };
            match check_route(route, via, subnet) {
                Ok(()) => {
                    by_dest.entry(dest).or_insert(via);
                }
                Err(e) => rejected.push(format!(
                    "route {} in network {} skipped: {e}",
                    route.destination, route.network
                )),
            }
        }
    }
    let gateway = interfaces
        .iter()
        .filter_map(|i| networks.get(&i.network))
        .find(|nd| !nd.internal)
        .map(|nd| nd.gateway.ip());
    if let Some(gw) = gateway {
        by_dest.entry(default_net()).or_insert(gw);
    }
    by_dest.into_iter().map(|(dest, via)| RouteSpec { dest, via }).collect()
}

/// `0.0.0.0/0`.
pub fn default_net() -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).unwrap_or_else(|_| unreachable!())
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use overlay_model::{Attachment, Endpoint, Host, HostStatus, Network, Route};

    pub fn net(name: &str, subnet: &str, vni: u32, internal: bool) -> Network {
        let subnet: Ipv4Network = subnet.parse().unwrap();
        Network {
            name: name.into(),
            subnet,
            gateway: Ipv4Addr::from(u32::from(subnet.network()) + 1),
            vni,
            mtu: 1450,
            encap: Encap::Vxlan,
            encrypted: false,
            internal,
        }
    }

    pub fn ep(name: &str, host: &str, atts: &[(&str, &str, u64)]) -> Endpoint {
        Endpoint {
            name: name.into(),
            host: host.into(),
            attachments: atts
                .iter()
                .enumerate()
                .map(|(i, (n, ip, mac))| Attachment {
                    network: n.to_string(),
                    interface: format!("eth{i}"),
                    ip: ip.parse().unwrap(),
                    mac: Mac::from_counter(*mac),
                    aliases: vec![],
                })
                .collect(),
        }
    }

    pub fn host(name: &str, ip: &str) -> Host {
        Host {
            name: name.into(),
            underlay_ip: ip.parse().unwrap(),
            underlay_mtu: 1500,
            status: HostStatus::Ready,
            status_changed_ms: 0,
            underlay_prefix: 24,
        }
    }

    /// Tutorial-like topology: front (h1: web, h2: api), back (internal; h2: db),
    /// a gateway `gw` on h3 in front and back, routes both ways via gw.
    pub fn catalog() -> Catalog {
        let mut c = Catalog { revision: 7, ..Catalog::default() };
        for h in [host("h1", "192.0.2.1"), host("h2", "192.0.2.2"), host("h3", "192.0.2.3")] {
            c.hosts.insert(h.name.clone(), h);
        }
        for n in [net("front", "10.1.0.0/24", 4096, false), net("back", "10.2.0.0/24", 4097, true)]
        {
            c.networks.insert(n.name.clone(), n);
        }
        for e in [
            ep("web", "h1", &[("front", "10.1.0.2", 1)]),
            ep("api", "h2", &[("front", "10.1.0.3", 2), ("back", "10.2.0.3", 3)]),
            ep("db", "h2", &[("back", "10.2.0.2", 4)]),
            ep("gw", "h3", &[("front", "10.1.0.9", 5), ("back", "10.2.0.9", 6)]),
        ] {
            c.endpoints.insert(e.name.clone(), e);
        }
        for r in [
            Route {
                network: "front".into(),
                destination: "10.9.0.0/16".parse().unwrap(),
                via: "gw".into(),
            },
            Route {
                network: "back".into(),
                destination: "10.8.0.0/16".parse().unwrap(),
                via: "gw".into(),
            },
        ] {
            c.routes.insert(r.key(), r);
        }
        c
    }

    pub fn local(name: &str, ip: &str) -> LocalHost {
        LocalHost { name: name.into(), underlay_ip: ip.parse().unwrap(), can_encrypt: false }
    }

    #[test]
    fn names_fit_the_kernel_limit() {
        let v = veth_name("a-very-long-endpoint-name-that-goes-on-and-on", "eth12");
        assert_eq!(v.len(), 15);
        assert!(v.starts_with("ovv"));
        assert_ne!(v, veth_name("a-very-long-endpoint-name-that-goes-on-and-on", "eth1"));
        assert_eq!(bridge_name(16_777_215), "ovb-16777215");
        assert!(bridge_name(16_777_215).len() <= 15);
    }

    #[test]
    fn host_one_carries_front_only() {
        let d = desired_for_host(&catalog(), &local("h1", "192.0.2.1"));
        assert_eq!(d.networks.keys().collect::<Vec<_>>(), vec!["front"]);
        let front = &d.networks["front"];
        assert_eq!(front.bridge, "ovb-4096");
        assert_eq!(front.uplink, "ovx-4096");
        assert_eq!(front.uplink_kind, Uplink::Vxlan);
        assert_eq!(front.gateway, "10.1.0.1/24".parse().unwrap());
        let h2: Ipv4Addr = "192.0.2.2".parse().unwrap();
        let h3: Ipv4Addr = "192.0.2.3".parse().unwrap();
        let expected: BTreeSet<Fdb> = [
            Fdb { mac: ZERO_MAC, dst: h2 },
            Fdb { mac: ZERO_MAC, dst: h3 },
            Fdb { mac: Mac::from_counter(2), dst: h2 },
            Fdb { mac: Mac::from_counter(5), dst: h3 },
        ]
        .into();
        assert_eq!(front.fdb, expected);
        assert_eq!(front.neigh.len(), 2);
        assert_eq!(front.neigh[&"10.1.0.9".parse().unwrap()], Mac::from_counter(5));

        let web = &d.endpoints["web"];
        assert_eq!(web.interfaces.len(), 1);
        assert_eq!(web.interfaces[0].addr, "10.1.0.2/24".parse().unwrap());
        assert_eq!(web.interfaces[0].mtu, 1450);
        let routes: Vec<_> =
            web.routes.iter().map(|r| (r.dest.to_string(), r.via.to_string())).collect();
        assert_eq!(
            routes,
            vec![
                ("0.0.0.0/0".into(), "10.1.0.1".into()),
                ("10.9.0.0/16".into(), "10.1.0.9".into())
            ]
        );
        assert!(!web.ip_forward);
        assert!(d.host_forwarding);
        assert_eq!(d.firewall.external, vec![("ovb-4096".into(), "10.1.0.0/24".parse().unwrap())]);
        assert!(d.firewall.internal.is_empty());
    }

    #[test]
    fn internal_network_gets_no_default_route_and_gateway_forwards() {
        let d = desired_for_host(&catalog(), &local("h2", "192.0.2.2"));
        let db = &d.endpoints["db"];
        let routes: Vec<_> =
            db.routes.iter().map(|r| (r.dest.to_string(), r.via.to_string())).collect();
        assert_eq!(routes, vec![("10.8.0.0/16".into(), "10.2.0.9".into())]);
        // api: default via front (its first non-internal attachment) only.
        let api = &d.endpoints["api"];
        assert_eq!(
            api.interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["eth0", "eth1"]
        );
        assert_eq!(api.routes.iter().filter(|r| r.dest.prefix() == 0).count(), 1);
        assert_eq!(d.firewall.internal, vec!["ovb-4097".to_string()]);

        let d3 = desired_for_host(&catalog(), &local("h3", "192.0.2.3"));
        let gw = &d3.endpoints["gw"];
        assert!(gw.ip_forward);
        // Routes via itself are skipped.
        assert_eq!(gw.routes.len(), 1);
    }

    #[test]
    fn udp_networks_get_a_tap_uplink_and_the_same_forwarding_facts() {
        let mut c = catalog();
        let front = c.networks.get_mut("front").unwrap();
        front.encap = Encap::Udp;
        let vxlan = desired_for_host(&catalog(), &local("h1", "192.0.2.1"));
        let d = desired_for_host(&c, &local("h1", "192.0.2.1"));
        let nd = &d.networks["front"];
        assert_eq!(nd.uplink, "ovu-4096");
        assert_eq!(nd.uplink_kind, Uplink::Tap { encrypted: false });
        assert_eq!(nd.fdb, vxlan.networks["front"].fdb);
        assert_eq!(nd.neigh, vxlan.networks["front"].neigh);
        assert!(d.unsupported.is_empty());
    }

    #[test]
    fn encrypted_networks_need_a_host_certificate() {
        let mut c = catalog();
        let front = c.networks.get_mut("front").unwrap();
        front.encap = Encap::Udp;
        front.encrypted = true;
        let d = desired_for_host(&c, &local("h1", "192.0.2.1"));
        assert_eq!(d.unsupported, vec!["front".to_string()]);
        assert!(d.networks.is_empty());
        // Its endpoint gets no interface in it rather than a dead one.
        assert!(d.endpoints["web"].interfaces.is_empty());

        let with_cert = LocalHost { can_encrypt: true, ..local("h1", "192.0.2.1") };
        let d = desired_for_host(&c, &with_cert);
        assert_eq!(d.networks["front"].uplink_kind, Uplink::Tap { encrypted: true });
    }

    #[test]
    fn the_firewall_knows_every_host_and_gateway() {
        let d = desired_for_host(&catalog(), &local("h2", "192.0.2.2"));
        let hosts: Vec<String> = d.firewall.hosts.iter().map(ToString::to_string).collect();
        assert_eq!(hosts, ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        assert_eq!(d.firewall.gateway_macs, [bridge_mac(4096), bridge_mac(4097)].into());
        let gateways: Vec<(String, String)> =
            d.firewall.gateways.iter().map(|(b, ip)| (b.clone(), ip.to_string())).collect();
        assert_eq!(
            gateways,
            [("ovb-4096".into(), "10.1.0.1".into()), ("ovb-4097".into(), "10.2.0.1".into())]
        );
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    }

    #[test]
    fn bad_objects_from_the_wire_are_skipped_and_the_rest_proceeds() {
        let mut c = catalog();
        // A namespace name that is a path, a network on loopback, one on this host's
        // underlay, a remote host with a multicast underlay address.
        c.endpoints
            .insert("../../etc".into(), ep("../../etc", "h2", &[("front", "10.1.0.30", 30)]));
        let mut lo = net("lo-net", "127.0.0.0/24", 4100, false);
        lo.gateway = "127.0.0.1".parse().unwrap();
        c.networks.insert(lo.name.clone(), lo);
        c.networks.insert("under".into(), net("under", "192.0.2.0/25", 4101, false));
        let mut bad_mtu = net("jumbo", "10.5.0.0/24", 4102, false);
        bad_mtu.mtu = 65535;
        c.networks.insert(bad_mtu.name.clone(), bad_mtu);
        c.endpoints.insert(
            "multi".into(),
            ep(
                "multi",
                "h2",
                &[
                    ("front", "10.1.0.31", 31),
                    ("lo-net", "127.0.0.5", 32),
                    ("under", "192.0.2.50", 33),
                    ("jumbo", "10.5.0.2", 34),
                ],
            ),
        );
        let mut rogue = host("rogue", "224.0.0.1");
        rogue.underlay_prefix = 0;
        c.hosts.insert("rogue".into(), rogue);
        c.endpoints.insert("far".into(), ep("far", "rogue", &[("front", "10.1.0.40", 40)]));
        // A remote endpoint with a multicast MAC, a local attachment named lo.
        let mut bad_mac = ep("badmac", "h1", &[("front", "10.1.0.41", 41)]);
        bad_mac.attachments[0].mac = Mac([0x01, 0, 0x5e, 0, 0, 1]);
        c.endpoints.insert("badmac".into(), bad_mac);
        let mut lo_if = ep("loif", "h2", &[("front", "10.1.0.42", 42)]);
        lo_if.attachments[0].interface = "lo".into();
        c.endpoints.insert("loif".into(), lo_if);

        let d = desired_for_host(&c, &local("h2", "192.0.2.2"));
        let rejected = d.rejected.join("\n");
        for want in [
            "endpoint \"../../etc\" skipped: invalid name",
            "host \"rogue\" skipped: invalid IP address \"224.0.0.1\"",
            "network \"lo-net\" skipped: subnet 127.0.0.0/24 overlaps the loopback range",
            "network \"under\" skipped: subnet 192.0.2.0/25 overlaps the underlay network 192.0.2.0/24 of host h2",
            "network \"jumbo\" skipped: invalid MTU 65535",
            "endpoint \"badmac\" in network front: skipped: invalid MAC address \"01:00:5e:00:00:01\"",
            "endpoint \"loif\": attachment to network front skipped: invalid interface name \"lo\"",
        ] {
            assert!(rejected.contains(want), "missing {want:?} in:\n{rejected}");
        }
        assert_eq!(d.rejected.len(), 7, "{rejected}");
        // The rest proceeds: front and back as before, multi only in front.
        assert_eq!(d.networks.keys().collect::<Vec<_>>(), ["back", "front"]);
        assert!(!d.endpoints.contains_key("../../etc"));
        let multi: Vec<&str> =
            d.endpoints["multi"].interfaces.iter().map(|i| i.network.as_str()).collect();
        assert_eq!(multi, ["front"]);
        assert!(d.endpoints["loif"].interfaces.is_empty());
        let fdb = &d.networks["front"].fdb;
        assert!(fdb.iter().all(|f| f.dst != "224.0.0.1".parse::<Ipv4Addr>().unwrap()));
        assert!(fdb.iter().all(|f| f.mac != Mac([0x01, 0, 0x5e, 0, 0, 1])));
        assert!(!d.firewall.hosts.contains(&"224.0.0.1".parse().unwrap()));
        assert_eq!(d.networks["front"].neigh.len(), 2, "api's and gw's only");
    }

    #[test]
    fn a_host_without_endpoints_carries_nothing() {
        let d = desired_for_host(&catalog(), &local("h9", "192.0.2.9"));
        assert!(d.networks.is_empty() && d.endpoints.is_empty());
        assert!(!d.host_forwarding);
    }

    fn route(network: &str, dest: &str, via: &str) -> Route {
        Route { network: network.into(), destination: dest.parse().unwrap(), via: via.into() }
    }

    fn routes_of(d: &HostDesired, ep: &str) -> Vec<(String, String)> {
        d.endpoints[ep].routes.iter().map(|r| (r.dest.to_string(), r.via.to_string())).collect()
    }

    #[test]
    fn routes_never_conflict_with_each_other_or_with_attached_subnets() {
        let mut c = catalog();
        // An egress endpoint for front: replaces the gateway as front's default route.
        for r in [
            route("front", "0.0.0.0/0", "gw"),
            // Into back's own subnet, which api is attached to: api reaches it directly.
            route("front", "10.2.0.0/24", "gw"),
            // The same destination from both of api's networks: the first interface's wins.
            route("back", "10.9.0.0/16", "db"),
        ] {
            c.routes.insert(r.key(), r);
        }
        let d = desired_for_host(&c, &local("h2", "192.0.2.2"));
        assert_eq!(
            routes_of(&d, "api"),
            vec![
                ("0.0.0.0/0".into(), "10.1.0.9".into()),
                ("10.8.0.0/16".into(), "10.2.0.9".into()),
                ("10.9.0.0/16".into(), "10.1.0.9".into()),
            ]
        );
        // db (back only) takes back's routes, except the one via itself.
        assert_eq!(routes_of(&d, "db"), vec![("10.8.0.0/16".into(), "10.2.0.9".into())]);
    }

    #[test]
    fn an_endpoint_without_networks_keeps_its_namespace_and_nothing_else() {
        let mut c = catalog();
        c.endpoints.get_mut("db").unwrap().attachments.clear();
        let d = desired_for_host(&c, &local("h2", "192.0.2.2"));
        let db = &d.endpoints["db"];
        assert!(db.interfaces.is_empty() && db.routes.is_empty() && !db.ip_forward);
        // api still carries back.
        assert!(d.networks.contains_key("back"));
    }
}
