//! The one small wrapper around rtnetlink: dumps into plain data, and idempotent
//! mutations ("already exists" on add and "not found" on delete count as success).
//!
//! An [`Nl`] talks to one network namespace: [`Nl::current`] to the agent's own,
//! [`Nl::in_netns`] to an endpoint's (its socket is opened on a short-lived thread
//! inside the namespace, so no long-lived thread changes namespace). Dropping an `Nl`
//! closes the socket, which matters: an open socket keeps its namespace alive.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{FromRawFd, RawFd};

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType,
    LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use overlay_model::Mac;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::desired::{Fdb, RouteSpec, VXLAN_PORT};
use crate::observed::{LinkKind, VxlanObs};

/// One device as the kernel reports it.
#[derive(Debug, Clone)]
pub struct RawLink {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub master: Option<u32>,
    pub up: bool,
    /// `IFLA_IFALIAS`, if set.
    pub alias: Option<String>,
}

/// A netlink connection to one namespace.
pub struct Nl {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Nl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The negative errno of a netlink error, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Treats `codes` as success.
fn ok_if(
    r: std::result::Result<(), rtnetlink::Error>,
    codes: &[i32],
) -> std::result::Result<(), rtnetlink::Error> {
    match r {
        Err(e) if errno(&e).is_some_and(|c| codes.contains(&c)) => Ok(()),
        other => other,
    }
}

/// A new NETLINK_ROUTE socket in the calling thread's namespace.
fn netlink_socket() -> io::Result<RawFd> {
    // SAFETY: plain socket(2) call; the returned fd is owned by the caller.
    let fd = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// NUD_PERMANENT is set (FDB entries also carry NUD_NOARP).
fn permanent(state: NeighbourState) -> bool {
    u16::from(state) & 0x80 != 0
}

fn mac_of(bytes: &[u8]) -> Option<Mac> {
    <[u8; 6]>::try_from(bytes).ok().map(Mac)
}

impl Nl {
    fn from_fd(fd: RawFd) -> io::Result<Nl> {
        // SAFETY: `fd` is a freshly opened netlink socket that nothing else owns.
        let socket = unsafe { netlink_sys::TokioSocket::from_raw_fd(fd) };
        let (conn, handle, _) = rtnetlink::from_socket(socket);
        let task = tokio::spawn(conn);
        Ok(Nl { handle, task })
    }

    /// The agent's own namespace (the host's).
    pub fn current() -> io::Result<Nl> {
        Nl::from_fd(netlink_socket()?)
    }

    /// Namespace `/var/run/netns/NAME`. Must be called inside a tokio runtime.
    pub fn in_netns(name: &str) -> io::Result<Nl> {
        let fd = crate::netns::run_in(name, netlink_socket)?;
        Nl::from_fd(fd)
    }

    /// Like [`Nl::in_netns`], also running `f` on the same short-lived thread inside
    /// the namespace (one thread instead of two, on every pass, for every namespace).
    pub fn in_netns_with<T: Send + 'static>(
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<(Nl, T)> {
        let (fd, t) = crate::netns::run_in(name, move || Ok((netlink_socket()?, f())))?;
        Ok((Nl::from_fd(fd)?, t))
    }

    pub async fn links(&self) -> Result<Vec<RawLink>> {
        let msgs: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.context("dumping links")?;
        Ok(msgs.into_iter().map(raw_link).collect())
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let r: std::result::Result<Vec<LinkMessage>, _> =
            self.handle.link().get().match_name(name.to_string()).execute().try_collect().await;
        match r {
            Ok(v) => Ok(v.first().map(|m| m.header.index)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up {name}")),
        }
    }

    /// Index of device `name`; an error if there is none.
    pub async fn index(&self, name: &str) -> Result<u32> {
        self.link_index(name).await?.ok_or_else(|| anyhow!("device {name} does not exist"))
    }

    /// IPv4 addresses by link index.
    pub async fn addrs(&self) -> Result<Vec<(u32, Ipv4Network)>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .context("dumping addresses")?;
        let mut out = Vec::new();
        for m in msgs {
            let mut ip = None;
            for a in &m.attributes {
                match a {
                    AddressAttribute::Local(IpAddr::V4(v)) => ip = Some(*v),
                    AddressAttribute::Address(IpAddr::V4(v)) if ip.is_none() => ip = Some(*v),
                    _ => {}
                }
            }
            if let Some(ip) = ip {
                if let Ok(net) = Ipv4Network::new(ip, m.header.prefix_len) {
                    out.push((m.header.index, net));
                }
            }
        }
        Ok(out)
    }

    async fn neighbours(&self, family: AddressFamily) -> Result<Vec<NeighbourMessage>> {
        let mut req = self.handle.neighbours().get();
        req.message_mut().header.family = family;
        req.execute().try_collect().await.context("dumping neighbours")
    }

    /// Permanent `self` FDB entries that have a remote (what `bridge fdb append … dst`
    /// makes), by link index.
    pub async fn fdb(&self) -> Result<Vec<(u32, Fdb)>> {
        let msgs = self.neighbours(AddressFamily::Bridge).await?;
        Ok(msgs.iter().filter(|m| kept_fdb(m)).filter_map(fdb_of).collect())
    }

    /// Permanent IPv4 neighbours, by link index.
    pub async fn neighs(&self) -> Result<Vec<(u32, Ipv4Addr, Mac)>> {
        let msgs = self.neighbours(AddressFamily::Inet).await?;
        Ok(msgs
            .iter()
            .filter(|m| kept_neigh(m))
            .filter_map(neigh_of)
            .filter_map(|(index, ip, mac)| Some((index, ip, mac?)))
            .collect())
    }

    /// Main-table IPv4 routes that have a gateway.
    pub async fn gateway_routes(&self) -> Result<Vec<RouteSpec>> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> =
            self.handle.route().get(msg).execute().try_collect().await.context("dumping routes")?;
        let mut out = Vec::new();
        for m in msgs {
            let mut table = u32::from(m.header.table);
            let mut dest = Ipv4Addr::UNSPECIFIED;
            let mut via = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dest = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
                    _ => {}
                }
            }
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
                continue;
            }
            if let (Some(via), Ok(dest)) =
                (via, Ipv4Network::new(dest, m.header.destination_prefix_length))
            {
                out.push(RouteSpec { dest, via });
            }
        }
        Ok(out)
    }

    pub async fn create_bridge(&self, name: &str, mtu: u32, mac: Mac) -> Result<()> {
        // Our bridges never ask br_netfilter for their frames. (The kernel ORs these
        // with the namespace-wide net.bridge.bridge-nf-call-* sysctls, so where those are
        // on the firewall's notrack rules keep bridged frames cheap; see `firewall`.)
        let no_netfilter = InfoData::Bridge(vec![
            InfoBridge::NfCallIpTables(0),
            InfoBridge::NfCallIp6Tables(0),
            InfoBridge::NfCallArpTables(0),
        ]);
        let msg = LinkBridge::new(name)
            .mtu(mtu)
            .address(mac.0.to_vec())
            .set_info_data(no_netfilter)
            .up()
            .build();
        let r = self.handle.link().add(msg).execute().await;
        ok_if(r, &[libc::EEXIST]).with_context(|| format!("creating bridge {name}"))
    }

    pub async fn create_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: Ipv4Addr,
        mtu: u32,
        bridge: &str,
    ) -> Result<()> {
        let master = self.index(bridge).await?;
        let msg = LinkVxlan::new(name, vni)
            .local(local)
            .port(VXLAN_PORT)
            .learning(false)
            .proxy(true)
            .mtu(mtu)
            .controller(master)
            .up()
            .build();
        let r = self.handle.link().add(msg).execute().await;
        ok_if(r, &[libc::EEXIST]).with_context(|| format!("creating vxlan {name}"))
    }

    /// Creates a veth pair `name` <-> `peer` in this namespace.
    pub async fn create_veth(&self, name: &str, peer: &str, mtu: u32) -> Result<()> {
        let msg = LinkVeth::new(name, peer).mtu(mtu).build();
        self.handle.link().add(msg).execute().await.with_context(|| format!("creating veth {name}"))
    }

    async fn set(
        &self,
        name: &str,
        f: impl FnOnce(
            rtnetlink::LinkMessageBuilder<LinkUnspec>,
        ) -> rtnetlink::LinkMessageBuilder<LinkUnspec>,
    ) -> Result<()> {
        let index = self.index(name).await?;
        let msg = f(LinkUnspec::new_with_index(index)).build();
        self.handle.link().set(msg).execute().await.with_context(|| format!("changing {name}"))
    }

    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<()> {
        self.set(name, |b| b.mtu(mtu)).await
    }

    pub async fn set_mac(&self, name: &str, mac: Mac) -> Result<()> {
        self.set(name, |b| b.address(mac.0.to_vec())).await
    }

    pub async fn set_up(&self, name: &str) -> Result<()> {
        self.set(name, |b| b.up()).await
    }

    /// Sets the device's alias (`ip link set NAME alias ALIAS`): how the agent marks
    /// the devices it owns.
    pub async fn set_alias(&self, name: &str, alias: &str) -> Result<()> {
        let alias = alias.to_string();
        self.set(name, |b| b.append_extra_attribute(LinkAttribute::IfAlias(alias))).await
    }

    pub async fn set_master(&self, name: &str, master: &str) -> Result<()> {
        let m = self.index(master).await?;
        self.set(name, |b| b.controller(m)).await
    }

    pub async fn set_name(&self, name: &str, new: &str) -> Result<()> {
        let new = new.to_string();
        self.set(name, |b| b.name(new)).await
    }

    /// Moves `name` into the namespace open at `fd`.
    pub async fn move_to_netns(&self, name: &str, fd: RawFd) -> Result<()> {
        self.set(name, |b| b.setns_by_fd(fd)).await
    }

    pub async fn delete_link(&self, name: &str) -> Result<()> {
        let Some(index) = self.link_index(name).await? else { return Ok(()) };
        let mut links = self.handle.link();
        let r = links.del(index).execute().await;
        ok_if(r, &[libc::ENODEV]).with_context(|| format!("deleting {name}"))
    }

    pub async fn add_addr(&self, dev: &str, addr: Ipv4Network) -> Result<()> {
        let index = self.index(dev).await?;
        let r =
            self.handle.address().add(index, IpAddr::V4(addr.ip()), addr.prefix()).execute().await;
        ok_if(r, &[libc::EEXIST]).with_context(|| format!("adding {addr} to {dev}"))
    }

    pub async fn del_addr(&self, dev: &str, addr: Ipv4Network) -> Result<()> {
        let index = self.index(dev).await?;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await?;
        for m in msgs {
            let matches = m.header.prefix_len == addr.prefix()
                && m.attributes.iter().any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(v)) | AddressAttribute::Address(IpAddr::V4(v)) if *v == addr.ip()));
            if matches {
                let r = self.handle.address().del(m).execute().await;
                ok_if(r, &[libc::EADDRNOTAVAIL])
                    .with_context(|| format!("deleting {addr} from {dev}"))?;
            }
        }
        Ok(())
    }

    async fn neigh_request(
        &self,
        msg: NeighbourMessage,
        add: bool,
        flags: u16,
    ) -> std::result::Result<(), rtnetlink::Error> {
        let payload = if add {
            RouteNetlinkMessage::NewNeighbour(msg)
        } else {
            RouteNetlinkMessage::DelNeighbour(msg)
        };
        let mut req = NetlinkMessage::from(payload);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut h = self.handle.clone();
        let mut resp = h.request(req)?;
        while let Some(m) = futures::StreamExt::next(&mut resp).await {
            if let NetlinkPayload::Error(e) = m.payload {
                if e.code.is_some() {
                    return Err(rtnetlink::Error::NetlinkError(e));
                }
            }
        }
        Ok(())
    }

    fn fdb_message(index: u32, entry: &Fdb) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Own;
        m.attributes.push(NeighbourAttribute::LinkLocalAddress(entry.mac.0.to_vec()));
        m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(entry.dst)));
        m
    }

    /// `bridge fdb append MAC dev DEV dst IP self permanent`, `index` being DEV's (see
    /// [`Nl::index`]; `dev` only names it in errors).
    pub async fn add_fdb(&self, index: u32, dev: &str, entry: &Fdb) -> Result<()> {
        let r = self
            .neigh_request(Self::fdb_message(index, entry), true, NLM_F_CREATE | NLM_F_APPEND)
            .await;
        ok_if(r, &[libc::EEXIST])
            .with_context(|| format!("adding fdb {} dst {} on {dev}", entry.mac, entry.dst))
    }

    pub async fn del_fdb(&self, index: u32, dev: &str, entry: &Fdb) -> Result<()> {
        let r = self.neigh_request(Self::fdb_message(index, entry), false, 0).await;
        ok_if(r, &[libc::ENOENT])
            .with_context(|| format!("deleting fdb {} dst {} on {dev}", entry.mac, entry.dst))
    }

    fn neigh_message(index: u32, ip: Ipv4Addr, mac: Mac) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        m.attributes.push(NeighbourAttribute::LinkLocalAddress(mac.0.to_vec()));
        m
    }

    /// `ip neigh replace IP lladdr MAC dev DEV nud permanent`, `index` being DEV's.
    pub async fn add_neigh(&self, index: u32, dev: &str, ip: Ipv4Addr, mac: Mac) -> Result<()> {
        self.neigh_request(Self::neigh_message(index, ip, mac), true, NLM_F_CREATE | NLM_F_REPLACE)
            .await
            .with_context(|| format!("adding neighbour {ip} lladdr {mac} on {dev}"))
    }

    pub async fn del_neigh(&self, index: u32, dev: &str, ip: Ipv4Addr, mac: Mac) -> Result<()> {
        let r = self.neigh_request(Self::neigh_message(index, ip, mac), false, 0).await;
        ok_if(r, &[libc::ENOENT]).with_context(|| format!("deleting neighbour {ip} on {dev}"))
    }

    fn route_message(route: &RouteSpec) -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.dest.network(), route.dest.prefix())
            .gateway(route.via)
            .build()
    }

    /// Adds `route`. "Exists" is an error here, not success: the plan only adds a route
    /// it did not observe, so the one in the way is a different route to the same
    /// destination (one without a gateway, or made by hand), which the agent leaves alone.
    pub async fn add_route(&self, route: &RouteSpec) -> Result<()> {
        let r = self.handle.route().add(Self::route_message(route)).execute().await;
        if r.as_ref().err().and_then(errno) == Some(libc::EEXIST) {
            bail!(
                "a different route to {} is in the way of {} via {}",
                route.dest,
                route.dest,
                route.via
            );
        }
        r.with_context(|| format!("adding route {} via {}", route.dest, route.via))
    }

    pub async fn del_route(&self, route: &RouteSpec) -> Result<()> {
        // Match any protocol/scope/type, as `ip route del` does, so routes added by hand
        // (proto boot) are deleted too.
        let mut msg = Self::route_message(route);
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        msg.header.kind = RouteType::Unspec;
        let r = self.handle.route().del(msg).execute().await;
        ok_if(r, &[libc::ESRCH])
            .with_context(|| format!("deleting route {} via {}", route.dest, route.via))
    }
}

