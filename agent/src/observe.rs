//! Netlink dump -> [`ObservedHost`], only objects the agent may own: devices with our
//! prefixes in the host namespace (marked [`LinkObs::owned`] when they carry our alias),
//! and the namespaces recorded in the data directory (everything inside those is ours).
//! One namespace that cannot be read is reported in [`ObservedHost::unreadable`] and
//! does not stop the others from being observed.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use futures::StreamExt;

use crate::entries::EntryWatch;
use crate::nl::{Nl, RawLink};
use crate::observed::{FirewallObs, LinkObs, NsObs, ObservedHost, OWNED_ALIAS};
use crate::plan::{iface_sysctls, is_owned_host_link as owned, ENDPOINT_SYSCTLS};
use crate::store::Store;
use crate::{firewall, netns, shortcut};

/// How many endpoint namespaces are observed at once.
const NAMESPACES_AT_ONCE: usize = 4;

/// Links of one namespace with their addresses, by index, with their names. `host`: the
/// host namespace, where only devices with our alias are ours; in an endpoint namespace
/// everything is ours.
async fn dump(
    nl: &Nl,
    keep: impl Fn(&str) -> bool,
    host: bool,
) -> Result<(BTreeMap<u32, LinkObs>, BTreeMap<u32, String>)> {
    let all_owned = !host;
    let raw: Vec<RawLink> = nl.links().await?;
    let names: BTreeMap<u32, String> = raw.iter().map(|l| (l.index, l.name.clone())).collect();
    let mut by_index: BTreeMap<u32, LinkObs> = BTreeMap::new();
    for l in raw.iter().filter(|l| keep(&l.name)) {
        let mut obs = LinkObs::new(l.kind.clone(), l.mtu);
        obs.mac = l.mac;
        obs.up = l.up;
        obs.owned = all_owned || l.alias.as_deref() == Some(OWNED_ALIAS);
        obs.alias = l.alias.clone();
        obs.master = l.master.and_then(|m| names.get(&m).cloned());
        by_index.insert(l.index, obs);
    }
    for (index, addr) in nl.addrs().await? {
        if let Some(l) = by_index.get_mut(&index) {
            l.addrs.insert(addr);
        }
    }
    Ok((by_index, names))
}

/// Keyed by name.
fn by_name(
    by_index: BTreeMap<u32, LinkObs>,
    names: &BTreeMap<u32, String>,
) -> BTreeMap<String, LinkObs> {
    by_index.into_iter().filter_map(|(i, l)| Some((names.get(&i)?.clone(), l))).collect()
}

/// One endpoint namespace.
pub async fn observe_netns(name: &str) -> Result<NsObs> {
    let (nl, (ip_forward, sysctls)) =
        Nl::in_netns_with(name, || (netns::forwarding(), read_sysctls()))
            .with_context(|| format!("opening netlink in namespace {name}"))?;
    let (links, names) = dump(&nl, |_| true, false).await?;
    let links = by_name(links, &names);
    let routes = nl.gateway_routes().await?.into_iter().collect();
    Ok(NsObs { links, routes, ip_forward, sysctls, resolv_conf: netns::read_resolv_conf(name) })
}

/// The settings the plan sets in endpoint namespaces ([`ENDPOINT_SYSCTLS`], and
/// [`iface_sysctls`] for every interface but `lo`), as the calling thread's namespace
/// has them; unreadable ones are left out.
fn read_sysctls() -> BTreeMap<String, String> {
    let ifaces: Vec<String> = std::fs::read_dir("/proc/sys/net/ipv4/conf")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| !matches!(n.as_str(), "all" | "default" | "lo"))
                .collect()
        })
        .unwrap_or_default();
    ENDPOINT_SYSCTLS
        .iter()
        .map(|(k, _)| k.to_string())
        .chain(ifaces.iter().flat_map(|i| iface_sysctls(i).map(|(k, _)| k)))
        .filter_map(|k| Some((netns::read_sysctl(&k)?, k)))
        .map(|(v, k)| (k, v))
        .collect()
}

/// The whole host. A namespace that cannot be read is reported in `unreadable` rather
/// than as missing, so the plan never recreates something merely unreadable, and the
/// other namespaces are observed all the same.
pub async fn observe(host: &Nl, store: &Store) -> Result<ObservedHost> {
    let links = observe_host_links(host, None).await?;
    observe_with_links(store, links, &mut FirewallCache::default()).await
}

