//! How the agent recognizes, from the kernel alone, the endpoint namespaces it made.
//!
//! Local state is disposable (SPEC): `namespaces.json` in the data dir is only a cache.
//! The truth is a mark in each namespace the agent made or took over: the alias
//! (`IFLA_IFALIAS`, `ip link show` prints it) of the namespace's `lo`, set right after
//! the namespace is created ([`crate::plan::Action::MarkNamespace`]):
//!
//! ```text
//! overlay-agent host=h1 cluster=9f…            a namespace the agent on h1 created
//! overlay-agent host=h1 cluster=9f… cni=3f2a…  a container's namespace it took over
//! ```
//!
//! The host name and cluster id matter because hosts may share `/run/netns` (the
//! namespace lab does: every "host" is a namespace on one machine, and several labs may
//! run at once, each a cluster with hosts h1, h2, …): an agent must never take another
//! host's endpoint for its own. (The cluster id is absent while the agent does not know
//! its cluster yet.) The container ID lets the agent rebuild its record of a container
//! (`cni.json`) after losing its data dir, so the runtime's DEL still works.
//!
//! [`Claimer`] looks at namespaces that exist but are not in the record, once per
//! namespace (by inode), and claims the ones marked for this host; a namespace without
//! the mark is never touched, and an endpoint wanting its name is `failed` with the
//! reason (see [`crate::status`]).

use std::collections::{BTreeMap, BTreeSet};

use overlay_model::names::is_dns_label;
use tracing::{info, warn};

use crate::netns;
use crate::nl::Nl;
use crate::store::Store;

/// The first word of every mark (also the alias of the agent's host devices).
pub const MARK_WORD: &str = crate::observed::OWNED_ALIAS;
/// The kernel keeps at most this many bytes of an alias.
const MAX_ALIAS: usize = 255;

/// Whose a namespace is: a host of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    /// The cluster's id (32 hex digits), once the agent knows it.
    pub cluster: Option<String>,
}

/// What a mark says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub owner: Owner,
    /// The container whose namespace this is (taken over through CNI).
    pub container: Option<String>,
}

