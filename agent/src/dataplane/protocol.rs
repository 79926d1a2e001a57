//! What the agent and its data-plane daemon say to each other (plain data, pure).
//!
//! One JSON object per line over a Unix stream socket in the agent's data directory:
//! easy to read in a log or poke at with `socat`, and cheap next to what it carries
//! (a table change per catalog revision, not per packet).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use std::net::SocketAddr;

use overlay_model::{Catalog, Endpoint, Mac, NameEntry, Network, Route};
use serde::{Deserialize, Serialize};

use crate::desired::{HostDesired, Uplink, ZERO_MAC};
use crate::diff::map_diff;

/// How the daemon runs. The agent replaces a daemon whose settings (or build) differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonSettings {
    /// The agent build that started it (`CARGO_PKG_VERSION` + build id).
    pub build: String,
    pub host: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_mtu: u32,
    pub udp_port: u16,
    pub quic_port: u16,
    pub queues: usize,
    /// PEM files for `--encrypted` networks: (CA, certificate, key).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Changes when the certificate is renewed in place.
    #[serde(default)]
    pub tls_serial: String,
}

/// One `--encap udp` network as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpNetworkTable {
    pub vni: u32,
    /// `ovu-<VNI>`.
    pub tap: String,
    pub encrypted: bool,
    /// Other hosts carrying the network: broadcast goes to each, and frames are only
    /// accepted from them.
    pub peers: Vec<Ipv4Addr>,
    /// Remote endpoint MAC -> the host it lives on.
    pub macs: Vec<(Mac, Ipv4Addr)>,
    /// Remote endpoint IP -> MAC: ARP requests for these are answered locally (as the
    /// VXLAN device's `proxy` does), other ARP requests are dropped.
    pub arp: Vec<(Ipv4Addr, Mac)>,
}

/// Everything the daemon forwards by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables {
    pub networks: Vec<UdpNetworkTable>,
    /// Host name -> underlay IP of every peer, so the QUIC side knows which name a
    /// connecting address must prove with its certificate.
    pub hosts: BTreeMap<String, Ipv4Addr>,
}

// --- DNS through agent restarts (issue 15): the daemon holds every endpoint's DNS
// server (its sockets inside the endpoint's namespace, and the last records), so name
// lookups keep working while the agent is stopped, killed, restarted or upgraded.

/// What the endpoints' DNS servers answer from: the catalog's networks, endpoints and
/// routes at `revision` (hosts are not needed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecords {
    pub revision: u64,
    pub networks: Vec<Network>,
    pub endpoints: Vec<Endpoint>,
    pub routes: Vec<Route>,
    /// Endpoints known by name only (NXDOMAIN, never forwarded).
    #[serde(default)]
    pub names: Vec<NameEntry>,
}

impl DnsRecords {
    pub fn from_catalog(c: &Catalog) -> DnsRecords {
        DnsRecords {
            revision: c.revision,
            networks: c.networks.values().cloned().collect(),
            endpoints: c.endpoints.values().cloned().collect(),
            routes: c.routes.values().cloned().collect(),
            names: c
                .names
                .iter()
                .map(|(name, aliases)| NameEntry { name: name.clone(), aliases: aliases.clone() })
                .collect(),
        }
    }

    pub fn to_catalog(&self) -> Catalog {
        Catalog {
            revision: self.revision,
            networks: self.networks.iter().map(|n| (n.name.clone(), n.clone())).collect(),
            endpoints: self.endpoints.iter().map(|e| (e.name.clone(), e.clone())).collect(),
            routes: self.routes.iter().map(|r| (r.key(), r.clone())).collect(),
            hosts: Default::default(),
            names: std::sync::Arc::new(
                self.names.iter().map(|e| (e.name.clone(), e.aliases.clone())).collect(),
            ),
        }
    }
}

/// What changed in the records from revision `base` (the daemon's) to `revision`: the
/// networks and routes whole (a few), the endpoints added or changed, and the names of
/// those removed. One endpoint created costs one endpoint on the socket, not the
/// catalog's 10,000 (1.4 MB of JSON, 45 ms to write and read).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsChanges {
    pub base: u64,
    pub revision: u64,
    pub networks: Vec<Network>,
    pub routes: Vec<Route>,
    pub endpoints: Vec<Endpoint>,
    pub removed: Vec<String>,
    /// Endpoints known by name only, added or changed, and those no longer known so.
    #[serde(default)]
    pub names: Vec<NameEntry>,
    #[serde(default)]
    pub removed_names: Vec<String>,
}

