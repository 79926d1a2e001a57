//! The record data the server answers from, derived from the controller's [`Catalog`].
//!
//! Why a separate view: the catalog is shaped for the controller (objects keyed by
//! name), while a DNS answer needs "which networks does this asker see" and "who holds
//! this label" in one hash lookup each. [`DnsView::build`] computes those indexes once
//! per catalog revision; the agent shares the result (`Arc<DnsView>`) among the servers
//! of every endpoint on the host, so a server costs no record memory of its own.
//!
//! Pure data: no I/O, no clock. Keys are lowercased here so lookups only lowercase the
//! query's labels.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicUsize;

use ipnetwork::Ipv4Network;
use overlay_model::Catalog;

use crate::wire::Name;

/// Index of a network in [`DnsView`]; ids follow the catalog's (sorted) order.
pub(crate) type NetId = u32;

/// Indexes for answering any endpoint's queries about a catalog revision.
#[derive(Debug, Default)]
pub struct DnsView {
    revision: u64,
    networks: Vec<NetInfo>,
    net_ids: HashMap<Box<[u8]>, NetId>,
    askers: HashMap<Box<[u8]>, Asker>,
    /// Endpoint names and aliases: every (network, address) where the label is valid.
    holders: HashMap<Box<[u8]>, Vec<Holder>>,
    /// Endpoint addresses to the PTR target in each network holding that address.
    ptr: HashMap<Ipv4Addr, Vec<PtrTarget>>,
    /// Overlay subnets as sorted, inclusive `(first, last)` ranges.
    subnets: Vec<(u32, u32)>,
    /// Rotates multi-address answers between queries.
    pub(crate) rotation: AtomicUsize,
}

#[derive(Debug)]
struct NetInfo {
    name: Box<str>,
    internal: bool,
}

/// One place a name or alias resolves: its address in one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Holder {
    pub net: NetId,
    pub ip: Ipv4Addr,
}

/// What one endpoint, as a client, can see.
#[derive(Debug, Default)]
pub(crate) struct Asker {
    /// Networks it is attached to, sorted.
    attached: Vec<NetId>,
    /// Destinations of the routes of those networks: addresses behind gateways.
    routes: Vec<Ipv4Network>,
    /// Whether it may use the host's resolvers: attached to a non-internal network.
    pub may_forward: bool,
}

impl Asker {
    /// Shares `net` with the holder: a bare name resolves there.
    pub fn shares(&self, net: NetId) -> bool {
        self.attached.binary_search(&net).is_ok()
    }

    /// Can reach `ip` in `net`: attached to it, or one of its networks routes there.
    pub fn reaches(&self, net: NetId, ip: Ipv4Addr) -> bool {
        self.shares(net) || self.routes.iter().any(|r| r.contains(ip))
    }
}

/// The PTR answer for an address in one network: `NAME.NETWORK.` in wire form.
#[derive(Debug)]
pub(crate) struct PtrTarget {
    pub net: NetId,
    pub name: Box<[u8]>,
}

fn key(s: &str) -> Box<[u8]> {
    s.to_ascii_lowercase().into_bytes().into_boxed_slice()
}