/// The device index and entry of a bridge-family neighbour message that has a MAC and
/// an IPv4 remote (a vxlan FDB entry), whatever its flags.
pub fn fdb_of(m: &NeighbourMessage) -> Option<(u32, Fdb)> {
    if m.header.family != AddressFamily::Bridge {
        return None;
    }
    let mut mac = None;
    let mut dst = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLocalAddress(b) => mac = mac_of(b),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
            // Bridge-family entries carry the remote as raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
            }
            _ => {}
        }
    }
    Some((m.header.ifindex, Fdb { mac: mac?, dst: dst? }))
}

/// An FDB entry the agent keeps: the device's own (`self`) and permanent.
pub fn kept_fdb(m: &NeighbourMessage) -> bool {
    m.header.flags.contains(NeighbourFlags::Own) && permanent(m.header.state)
}

/// The device index, IPv4 address and MAC (if it has one) of an IPv4 neighbour message.
pub fn neigh_of(m: &NeighbourMessage) -> Option<(u32, Ipv4Addr, Option<Mac>)> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let mut mac = None;
    let mut ip = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLocalAddress(b) => mac = mac_of(b),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
            _ => {}
        }
    }
    Some((m.header.ifindex, ip?, mac))
}

/// A neighbour the agent keeps: permanent.
pub fn kept_neigh(m: &NeighbourMessage) -> bool {
    permanent(m.header.state)
}

