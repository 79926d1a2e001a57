//! Netlink dump -> [`ObservedHost`], only objects the agent owns: devices with our
//! prefixes in the host namespace, and the namespaces recorded in the data directory
//! (everything inside those is ours).

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use crate::nl::{Nl, RawLink};
use crate::observed::{LinkObs, NsObs, ObservedHost};
use crate::plan::is_owned_host_link as owned;
use crate::store::Store;
use crate::{firewall, netns};

/// Links of one namespace with their addresses, FDB and neighbours, keyed by name.
async fn dump(nl: &Nl, keep: impl Fn(&str) -> bool) -> Result<BTreeMap<String, LinkObs>> {
    let raw: Vec<RawLink> = nl.links().await?;
    let names: BTreeMap<u32, String> = raw.iter().map(|l| (l.index, l.name.clone())).collect();
    let mut by_index: BTreeMap<u32, LinkObs> = BTreeMap::new();
    for l in raw.iter().filter(|l| keep(&l.name)) {
        let mut obs = LinkObs::new(l.kind.clone(), l.mtu);
        obs.mac = l.mac;
        obs.up = l.up;
        obs.master = l.master.and_then(|m| names.get(&m).cloned());
        by_index.insert(l.index, obs);
    }
    for (index, addr) in nl.addrs().await? {
        if let Some(l) = by_index.get_mut(&index) {
            l.addrs.insert(addr);
        }
    }
    for (index, entry) in nl.fdb().await? {
        if let Some(l) = by_index.get_mut(&index) {
            l.fdb.insert(entry);
        }
    }
    for (index, ip, mac) in nl.neighs().await? {
        if let Some(l) = by_index.get_mut(&index) {
            l.neigh.insert(ip, mac);
        }
    }
    Ok(by_index.into_iter().filter_map(|(i, l)| Some((names.get(&i)?.clone(), l))).collect())
}

/// One endpoint namespace.
pub async fn observe_netns(name: &str) -> Result<NsObs> {
    let nl = Nl::in_netns(name).with_context(|| format!("opening netlink in namespace {name}"))?;
    let links = dump(&nl, |_| true).await?;
    let routes = nl.gateway_routes().await?.into_iter().collect();
    let ip_forward = netns::run_in(name, || Ok(netns::forwarding())).unwrap_or(false);
    Ok(NsObs { links, routes, ip_forward, resolv_conf: netns::read_resolv_conf(name) })
}

/// The whole host. A namespace that cannot be read is reported as an error rather
/// than as missing, so the plan never recreates something merely unreadable.
pub async fn observe(host: &Nl, store: &Store) -> Result<ObservedHost> {
    let links = dump(host, owned).await?;
    let recorded = store.owned_namespaces().context("reading the namespace record")?;
    let existing = netns::list();
    let mut namespaces = BTreeMap::new();
    for name in &recorded {
        let obs = if existing.contains(name) { Some(observe_netns(name).await?) } else { None };
        namespaces.insert(name.clone(), obs);
    }
    let foreign = existing.difference(&recorded).cloned().collect();
    let firewall = tokio::task::spawn_blocking(firewall::observe).await.unwrap_or(None);
    Ok(ObservedHost { links, namespaces, foreign, host_forwarding: netns::forwarding(), firewall })
}