fn cluster_ok(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A container ID as a mark may carry it (CNI IDs: letters, digits, `-`, `_`, `.`).
fn container_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The mark of a namespace made (or, with `container`, taken over) by `owner`'s agent.
/// A container ID that cannot be carried is left out (the namespace is still marked).
pub fn format(owner: &Owner, container: Option<&str>) -> String {
    let mut plain = format!("{MARK_WORD} host={}", owner.host);
    if let Some(cluster) = owner.cluster.as_deref().filter(|c| cluster_ok(c)) {
        plain.push_str(&format!(" cluster={}", cluster.to_ascii_lowercase()));
    }
    match container.filter(|c| container_ok(c)) {
        Some(id) if plain.len() + 5 + id.len() <= MAX_ALIAS => format!("{plain} cni={id}"),
        _ => plain,
    }
}

/// Reads a mark; `None` for anything that is not exactly one (the agent trusts nothing
/// it reads from a namespace).
pub fn parse(alias: &str) -> Option<Mark> {
    let mut words = alias.split(' ');
    if words.next()? != MARK_WORD {
        return None;
    }
    let host = words.next()?.strip_prefix("host=").filter(|h| is_dns_label(h))?.to_string();
    let mut next = words.next();
    let mut cluster = None;
    if let Some(c) = next.and_then(|w| w.strip_prefix("cluster=")) {
        cluster = Some(c.to_ascii_lowercase()).filter(|c| cluster_ok(c));
        cluster.as_ref()?;
        next = words.next();
    }
    let container = match next {
        None => None,
        Some(w) => Some(w.strip_prefix("cni=").filter(|c| container_ok(c))?.to_string()),
    };
    if words.next().is_some() {
        return None;
    }
    Some(Mark { owner: Owner { host, cluster }, container })
}

/// Whether `mark` is `owner`'s (same host, same cluster).
pub fn owned_by(mark: &Mark, owner: &Owner) -> bool {
    mark.owner.host == owner.host
        && mark.owner.cluster.as_deref().map(str::to_ascii_lowercase)
            == owner.cluster.as_deref().map(str::to_ascii_lowercase)
}

/// Whether a namespace whose `lo` carries `observed` needs marking to say it is
/// `owner`'s (with `container`). A mark with a container ID is not stripped by a wish
/// without one (the record of that container may just not be rebuilt yet).
pub fn needs_marking(observed: Option<&str>, owner: &Owner, container: Option<&str>) -> bool {
    match observed.and_then(parse) {
        Some(m) if owned_by(&m, owner) => match container {
            None => false,
            Some(c) => m.container.as_deref() != Some(c),
        },
        _ => true,
    }
}

/// The alias of `lo` in namespace `name`.
pub async fn read(name: &str) -> anyhow::Result<Option<String>> {
    let nl = Nl::in_netns(name)?;
    let links = nl.links().await?;
    Ok(links.into_iter().find(|l| l.name == "lo").and_then(|l| l.alias))
}

/// Claims the namespaces marked for this host that the record does not list; remembers
/// what it read of the others (by inode) so each is read once.
#[derive(Debug, Default)]
pub struct Claimer {
    /// Namespace -> (inode, its mark if any) as last read.
    seen: BTreeMap<String, (u64, Option<Mark>)>,
}

impl Claimer {
    /// Records as ours every namespace under `/run/netns` that is not in `store`'s record,
    /// carries `owner`'s mark and is named as one of this host's `endpoints`; returns
    /// their names. Only endpoint names: a container's namespace is mounted under the
    /// runtime's own name too (podman's `netns-UUID`), with the same mark, and that
    /// mount is the runtime's, never ours to delete.
    pub async fn claim(
        &mut self,
        store: &Store,
        owner: &Owner,
        endpoints: &BTreeSet<&str>,
    ) -> Vec<String> {
        let recorded = match store.owned_namespaces() {
            Ok(r) => r,
            Err(e) => {
                warn!("reading the namespace record: {e}");
                return Vec::new();
            }
        };
        let existing = netns::list();
        self.seen.retain(|name, _| existing.contains(name));
        let mut claimed = Vec::new();
        let candidates = existing.iter().filter(|n| {
            endpoints.contains(n.as_str()) && !recorded.contains(*n) && is_dns_label(n)
        });
        for name in candidates {
            let Some(inode) = netns::inode(name) else { continue };
            let mark = match self.seen.get(name) {
                Some((seen, mark)) if *seen == inode => mark.clone(),
                _ => {
                    let mark = read(name).await.ok().flatten().as_deref().and_then(parse);
                    self.seen.insert(name.clone(), (inode, mark.clone()));
                    mark
                }
            };
            if mark.is_some_and(|m| owned_by(&m, owner)) {
                match store.record_namespace(name) {
                    Ok(()) => {
                        info!(endpoint = %name, "namespace {name} carries this host's overlay-agent mark: taken back as ours")
                    }
                    Err(e) => {
                        warn!(endpoint = %name, "cannot record namespace {name} (taken back as ours all the same): {e}")
                    }
                }
                self.seen.remove(name);
                claimed.push(name.clone());
            }
        }
        claimed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(host: &str, cluster: Option<&str>) -> Owner {
        Owner { host: host.into(), cluster: cluster.map(String::from) }
    }

    const C: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn marks_round_trip_and_nothing_else_parses() {
        let h1 = owner("h1", None);
        let plain = format(&h1, None);
        assert_eq!(plain, "overlay-agent host=h1");
        assert_eq!(parse(&plain), Some(Mark { owner: h1.clone(), container: None }));
        let cni = format(&h1, Some("3f2a_b.c-d"));
        assert_eq!(cni, "overlay-agent host=h1 cni=3f2a_b.c-d");
        let want = Mark { owner: h1.clone(), container: Some("3f2a_b.c-d".into()) };
        assert_eq!(parse(&cni), Some(want));
        let full = owner("h1", Some(C));
        let both = format(&full, Some("abc"));
        assert_eq!(both, format!("overlay-agent host=h1 cluster={C} cni=abc"));
        let want = Mark { owner: full.clone(), container: Some("abc".into()) };
        assert_eq!(parse(&both), Some(want));
        // Another lab's (another cluster's) h1 is not this h1.
        let other = parse(&format(&owner("h1", Some(&C.replace('0', "f"))), None))
            .expect("a mark with another cluster parses");
        assert!(!owned_by(&other, &full));
        let both = parse(&both).expect("a full mark parses");
        assert!(owned_by(&both, &full));
        assert!(!owned_by(&both, &h1));
        // An ID that cannot be carried is left out, the namespace is marked all the same.
        assert_eq!(format(&h1, Some("a b")), plain);
        assert_eq!(format(&h1, Some(&"x".repeat(250))), plain);
        for bad in [
            "",
            "overlay-agent",
            "overlay-agent host=",
            "overlay-agent host=H1",
            "overlay-agent host=h1 cni=",
            "overlay-agent host=h1 cni=a/b",
            "overlay-agent host=h1 cni=a extra",
            "overlay-agent host=h1 cluster=xyz",
            "overlay-agent  host=h1",
            "someone host=h1",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn marking_is_needed_for_missing_or_other_marks_only() {
        let h1 = owner("h1", None);
        assert!(needs_marking(None, &h1, None));
        assert!(needs_marking(Some("lo"), &h1, None));
        assert!(needs_marking(Some("overlay-agent host=h2"), &h1, None));
        assert!(!needs_marking(Some("overlay-agent host=h1"), &h1, None));
        // A container's ID is kept, and added when known.
        assert!(!needs_marking(Some("overlay-agent host=h1 cni=abc"), &h1, None));
        assert!(needs_marking(Some("overlay-agent host=h1"), &h1, Some("abc")));
        assert!(!needs_marking(Some("overlay-agent host=h1 cni=abc"), &h1, Some("abc")));
        // Learning the cluster's id marks again.
        assert!(needs_marking(Some("overlay-agent host=h1"), &owner("h1", Some(C)), None));
    }
}
