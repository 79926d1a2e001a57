//! What clients ask the cluster to do. A `Command` is what goes into the raft log, so it
//! carries everything `apply` needs (including the leader's clock where time matters):
//! applying the same commands in the same order gives the same state on every member.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::status::ReportedStatus;
use crate::types::{Encap, HostStatus};

/// `network create`: everything not given is chosen by `apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Ipv4Network,
    /// Default: the first usable address of the subnet.
    pub gateway: Option<Ipv4Addr>,
    /// Default: the lowest VNI not in use, from `FIRST_AUTO_VNI` up.
    pub vni: Option<u32>,
    /// Default: the lowest registered host underlay MTU (1500 with no hosts) minus the
    /// encapsulation overhead.
    pub mtu: Option<u32>,
    pub encap: Encap,
    pub encrypted: bool,
    pub internal: bool,
}

impl NetworkSpec {
    /// `network create NAME --subnet SUBNET` with every other setting left to `apply`.
    pub fn with_defaults(name: &str, subnet: Ipv4Network) -> NetworkSpec {
        NetworkSpec {
            name: name.into(),
            subnet,
            gateway: None,
            vni: None,
            mtu: None,
            encap: Encap::Vxlan,
            encrypted: false,
            internal: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateNetwork(NetworkSpec),
    RemoveNetwork {
        name: String,
    },
    CreateEndpoint {
        name: String,
        host: String,
        network: String,
        ip: Option<Ipv4Addr>,
        aliases: Vec<String>,
    },
    RemoveEndpoint {
        name: String,
    },
    Connect {
        network: String,
        endpoint: String,
        ip: Option<Ipv4Addr>,
        aliases: Vec<String>,
    },
    Disconnect {
        network: String,
        endpoint: String,
    },
    AddRoute {
        network: String,
        destination: Ipv4Network,
        via: String,
    },
    RemoveRoute {
        network: String,
        destination: Ipv4Network,
    },
    /// [`Command::RegisterHost`] as raft logs written before `underlay_prefix` existed
    /// hold it (postcard identifies variants by position, so this one keeps its place
    /// and the new form went to the end). Applied as a registration with an unknown
    /// prefix; nothing proposes it any more.
    RegisterHostV1 {
        name: String,
        underlay_ip: Ipv4Addr,
        underlay_mtu: u32,
        now_ms: u64,
    },
    RemoveHost {
        name: String,
    },
    /// Written by the leader's liveness monitor on a status transition only.
    SetHostStatus {
        name: String,
        status: HostStatus,
        now_ms: u64,
    },
    /// Names the cluster, once: proposed by the first leader of a cluster that has no
    /// id yet; a second one is ignored. Agents refuse state from another cluster's id.
    InitCluster {
        cluster_id: String,
    },
    /// A new join token: only its SHA-256 is kept, with the nonce a controller holding
    /// the CA key derives the token from again (see overlay-pki's `token`).
    SetJoinToken {
        nonce: [u8; 16],
        hash: [u8; 32],
    },
    /// An agent (re)registering its host; marks it ready. `underlay_prefix` is the
    /// prefix length of its underlay network (0: unknown).
    RegisterHost {
        name: String,
        underlay_ip: Ipv4Addr,
        underlay_prefix: u8,
        underlay_mtu: u32,
        now_ms: u64,
    },

    // --- Containers (CNI, issue 12). Appended after every older variant: postcard names
    // a variant by its position, so raft logs written before these decode unchanged. An
    // agent attaches the containers of its own host with them (see `state::containers`).
    /// [`Command::CreateEndpoint`] with the interface name a container runtime asked for
    /// (`CNI_IFNAME`) instead of `eth0`.
    CreateEndpointAs {
        name: String,
        host: String,
        network: String,
        ip: Option<Ipv4Addr>,
        aliases: Vec<String>,
        interface: String,
    },
    /// [`Command::Connect`] with a chosen interface name (`None`: the lowest free
    /// `ethN`) and, when `host` is given, only while the endpoint is on that host.
    ConnectAs {
        network: String,
        endpoint: String,
        ip: Option<Ipv4Addr>,
        aliases: Vec<String>,
        interface: Option<String>,
        host: Option<String>,
    },
    /// [`Command::Disconnect`], only while the endpoint is on `host`.
    DisconnectOn {
        network: String,
        endpoint: String,
        host: String,
    },
    /// [`Command::RemoveEndpoint`], only while the endpoint is on `host`.
    RemoveEndpointOn {
        name: String,
        host: String,
    },

    // --- Endpoint status (issue 15). Appended after every older variant, for the same
    // reason as the container commands above.
    /// An agent's report of its own host's endpoints, made from the catalog at
    /// `revision`: entries for endpoints not on `host`, or changed after `revision`, are
    /// ignored (see `status`). Changes no catalog object and no revision.
    SetEndpointStatuses {
        host: String,
        revision: u64,
        statuses: Vec<ReportedStatus>,
    },

    // --- Scale (issue 14). Appended, as above.
    /// [`Command::SetHostStatus`] for several hosts in one revision: what the leader's
    /// liveness monitor found in one pass. Every watcher hears about every host, so a
    /// rack going down (or a starved leader seeing many hosts at once) is one message
    /// per watcher, not one per host. Hosts removed meanwhile are skipped.
    SetHostStatuses {
        statuses: Vec<(String, HostStatus)>,
        now_ms: u64,
    },
}

impl Command {
    /// True for commands only the leader's own tasks issue (never a client, never a
    /// forwarded proposal from another member).
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            Command::SetHostStatus { .. }
                | Command::SetHostStatuses { .. }
                | Command::InitCluster { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raft logs store commands with postcard, which names a variant by its position:
    /// existing variants must keep theirs.
    #[test]
    fn variant_positions_are_stable() {
        let first_byte = |c: &Command| postcard::to_stdvec(c).ok().and_then(|b| b.first().copied());
        let ip = Ipv4Addr::LOCALHOST;
        let v1 = Command::RegisterHostV1 {
            name: "h".into(),
            underlay_ip: ip,
            underlay_mtu: 0,
            now_ms: 0,
        };
        assert_eq!(first_byte(&v1), Some(8));
        assert_eq!(first_byte(&Command::RemoveHost { name: "h".into() }), Some(9));
        let v2 = Command::RegisterHost {
            name: "h".into(),
            underlay_ip: ip,
            underlay_prefix: 24,
            underlay_mtu: 0,
            now_ms: 0,
        };
        assert_eq!(first_byte(&v2), Some(13));
        let report =
            Command::SetEndpointStatuses { host: "h".into(), revision: 1, statuses: vec![] };
        assert_eq!(first_byte(&report), Some(18));
        let statuses = Command::SetHostStatuses { statuses: vec![], now_ms: 0 };
        assert_eq!(first_byte(&statuses), Some(19));
    }
}