impl DnsChanges {
    /// From the records of `old` to those of `new` (pure; one walk of both).
    pub fn between(old: &Catalog, new: &Catalog) -> DnsChanges {
        let mut changes = DnsChanges {
            base: old.revision,
            revision: new.revision,
            networks: new.networks.values().cloned().collect(),
            routes: new.routes.values().cloned().collect(),
            ..DnsChanges::default()
        };
        let endpoints = map_diff(&old.endpoints, &new.endpoints);
        changes.endpoints = endpoints.changed.into_iter().map(|(_, e)| e.clone()).collect();
        changes.removed = endpoints.removed.into_iter().map(|(name, _)| name.clone()).collect();
        // Names are shared between catalogs until a change copies them: most revisions
        // need no walk of 100,000 names.
        if !std::sync::Arc::ptr_eq(&old.names, &new.names) {
            let names = map_diff(&old.names, &new.names);
            changes.names = names
                .changed
                .into_iter()
                .map(|(name, aliases)| NameEntry { name: name.clone(), aliases: aliases.clone() })
                .collect();
            changes.removed_names =
                names.removed.into_iter().map(|(name, _)| name.clone()).collect();
        }
        changes
    }

    /// Whether only the revision moves.
    pub fn only_revision(&self, records: &Catalog) -> bool {
        self.endpoints.is_empty()
            && self.removed.is_empty()
            && self.names.is_empty()
            && self.removed_names.is_empty()
            && records.networks.values().eq(self.networks.iter())
            && records.routes.values().eq(self.routes.iter())
    }

    /// Applies them to `records` (the records of the catalog at `base`); `false`, and
    /// `records` untouched, when those are at another revision.
    pub fn apply_to(&self, records: &mut Catalog) -> bool {
        if records.revision != self.base {
            return false;
        }
        records.revision = self.revision;
        records.networks = self.networks.iter().map(|n| (n.name.clone(), n.clone())).collect();
        records.routes = self.routes.iter().map(|r| (r.key(), r.clone())).collect();
        for name in &self.removed {
            records.endpoints.remove(name);
        }
        for e in &self.endpoints {
            records.endpoints.insert(e.name.clone(), e.clone());
        }
        if !self.names.is_empty() || !self.removed_names.is_empty() {
            let names = std::sync::Arc::make_mut(&mut records.names);
            for name in &self.removed_names {
                names.remove(name);
            }
            for e in &self.names {
                names.insert(e.name.clone(), e.aliases.clone());
            }
        }
        true
    }
}

/// The DNS the daemon serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsTables {
    /// New records, when the catalog changed since the daemon's (`None`: keep them).
    pub records: Option<DnsRecords>,
    /// Or only what changed since the daemon's records (ignored by a daemon whose
    /// records are at another revision; it says which it holds).
    #[serde(default)]
    pub changes: Option<DnsChanges>,
    /// Where names that are not the overlay's are forwarded.
    pub upstream: Vec<SocketAddr>,
    /// The endpoints to serve (127.0.0.11:53 in the namespace of the same name); the
    /// servers of others are stopped.
    pub serve: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Who are you, and with what settings?
    Hello,
    /// Forward by these tables from now on (creating TAP devices as needed).
    SetTables { tables: Tables },
    /// Stop forwarding and exit (a newer agent build, or other settings).
    Shutdown,
    /// Serve these endpoints' DNS (issue 15).
    SetDns { dns: Box<DnsTables> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Hello {
        pid: u32,
        settings: DaemonSettings,
    },
    Applied,
    Bye,
    Error {
        message: String,
    },
    /// The records' revision the daemon answers from, the endpoints it serves, and the
    /// ones whose server could not start, with why.
    Dns {
        revision: Option<u64>,
        served: Vec<String>,
        failed: Vec<(String, String)>,
    },
}

/// The data plane's tables for the TAP-uplink networks of `desired`; `host_names` maps
/// underlay IPs to host names (from the catalog).
pub fn tables_for(desired: &HostDesired, host_names: &BTreeMap<Ipv4Addr, String>) -> Tables {
    let mut tables = Tables::default();
    for nd in desired.networks.values() {
        let Uplink::Tap { encrypted } = nd.uplink_kind else { continue };
        let peers: Vec<Ipv4Addr> =
            nd.fdb.iter().filter(|f| f.mac == ZERO_MAC).map(|f| f.dst).collect();
        for ip in &peers {
            if let Some(name) = host_names.get(ip) {
                tables.hosts.insert(name.clone(), *ip);
            }
        }
        tables.networks.push(UdpNetworkTable {
            vni: nd.vni,
            tap: nd.uplink.clone(),
            encrypted,
            peers,
            macs: nd.fdb.iter().filter(|f| f.mac != ZERO_MAC).map(|f| (f.mac, f.dst)).collect(),
            arp: nd.neigh.iter().map(|(ip, mac)| (*ip, *mac)).collect(),
        });
    }
    tables
}

