//! What the kernel has now, restricted to objects the agent owns (plain data).
//!
//! [`crate::observe`] fills it from netlink; [`crate::plan`] compares it with
//! [`crate::desired::HostDesired`]. Only devices whose names carry our prefixes
//! (`ovb-`, `ovx-`, `ovu-`, `ovv`, `ovp`) and namespaces the agent recorded as created by it
//! appear here. Which of those devices are really ours is told by their alias
//! ([`OWNED_ALIAS`], set when the agent creates or adopts one), not by the name alone,
//! so a user's device that merely starts with `ov` is never planned away.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_model::Mac;

use crate::desired::{Fdb, RouteSpec};

/// The alias (`IFLA_IFALIAS`, `ip link show` prints it) of every host device the agent
/// created or adopted: what makes a device ours.
pub const OWNED_ALIAS: &str = "overlay-agent";

/// The vxlan attributes the plan cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanObs {
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    pub port: u16,
    pub learning: bool,
    pub proxy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Vxlan(VxlanObs),
    /// A TUN/TAP device (the UDP data plane's uplink).
    Tun,
    Veth,
    Loopback,
    Other(String),
}

/// One network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkObs {
    pub kind: LinkKind,
    pub mtu: u32,
    pub mac: Option<Mac>,
    /// Name of the bridge it is plugged into.
    pub master: Option<String>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Carries [`OWNED_ALIAS`] (always true inside an endpoint namespace of ours).
    pub owned: bool,
    /// Its alias (`IFLA_IFALIAS`): on an endpoint's `lo`, the namespace's mark (see
    /// [`crate::marks`]).
    pub alias: Option<String>,
    pub addrs: BTreeSet<Ipv4Network>,
    /// vxlan only: permanent `self` FDB entries with a remote.
    pub fdb: BTreeSet<Fdb>,
    /// vxlan only: permanent IPv4 neighbours.
    pub neigh: BTreeMap<Ipv4Addr, Mac>,
}

impl LinkObs {
    /// A device as freshly created with these attributes (for simulating apply).
    pub fn new(kind: LinkKind, mtu: u32) -> LinkObs {
        LinkObs {
            kind,
            mtu,
            mac: None,
            master: None,
            up: false,
            owned: true,
            alias: None,
            addrs: BTreeSet::new(),
            fdb: BTreeSet::new(),
            neigh: BTreeMap::new(),
        }
    }
}

/// One endpoint namespace the agent created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsObs {
    pub links: BTreeMap<String, LinkObs>,
    /// Main-table routes that have a gateway.
    pub routes: BTreeSet<RouteSpec>,
    pub ip_forward: bool,
    /// The settings of [`crate::plan::ENDPOINT_SYSCTLS`] as read (`/proc/sys/` paths
    /// relative, value trimmed); an unreadable one is absent.
    pub sysctls: BTreeMap<String, String>,
    /// Content of `/etc/netns/NAME/resolv.conf`, if any.
    pub resolv_conf: Option<String>,
}

/// An installed table of ours (`inet overlay`, `netdev overlay`), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallObs {
    /// The table's comment: the digest of the ruleset that was installed.
    pub digest: String,
    /// Rules currently in the table (catches rules deleted by hand).
    pub rules: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedHost {
    /// Owned devices in the host namespace, by name.
    pub links: BTreeMap<String, LinkObs>,
    /// Namespaces the agent recorded as its own: `None` if recorded but gone.
    pub namespaces: BTreeMap<String, Option<NsObs>>,
    /// Namespaces that exist but are not ours: never touched.
    pub foreign: BTreeSet<String>,
    /// Namespaces of ours that could not be read this pass, with the reason: left as
    /// they are (neither repaired nor removed) while the other endpoints go on.
    pub unreadable: BTreeMap<String, String>,
    /// For TAP uplinks (by device name): the remote neighbours the user-space data plane
    /// was given on the previous pass, so new ones can be announced. Absent when not
    /// known (the agent just started).
    pub tap_neigh: BTreeMap<String, BTreeMap<Ipv4Addr, Mac>>,
    pub host_forwarding: bool,
    pub firewall: Option<FirewallObs>,
    /// The bridge shortcut's table (see `shortcut`).
    pub shortcut: Option<FirewallObs>,
}
