//! What `endpoint ls`/`inspect` show as an endpoint's status (pure).
//!
//! Two facts go in, from two places:
//!
//! * the endpoint's own host's report, from the replicated state (durable, on every
//!   member; see `overlay_model::status` for why it lives there): has that host realized
//!   the endpoint's current version, or why not;
//! * for every *other* host, the catalog revision its kernel reflects, which agents
//!   report with every status report and the leader keeps in memory like last-seen
//!   times (a new leader knows none until the agents' next reports, a second or two).
//!
//! An endpoint is shown `ready` once its host says so *and* every other live host that
//! carries one of its networks has applied the revision that made its current version
//! (`since`): by then every peer's forwarding entries, neighbours and DNS know it, so it
//! is reachable from everywhere, not only present on its own host. Until then it is
//! `pending`, with what it waits for as the reason. A host that is down is not waited
//! for (it cannot be reached anyway, and it catches up when it comes back).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use overlay_model::status::{EndpointState, EndpointStatus};
use overlay_model::{Catalog, Endpoint, HostStatus, State};

/// An endpoint's status as shown to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub state: EndpointState,
    pub reason: String,
}

/// Which hosts carry each network (have an endpoint attached to it), computed once for
/// a listing.
#[derive(Debug, Default)]
pub struct Carriers<'a> {
    by_network: BTreeMap<&'a str, BTreeSet<&'a str>>,
}