fn raw_link(m: LinkMessage) -> RawLink {
    let mut name = String::new();
    let mut mtu = 0;
    let mut mac = None;
    let mut master = None;
    let mut alias = None;
    let mut kind = None;
    let mut vx = VxlanObs { vni: 0, local: None, port: 0, learning: true, proxy: false };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Mtu(v) => mtu = *v,
            LinkAttribute::Address(b) => mac = mac_of(b),
            LinkAttribute::Controller(i) => master = Some(*i),
            LinkAttribute::IfAlias(a) => alias = Some(a.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => vx.vni = *id,
                                    InfoVxlan::Local(ip) => vx.local = Some(*ip),
                                    InfoVxlan::Port(p) => vx.port = *p,
                                    InfoVxlan::Learning(l) => vx.learning = *l,
                                    InfoVxlan::Proxy(p) => vx.proxy = *p,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let kind = match kind {
        Some(InfoKind::Bridge) => LinkKind::Bridge,
        Some(InfoKind::Vxlan) => LinkKind::Vxlan(vx),
        Some(InfoKind::Veth) => LinkKind::Veth,
        Some(InfoKind::Tun) => LinkKind::Tun,
        _ if m.header.link_layer_type == LinkLayerType::Loopback => LinkKind::Loopback,
        Some(other) => LinkKind::Other(format!("{other:?}").to_lowercase()),
        None => LinkKind::Other(String::new()),
    };
    RawLink {
        index: m.header.index,
        name,
        kind,
        mtu,
        mac,
        master,
        up: m.header.flags.contains(LinkFlags::Up),
        alias,
    }
}
