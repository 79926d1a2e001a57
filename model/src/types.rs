//! The objects of the desired state. Plain data: every field is a fact users set or the
//! controller decided; nothing here is derived from the kernel.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Bytes that an encapsulation adds around an inner Ethernet frame on an IPv4 underlay:
/// outer IPv4 (20) + UDP (8) + 8-byte overlay header + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// `--encap udp`: the same 8-byte header as VXLAN (flags, VNI), so the same overhead.
pub const UDP_OVERHEAD: u32 = 50;
/// `--encap udp --encrypted`: UDP + QUIC short header, datagram frame and AEAD tag.
pub const ENCRYPTED_OVERHEAD: u32 = 100;
/// Underlay MTU assumed when no host has reported one yet.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// Automatically chosen VNIs start here, leaving 1–4095 to users who pick their own
/// (e.g. to match VLAN numbers on an existing fabric).
pub const FIRST_AUTO_VNI: u32 = 4096;
/// VNIs are 24 bits on the wire.
pub const MAX_VNI: u32 = 16_777_215;
/// The smallest network MTU accepted: IPv4's minimum reassembly size.
pub const MIN_MTU: u32 = 576;
/// The largest network MTU accepted: common jumbo-frame size.
pub const MAX_MTU: u32 = 9000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Encap {
    Vxlan,
    Udp,
}

impl Encap {
    /// Bytes the encapsulation costs; the network MTU is the underlay MTU minus this.
    pub fn overhead(self, encrypted: bool) -> u32 {
        match (self, encrypted) {
            (Encap::Vxlan, _) => VXLAN_OVERHEAD,
            (Encap::Udp, false) => UDP_OVERHEAD,
            (Encap::Udp, true) => ENCRYPTED_OVERHEAD,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Encap::Vxlan => "vxlan",
            Encap::Udp => "udp",
        }
    }
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Encap {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vxlan" => Ok(Encap::Vxlan),
            "udp" => Ok(Encap::Udp),
            _ => Err(ModelError::InvalidEncap(s.to_string())),
        }
    }
}

/// A MAC address. The controller assigns locally administered unicast addresses
/// (first octet 0x02) from a counter, so no two attachments ever share one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The `n`th controller-assigned MAC: 02:xx:xx:xx:xx:xx with the low 40 bits of `n`.
    pub fn from_counter(n: u64) -> Mac {
        let b = n.to_be_bytes();
        Mac([0x02, b[3], b[4], b[5], b[6], b[7]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ModelError::InvalidMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    pub mtu: u32,
    pub encap: Encap,
    pub encrypted: bool,
    pub internal: bool,
}

/// One network interface of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: String,
    /// `eth0`, `eth1`, …: the lowest index free in this endpoint when attached.
    pub interface: String,
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub aliases: Vec<String>,
}

/// A network namespace on one host, attached to one or more networks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub name: String,
    pub host: String,
    pub attachments: Vec<Attachment>,
}

impl Endpoint {
    pub fn attachment(&self, network: &str) -> Option<&Attachment> {
        self.attachments.iter().find(|a| a.network == network)
    }
}

/// Routes are keyed by (network, destination).
pub type RouteKey = (String, Ipv4Network);

/// `DEST via <via's address in network>` in every endpoint of `network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub network: String,
    pub destination: Ipv4Network,
    pub via: String,
}

impl Route {
    pub fn key(&self) -> RouteKey {
        (self.network.clone(), self.destination)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HostStatus {
    Ready,
    Down,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Ready => "ready",
            HostStatus::Down => "down",
        }
    }
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HostStatus {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ready" => Ok(HostStatus::Ready),
            "down" => Ok(HostStatus::Down),
            _ => Err(ModelError::InvalidHostStatus(s.to_string())),
        }
    }
}

/// A machine running `overlay-agent`. Only status *changes* go through raft; the
/// leader keeps per-heartbeat `last_seen` in memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    /// MTU of the host's route to its peers, as the agent detected it.
    pub underlay_mtu: u32,
    pub status: HostStatus,
    /// Unix milliseconds of the last registration or status change (leader's clock).
    pub status_changed_ms: u64,
    /// Prefix length of the underlay network `underlay_ip` sits in, as the agent
    /// reported it; 0 when unknown (a host added by hand, or registered by an older
    /// agent). No overlay subnet may overlap that network (see
    /// [`Host::underlay_network`]). Absent in older `desired.json` files: 0.
    #[serde(default)]
    pub underlay_prefix: u8,
}

impl Host {
    /// The underlay network of this host: `underlay_ip` with its reported prefix, or the
    /// address alone (/32) when the prefix is unknown.
    pub fn underlay_network(&self) -> Ipv4Network {
        let prefix =
            if (1..=32).contains(&self.underlay_prefix) { self.underlay_prefix } else { 32 };
        Ipv4Network::new(self.underlay_ip, prefix)
            .map(|n| Ipv4Network::new(n.network(), prefix).unwrap_or(n))
            .unwrap_or_else(|_| Ipv4Network::from(self.underlay_ip))
    }
}
