//! Every way a command can be refused. Each message is one line, names the bad value,
//! and is what `overlayctl` prints after `error: `.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModelError {
    #[error("invalid name {0:?}: names are 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'")]
    InvalidName(String),
    #[error("invalid CIDR {0:?}: expected an IPv4 network such as 10.0.1.0/24")]
    InvalidCidr(String),
    #[error("invalid IP address {0:?}: expected an IPv4 address such as 10.0.1.5")]
    InvalidIp(String),
    #[error(
        "subnet {subnet} is too small: at least a /30 is needed for a gateway and an endpoint"
    )]
    SubnetTooSmall { subnet: Ipv4Network },
    #[error("subnet {subnet} overlaps {what} ({range}): overlay networks need private unicast addresses, such as 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16")]
    ReservedSubnet { subnet: Ipv4Network, what: &'static str, range: Ipv4Network },
    #[error("subnet {subnet} overlaps the underlay network {underlay} of host {host}")]
    SubnetOverlapsUnderlay { subnet: Ipv4Network, host: String, underlay: Ipv4Network },
    #[error("subnet {subnet} overlaps network {other} ({other_subnet})")]
    SubnetOverlap { subnet: Ipv4Network, other: String, other_subnet: Ipv4Network },
    #[error("gateway {gateway} is not a usable address in subnet {subnet}")]
    GatewayOutsideSubnet { gateway: Ipv4Addr, subnet: Ipv4Network },
    #[error("IP {ip} is not a usable address in network {network} ({subnet})")]
    IpOutsideSubnet { ip: Ipv4Addr, network: String, subnet: Ipv4Network },
    #[error("IP {ip} is already in use in network {network}")]
    IpInUse { ip: Ipv4Addr, network: String },
    #[error("network {network} ({subnet}) has no free addresses left")]
    SubnetExhausted { network: String, subnet: Ipv4Network },
    #[error("invalid MTU {0}: must be between 576 and 9000")]
    InvalidMtu(u32),
    #[error("invalid VNI {0}: must be between 1 and 16777215")]
    InvalidVni(u32),
    #[error("VNI {vni} is already used by network {network}")]
    VniInUse { vni: u32, network: String },
    #[error("no free VNI left")]
    VniExhausted,
    #[error("invalid encapsulation {0:?}: expected vxlan or udp")]
    InvalidEncap(String),
    #[error("--encrypted needs --encap udp")]
    EncryptedNeedsUdp,
    #[error("network {0} already exists")]
    NetworkExists(String),
    #[error("network {0} not found")]
    NetworkNotFound(String),
    #[error("network {network} still has endpoints attached: {endpoints}")]
    NetworkInUse { network: String, endpoints: String },
    #[error("endpoint {0} already exists")]
    EndpointExists(String),
    #[error("endpoint {0} not found")]
    EndpointNotFound(String),
    #[error("endpoint {endpoint} is already attached to network {network}")]
    AlreadyAttached { endpoint: String, network: String },
    #[error("endpoint {endpoint} is not attached to network {network}")]
    NotAttached { endpoint: String, network: String },
    #[error("duplicate alias {0}")]
    DuplicateAlias(String),
    #[error("host {0} is not registered (see overlayctl host ls)")]
    HostNotFound(String),
    #[error("host {host} still has endpoints: {endpoints}")]
    HostInUse { host: String, endpoints: String },
    #[error("underlay IP {ip} is already used by host {host}")]
    UnderlayIpInUse { ip: Ipv4Addr, host: String },
    #[error("route destination {destination} is network {network}'s own subnet")]
    RouteToOwnSubnet { destination: Ipv4Network, network: String },
    #[error("route {destination} already exists in network {network}")]
    RouteExists { destination: Ipv4Network, network: String },
    #[error("route {destination} not found in network {network}")]
    RouteNotFound { destination: Ipv4Network, network: String },
    #[error("--via endpoint {endpoint} is not attached to network {network}")]
    ViaNotAttached { endpoint: String, network: String },
    #[error(
        "invalid interface name {0:?}: 1-15 characters of a-z, A-Z, 0-9, '-', '_' and '.', not lo"
    )]
    InvalidInterface(String),
    #[error("invalid MAC address {0:?}")]
    InvalidMac(String),
    #[error("invalid host status {0:?}: expected ready or down")]
    InvalidHostStatus(String),
    #[error("invalid duration {0:?}: expected a number with s, m, h or d (e.g. 90s, 30d)")]
    InvalidDuration(String),
    #[error("invalid cluster id {0:?}: expected 32 hex digits")]
    InvalidClusterId(String),
    // --- Containers (CNI, issue 12) ---
    #[error("endpoint {endpoint} already has interface {interface} (in network {network})")]
    InterfaceInUse { endpoint: String, interface: String, network: String },
    #[error("endpoint {endpoint} is on host {host}, not on host {asked}")]
    EndpointOnOtherHost { endpoint: String, host: String, asked: String },
    // --- Endpoint status (issue 15) ---
    #[error("invalid endpoint status {0:?}: expected pending, ready or failed")]
    InvalidEndpointState(String),
}

impl ModelError {
    /// The broad class of the error, so the API layer can pick a status code.
    pub fn kind(&self) -> ErrorKind {
        use ModelError::*;
        match self {
            NetworkNotFound(_) | EndpointNotFound(_) | HostNotFound(_) | RouteNotFound { .. } => {
                ErrorKind::NotFound
            }
            NetworkExists(_) | EndpointExists(_) | RouteExists { .. } => ErrorKind::AlreadyExists,
            EndpointOnOtherHost { .. } => ErrorKind::PermissionDenied,
            NetworkInUse { .. } | HostInUse { .. } | SubnetExhausted { .. } | VniExhausted => {
                ErrorKind::FailedPrecondition
            }
            _ => ErrorKind::InvalidArgument,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    /// The command is valid but names an object the caller may not change (a guarded
    /// command whose endpoint is on another host).
    PermissionDenied,
}