impl<'a> Carriers<'a> {
    pub fn of(catalog: &'a Catalog) -> Carriers<'a> {
        let mut by_network: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for e in catalog.endpoints.values() {
            for a in &e.attachments {
                by_network.entry(a.network.as_str()).or_default().insert(e.host.as_str());
            }
        }
        Carriers { by_network }
    }

    /// Only what `endpoint`'s status needs, from the state's index: O(its networks'
    /// carriers), not O(catalog) — every endpoint write answers with one.
    pub fn around(state: &'a State, endpoint: &Endpoint) -> Carriers<'a> {
        let by_network = endpoint
            .attachments
            .iter()
            .filter_map(|a| state.catalog.networks.get_key_value(&a.network))
            .map(|(name, _)| (name.as_str(), state.carriers_of(name).collect()))
            .collect();
        Carriers { by_network }
    }

    /// The hosts other than `endpoint`'s own that carry one of its networks.
    fn peers_of(&self, endpoint: &Endpoint) -> BTreeSet<&'a str> {
        endpoint
            .attachments
            .iter()
            .filter_map(|a| self.by_network.get(a.network.as_str()))
            .flatten()
            .copied()
            .filter(|h| *h != endpoint.host)
            .collect()
    }
}

/// How many host names a reason lists before summarising the rest.
const LISTED_HOSTS: usize = 5;

/// The status to show for `endpoint`, from its host's report (`status`), the catalog
/// (hosts and who carries what) and the revision each host's kernel reflects
/// (`applied`, as the leader last heard it).
pub fn shown(
    endpoint: &Endpoint,
    status: Option<&EndpointStatus>,
    catalog: &Catalog,
    carriers: &Carriers<'_>,
    applied: &HashMap<String, u64>,
) -> Shown {
    let host = endpoint.host.as_str();
    let host_down = catalog.hosts.get(host).is_none_or(|h| h.status == HostStatus::Down);
    let pending = |reason: String| Shown { state: EndpointState::Pending, reason };
    let Some(status) = status.filter(|s| s.is_reported()) else {
        let down = if host_down { format!(" (host {host} is down)") } else { String::new() };
        return pending(format!("waiting for host {host} to realize it{down}"));
    };
    match status.state {
        EndpointState::Failed => {
            return Shown { state: EndpointState::Failed, reason: status.reason.clone() }
        }
        EndpointState::Pending => {
            let why = if status.reason.is_empty() {
                format!("waiting for host {host} to realize it")
            } else {
                format!("host {host}: {}", status.reason)
            };
            return pending(why);
        }
        EndpointState::Ready => {}
    }
    // Live peers that have not applied the endpoint's current version yet.
    let behind: Vec<&str> = carriers
        .peers_of(endpoint)
        .into_iter()
        .filter(|p| catalog.hosts.get(*p).is_some_and(|h| h.status == HostStatus::Ready))
        .filter(|p| applied.get(*p).is_none_or(|r| *r < status.since))
        .collect();
    if behind.is_empty() {
        return Shown { state: EndpointState::Ready, reason: String::new() };
    }
    let mut listed = behind.iter().take(LISTED_HOSTS).copied().collect::<Vec<_>>().join(", ");
    if behind.len() > LISTED_HOSTS {
        listed.push_str(&format!(" and {} more", behind.len() - LISTED_HOSTS));
    }
    let hosts = if behind.len() == 1 { "host" } else { "hosts" };
    pending(format!(
        "realized on host {host}; waiting for {hosts} {listed} to apply revision {}",
        status.since
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use overlay_model::{Attachment, Host, Mac};

    use super::*;

    fn host(name: &str, status: HostStatus) -> Host {
        Host {
            name: name.into(),
            underlay_ip: "192.0.2.1".parse().unwrap(),
            underlay_mtu: 1500,
            status,
            status_changed_ms: 0,
            underlay_prefix: 24,
        }
    }

    fn ep(name: &str, host: &str, networks: &[&str]) -> Endpoint {
        Endpoint {
            name: name.into(),
            host: host.into(),
            attachments: networks
                .iter()
                .enumerate()
                .map(|(i, n)| Attachment {
                    network: n.to_string(),
                    interface: format!("eth{i}"),
                    ip: "10.0.0.2".parse().unwrap(),
                    mac: Mac::from_counter(1),
                    aliases: vec![],
                })
                .collect(),
        }
    }

    /// h1: a (front), h2: b (front), h3: c (back, down host), h4: d (other).
    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        for (h, s) in [
            ("h1", HostStatus::Ready),
            ("h2", HostStatus::Ready),
            ("h3", HostStatus::Down),
            ("h4", HostStatus::Ready),
        ] {
            c.hosts.insert(h.into(), host(h, s));
        }
        for e in [
            ep("a", "h1", &["front", "back"]),
            ep("b", "h2", &["front"]),
            ep("c", "h3", &["back"]),
            ep("d", "h4", &["other"]),
        ] {
            c.endpoints.insert(e.name.clone(), e);
        }
        c
    }

    fn status(state: EndpointState, reason: &str, since: u64, reported: u64) -> EndpointStatus {
        EndpointStatus { state, reason: reason.into(), since, reported }
    }

    #[test]
    fn ready_waits_for_live_peers_of_its_networks_only() {
        let c = catalog();
        let carriers = Carriers::of(&c);
        let a = &c.endpoints["a"];
        let ready = status(EndpointState::Ready, "", 10, 10);
        // h2 carries front and has not reached 10; h3 (back) is down; h4 carries neither.
        let applied = HashMap::from([("h2".to_string(), 9), ("h4".to_string(), 1)]);
        let s = shown(a, Some(&ready), &c, &carriers, &applied);
        assert_eq!(s.state, EndpointState::Pending);
        assert_eq!(s.reason, "realized on host h1; waiting for host h2 to apply revision 10");
        // Unknown (a new leader) counts as behind.
        let s = shown(a, Some(&ready), &c, &carriers, &HashMap::new());
        assert_eq!(s.state, EndpointState::Pending);
        let applied = HashMap::from([("h2".to_string(), 10)]);
        let s = shown(a, Some(&ready), &c, &carriers, &applied);
        assert_eq!(s, Shown { state: EndpointState::Ready, reason: String::new() });
        // Alone in its network: its own host is enough.
        let s = shown(&c.endpoints["d"], Some(&ready), &c, &carriers, &HashMap::new());
        assert_eq!(s.state, EndpointState::Ready);
    }

    #[test]
    fn carriers_around_one_endpoint_agree_with_the_whole_catalogs() {
        use overlay_model::{Command, NetworkSpec};
        let mut state = State::new();
        for (i, host) in ["h1", "h2", "h3"].into_iter().enumerate() {
            let register = Command::RegisterHost {
                name: host.into(),
                underlay_ip: std::net::Ipv4Addr::new(192, 0, 2, i as u8 + 1),
                underlay_prefix: 24,
                underlay_mtu: 1500,
                now_ms: 0,
            };
            state.apply(&register).unwrap();
        }
        for (name, subnet) in [("front", "10.1.0.0/24"), ("back", "10.2.0.0/24")] {
            let spec = NetworkSpec::with_defaults(name, subnet.parse().unwrap());
            state.apply(&Command::CreateNetwork(spec)).unwrap();
        }
        for (name, host, network) in
            [("a", "h1", "front"), ("b", "h2", "front"), ("c", "h3", "back"), ("d", "h2", "back")]
        {
            let create = Command::CreateEndpoint {
                name: name.into(),
                host: host.into(),
                network: network.into(),
                ip: None,
                aliases: vec![],
            };
            state.apply(&create).unwrap();
        }
        let connect = Command::Connect {
            network: "back".into(),
            endpoint: "a".into(),
            ip: None,
            aliases: vec![],
        };
        state.apply(&connect).unwrap();
        state.apply(&Command::RemoveEndpoint { name: "d".into() }).unwrap();
        let all = Carriers::of(&state.catalog);
        for e in state.catalog.endpoints.values() {
            assert_eq!(Carriers::around(&state, e).peers_of(e), all.peers_of(e), "{}", e.name);
        }
        let a = &state.catalog.endpoints["a"];
        assert_eq!(Carriers::around(&state, a).peers_of(a), BTreeSet::from(["h2", "h3"]));
    }

    #[test]
    fn unreported_stale_and_failed() {
        let c = catalog();
        let carriers = Carriers::of(&c);
        let none = HashMap::new();
        let s = shown(&c.endpoints["a"], None, &c, &carriers, &none);
        assert_eq!(
            s,
            Shown {
                state: EndpointState::Pending,
                reason: "waiting for host h1 to realize it".into()
            }
        );
        // A report about an older version is no report.
        let stale = status(EndpointState::Ready, "", 10, 9);
        assert_eq!(
            shown(&c.endpoints["a"], Some(&stale), &c, &carriers, &none).state,
            EndpointState::Pending
        );
        let s = shown(&c.endpoints["c"], None, &c, &carriers, &none);
        assert_eq!(s.reason, "waiting for host h3 to realize it (host h3 is down)");
        let why = "namespace a exists and was not created by overlay-agent";
        let failed = status(EndpointState::Failed, why, 10, 12);
        let s = shown(&c.endpoints["a"], Some(&failed), &c, &carriers, &none);
        assert_eq!(s, Shown { state: EndpointState::Failed, reason: why.into() });
    }
}