/// The agent's tables as last read (the host firewall and the bridge shortcut, two
/// `nft` runs each), with the ruleset generation (see [`firewall::generation`]) they
/// were read at: read again only when that changed, i.e. when anyone committed anything
/// to nftables since.
#[derive(Debug, Default)]
pub struct FirewallCache {
    seen: Option<(u32, Tables)>,
}

/// (`inet overlay`, `netdev overlay`).
type Tables = (Option<FirewallObs>, Option<FirewallObs>);

impl FirewallCache {
    pub async fn observe(&mut self) -> Tables {
        // Asked before reading: a commit in between makes the next pass read again.
        let generation = firewall::generation();
        if let (Some(g), Some((seen, tables))) = (generation, &self.seen) {
            if g == *seen {
                return tables.clone();
            }
        }
        let tables = tokio::task::spawn_blocking(|| {
            (firewall::observe(firewall::FAMILY), firewall::observe(shortcut::FAMILY))
        })
        .await
        .unwrap_or_default();
        self.seen = generation.map(|g| (g, tables.clone()));
        tables
    }
}

/// The host namespace's devices that may be ours, with their addresses, and the FDB
/// entries and permanent neighbours of the uplinks: from `entries` when given (kept
/// current by notifications), else dumped. An endpoint namespace needs none of those
/// (and the kernel's ARP table is one for the whole machine: dumping it walks every
/// namespace's entries, 10,000s with many remote endpoints).
pub async fn observe_host_links(
    host: &Nl,
    entries: Option<&mut EntryWatch>,
) -> Result<BTreeMap<String, LinkObs>> {
    let (mut by_index, names) = dump(host, owned, true).await?;
    match entries {
        Some(watch) => {
            let entries = watch.entries(host).await?;
            for (index, l) in by_index.iter_mut() {
                if let Some(fdb) = entries.fdb(*index) {
                    l.fdb = fdb.clone();
                }
                if let Some(neigh) = entries.neigh(*index) {
                    l.neigh = neigh.clone();
                }
            }
        }
        None => {
            for (index, entry) in host.fdb().await? {
                if let Some(l) = by_index.get_mut(&index) {
                    l.fdb.insert(entry);
                }
            }
            for (index, ip, mac) in host.neighs().await? {
                if let Some(l) = by_index.get_mut(&index) {
                    l.neigh.insert(ip, mac);
                }
            }
        }
    }
    Ok(by_name(by_index, &names))
}

/// The rest of [`observe`], given the host's devices as [`observe_host_links`] found
/// them (and as the caller changed them since).
pub async fn observe_with_links(
    store: &Store,
    links: BTreeMap<String, LinkObs>,
    firewall: &mut FirewallCache,
) -> Result<ObservedHost> {
    let recorded = store.owned_namespaces().context("reading the namespace record")?;
    let existing = netns::list();
    let mut namespaces = BTreeMap::new();
    let mut unreadable = BTreeMap::new();
    for name in recorded.iter().filter(|n| !existing.contains(*n)) {
        namespaces.insert(name.clone(), None);
    }
    // A few at a time: each is a thread entering the namespace and a few netlink round
    // trips, mostly waiting; one after another they held up a new endpoint's creation
    // by ~3 ms per local endpoint.
    let present = recorded.iter().filter(|n| existing.contains(*n));
    let mut observations = futures::stream::iter(present)
        .map(|name| async move { (name, observe_netns(name).await) })
        .buffer_unordered(NAMESPACES_AT_ONCE);
    while let Some((name, observation)) = observations.next().await {
        match observation {
            Ok(obs) => {
                namespaces.insert(name.clone(), Some(obs));
            }
            Err(e) => {
                unreadable.insert(name.clone(), format!("{e:#}"));
            }
        }
    }
    let foreign = existing.difference(&recorded).cloned().collect();
    let (firewall, shortcut) = firewall.observe().await;
    Ok(ObservedHost {
        links,
        namespaces,
        foreign,
        unreadable,
        tap_neigh: BTreeMap::new(),
        host_forwarding: netns::forwarding(),
        firewall,
        shortcut,
    })
}