/// One message as a line of JSON.
pub fn encode<T: Serialize>(msg: &T) -> Result<String, serde_json::Error> {
    let mut line = serde_json::to_string(msg)?;
    line.push('\n');
    Ok(line)
}

pub fn decode<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, serde_json::Error> {
    serde_json::from_str(line.trim_end())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::desired::desired_for_host;
    use crate::desired::tests::catalog;
    use crate::desired::LocalHost;
    use overlay_model::Encap;

    fn names() -> BTreeMap<Ipv4Addr, String> {
        (1..=3).map(|i| (Ipv4Addr::new(192, 0, 2, i), format!("h{i}"))).collect()
    }

    #[test]
    fn only_tap_networks_become_tables() {
        let mut c = catalog();
        c.networks.get_mut("front").unwrap().encap = Encap::Udp;
        let local = LocalHost {
            name: "h1".into(),
            underlay_ip: "192.0.2.1".parse().unwrap(),
            can_encrypt: false,
        };
        let t = tables_for(&desired_for_host(&c, &local), &names());
        assert_eq!(t.networks.len(), 1);
        let front = &t.networks[0];
        assert_eq!((front.vni, front.tap.as_str(), front.encrypted), (4096, "ovu-4096", false));
        let h2 = Ipv4Addr::new(192, 0, 2, 2);
        let h3 = Ipv4Addr::new(192, 0, 2, 3);
        assert_eq!(front.peers, vec![h2, h3]);
        assert_eq!(front.macs, vec![(Mac::from_counter(2), h2), (Mac::from_counter(5), h3)]);
        assert_eq!(front.arp.len(), 2);
        assert_eq!(t.hosts.keys().collect::<Vec<_>>(), ["h2", "h3"]);

        // A VXLAN-only host has no tables at all.
        let t = tables_for(&desired_for_host(&catalog(), &local), &names());
        assert_eq!(t, Tables::default());
    }

    #[test]
    fn dns_changes_take_the_records_from_one_catalog_to_the_next() {
        let old = catalog();
        let mut new = old.clone();
        new.revision = old.revision + 3;
        new.endpoints.remove("db");
        new.endpoints.get_mut("web").unwrap().attachments[0].aliases = vec!["www".into()];
        let added = crate::desired::tests::ep("new", "h1", &[("front", "10.1.0.20", 50)]);
        new.endpoints.insert(added.name.clone(), added.clone());
        // Endpoints known by name only: one appears, one goes.
        let mut old = old;
        std::sync::Arc::make_mut(&mut old.names).insert("gone".into(), vec![]);
        new.names = std::sync::Arc::new([("far".to_string(), vec!["alias".to_string()])].into());
        let changes = DnsChanges::between(&old, &new);
        let names: Vec<&str> = changes.endpoints.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["new", "web"]);
        assert_eq!(changes.removed, ["db"]);
        assert_eq!(
            changes.names,
            [NameEntry { name: "far".into(), aliases: vec!["alias".into()] }]
        );
        assert_eq!(changes.removed_names, ["gone"]);
        assert!(!changes.only_revision(&old));

        let records = |c: &Catalog| DnsRecords::from_catalog(c).to_catalog();
        let mut held = records(&old);
        assert!(changes.apply_to(&mut held));
        assert_eq!(held, records(&new));
        // Records at another revision are left alone (the agent then sends them all).
        let mut other = records(&old);
        other.revision += 1;
        let before = other.clone();
        assert!(!changes.apply_to(&mut other));
        assert_eq!(other, before);
        // Nothing but the revision.
        let mut later = new.clone();
        later.revision += 1;
        assert!(DnsChanges::between(&new, &later).only_revision(&held));
    }

    #[test]
    fn messages_round_trip_as_single_lines() {
        let req = Request::SetTables {
            tables: Tables {
                networks: vec![UdpNetworkTable {
                    vni: 7,
                    tap: "ovu-7".into(),
                    encrypted: true,
                    peers: vec![Ipv4Addr::new(10, 0, 0, 2)],
                    macs: vec![(Mac::from_counter(9), Ipv4Addr::new(10, 0, 0, 2))],
                    arp: vec![(Ipv4Addr::new(10, 9, 0, 3), Mac::from_counter(9))],
                }],
                hosts: [("h2".to_string(), Ipv4Addr::new(10, 0, 0, 2))].into(),
            },
        };
        let line = encode(&req).unwrap();
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(decode::<Request>(&line).unwrap(), req);
        let e = decode::<Request>("{\"request\":\"bogus\"}").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