impl DnsView {
    /// Indexes `catalog`. Objects referring to something missing (a catalog caught
    /// mid-replication) are skipped rather than trusted.
    pub fn build(catalog: &Catalog) -> DnsView {
        let mut view = DnsView { revision: catalog.revision, ..DnsView::default() };
        for (id, net) in catalog.networks.values().enumerate() {
            let id = id as NetId;
            view.net_ids.insert(key(&net.name), id);
            view.networks.push(NetInfo {
                name: net.name.to_ascii_lowercase().into(),
                internal: net.internal,
            });
            let first = u32::from(net.subnet.network());
            let last = u32::from(net.subnet.broadcast());
            view.subnets.push((first, last));
        }
        view.subnets.sort_unstable();

        for ep in catalog.endpoints.values() {
            let mut asker = Asker::default();
            for att in &ep.attachments {
                let Some(&net) = view.net_ids.get(key(&att.network).as_ref()) else {
                    continue;
                };
                asker.attached.push(net);
                asker.may_forward |= !view.networks[net as usize].internal;
                asker.routes.extend(catalog.routes_in(&att.network).map(|r| r.destination));

                let holder = Holder { net, ip: att.ip };
                view.holders.entry(key(&ep.name)).or_default().push(holder);
                for alias in &att.aliases {
                    view.holders.entry(key(alias)).or_default().push(holder);
                }
                let ptr_name = format!("{}.{}.", ep.name, att.network).to_ascii_lowercase();
                if let Ok(name) = Name::from_dotted(&ptr_name) {
                    let target = PtrTarget { net, name: name.wire().into() };
                    view.ptr.entry(att.ip).or_default().push(target);
                }
            }
            asker.attached.sort_unstable();
            asker.attached.dedup();
            asker.routes.sort_unstable_by_key(|r| (r.network(), r.prefix()));
            asker.routes.dedup();
            view.askers.insert(key(&ep.name), asker);
        }
        // Endpoints known by name only (on networks this host does not carry): ours, so
        // NXDOMAIN rather than forwarded, and no asker reaches them.
        for (name, aliases) in catalog.names.iter() {
            for label in std::iter::once(name).chain(aliases) {
                view.holders.entry(key(label)).or_default();
            }
        }
        for holders in view.holders.values_mut() {
            holders.sort_unstable();
            holders.dedup();
        }
        for targets in view.ptr.values_mut() {
            targets.sort_unstable_by_key(|t| t.net);
        }
        view
    }

    /// The catalog revision this view reflects.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Names of the networks `asker` is attached to (empty for an unknown endpoint):
    /// for logs and tests.
    pub fn networks_of(&self, asker: &str) -> Vec<&str> {
        self.asker(asker.to_ascii_lowercase().as_bytes())
            .map(|a| a.attached.iter().map(|&n| &*self.networks[n as usize].name).collect())
            .unwrap_or_default()
    }

    /// The endpoint `name` (lowercase) as an asker.
    pub(crate) fn asker(&self, name: &[u8]) -> Option<&Asker> {
        self.askers.get(name)
    }

    /// The network called `label` (lowercase).
    pub(crate) fn network(&self, label: &[u8]) -> Option<NetId> {
        self.net_ids.get(label).copied()
    }

    /// Where the endpoint name or alias `label` (lowercase) resolves, in any network.
    pub(crate) fn holders(&self, label: &[u8]) -> Option<&[Holder]> {
        self.holders.get(label).map(Vec::as_slice)
    }

    /// PTR targets for an endpoint address.
    pub(crate) fn ptr(&self, ip: Ipv4Addr) -> Option<&[PtrTarget]> {
        self.ptr.get(&ip).map(Vec::as_slice)
    }

    /// Whether `ip` lies in some overlay network's subnet.
    pub(crate) fn in_overlay_subnet(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        // subnets never overlap (the controller refuses that), so the candidate is the
        // last range starting at or before ip; check a couple before it in case a
        // catalog mid-replication broke that rule.
        let at = self.subnets.partition_point(|&(first, _)| first <= ip);
        self.subnets[..at].iter().rev().take(2).any(|&(first, last)| first <= ip && ip <= last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn indexes_names_aliases_and_addresses() {
        let cat = catalog(
            &[("front", "10.0.1.0/24", false), ("back", "10.0.2.0/24", true)],
            &[
                ("web", &[("front", "10.0.1.2", &["www"])]),
                ("db", &[("back", "10.0.2.2", &[])]),
                ("api", &[("front", "10.0.1.3", &["www"]), ("back", "10.0.2.3", &[])]),
            ],
            &[],
        );
        let view = DnsView::build(&cat);
        assert_eq!(view.networks_of("api"), vec!["back", "front"]);
        assert_eq!(view.holders(b"www").map(<[Holder]>::len), Some(2));
        assert_eq!(view.holders(b"api").map(<[Holder]>::len), Some(2));
        assert!(view.asker(b"web").is_some_and(|a| a.may_forward));
        assert!(view.asker(b"db").is_some_and(|a| !a.may_forward), "internal only");
        assert!(view.in_overlay_subnet(Ipv4Addr::new(10, 0, 2, 200)));
        assert!(!view.in_overlay_subnet(Ipv4Addr::new(10, 0, 3, 1)));
        let ptr = view.ptr(Ipv4Addr::new(10, 0, 1, 3)).expect("has ptr");
        assert_eq!(&*ptr[0].name, Name::from_dotted("api.front.").expect("valid").wire());
    }
}
