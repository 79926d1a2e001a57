//! How the agent recognizes, from the kernel alone, the endpoint namespaces it made.
//!
//! Local state is disposable (SPEC): `namespaces.json` in the data dir is only a cache.
//! The truth is a mark in each namespace the agent made or took over: the alias
//! (`IFLA_IFALIAS`, `ip link show` prints it) of the namespace's `lo`, set right after
//! the namespace is created ([`crate::plan::Action::MarkNamespace`]):
//!
//! ```text
//! overlay-agent host=h1                 a namespace the agent on h1 created
//! overlay-agent host=h1 cni=3f2a…       a container's namespace it took over (CNI)
//! ```
//!
//! The host name matters because hosts may share `/run/netns` (the namespace lab does:
//! every "host" is a namespace on one machine) and an agent must never take another
//! host's endpoint for its own. The container ID lets the agent rebuild its record of a
//! container (`cni.json`) after losing its data dir, so the runtime's DEL still works.
//!
//! [`Claimer`] looks at namespaces that exist but are not in the record, once per
//! namespace (by inode), and claims the ones marked for this host; a namespace without
//! the mark is never touched, and an endpoint wanting its name is `failed` with the
//! reason (see [`crate::status`]).

use std::collections::BTreeMap;

use overlay_model::names::is_dns_label;
use tracing::{info, warn};

use crate::netns;
use crate::nl::Nl;
use crate::store::Store;

/// The first word of every mark (also the alias of the agent's host devices).
pub const MARK_WORD: &str = crate::observed::OWNED_ALIAS;
/// The kernel keeps at most this many bytes of an alias.
const MAX_ALIAS: usize = 255;

/// What a mark says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub host: String,
    /// The container whose namespace this is (taken over through CNI).
    pub container: Option<String>,
}

/// A container ID as a mark may carry it (CNI IDs: letters, digits, `-`, `_`, `.`).
fn container_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The mark of a namespace made (or, with `container`, taken over) by `host`'s agent.
/// A container ID that cannot be carried is left out (the namespace is still marked).
pub fn format(host: &str, container: Option<&str>) -> String {
    let plain = format!("{MARK_WORD} host={host}");
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
    let container = match words.next() {
        None => None,
        Some(w) => Some(w.strip_prefix("cni=").filter(|c| container_ok(c))?.to_string()),
    };
    if words.next().is_some() {
        return None;
    }
    Some(Mark { host, container })
}

/// Whether a namespace whose `lo` carries `observed` needs marking to say `wanted`
/// (host `host`, container `container`). A mark with a container ID is not stripped
/// by a wish without one (the record of that container may just not be rebuilt yet).
pub fn needs_marking(observed: Option<&str>, host: &str, container: Option<&str>) -> bool {
    match observed.and_then(parse) {
        Some(m) if m.host == host => match container {
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
    /// Records as ours every namespace under `/run/netns` that is not in `store`'s record
    /// and carries `host`'s mark; returns their names.
    pub async fn claim(&mut self, store: &Store, host: &str) -> Vec<String> {
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
        for name in existing.iter().filter(|n| !recorded.contains(*n) && is_dns_label(n)) {
            let Some(inode) = netns::inode(name) else { continue };
            let mark = match self.seen.get(name) {
                Some((seen, mark)) if *seen == inode => mark.clone(),
                _ => {
                    let mark = read(name).await.ok().flatten().as_deref().and_then(parse);
                    self.seen.insert(name.clone(), (inode, mark.clone()));
                    mark
                }
            };
            if mark.is_some_and(|m| m.host == host) {
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

    #[test]
    fn marks_round_trip_and_nothing_else_parses() {
        let plain = format("h1", None);
        assert_eq!(plain, "overlay-agent host=h1");
        assert_eq!(parse(&plain), Some(Mark { host: "h1".into(), container: None }));
        let cni = format("h1", Some("3f2a_b.c-d"));
        assert_eq!(cni, "overlay-agent host=h1 cni=3f2a_b.c-d");
        assert_eq!(
            parse(&cni),
            Some(Mark { host: "h1".into(), container: Some("3f2a_b.c-d".into()) })
        );
        // An ID that cannot be carried is left out, the namespace is marked all the same.
        assert_eq!(format("h1", Some("a b")), plain);
        assert_eq!(format("h1", Some(&"x".repeat(250))), plain);
        for bad in [
            "",
            "overlay-agent",
            "overlay-agent host=",
            "overlay-agent host=H1",
            "overlay-agent host=h1 cni=",
            "overlay-agent host=h1 cni=a/b",
            "overlay-agent host=h1 cni=a extra",
            "overlay-agent  host=h1",
            "someone host=h1",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn marking_is_needed_for_missing_or_other_marks_only() {
        assert!(needs_marking(None, "h1", None));
        assert!(needs_marking(Some("lo"), "h1", None));
        assert!(needs_marking(Some("overlay-agent host=h2"), "h1", None));
        assert!(!needs_marking(Some("overlay-agent host=h1"), "h1", None));
        // A container's ID is kept, and added when known.
        assert!(!needs_marking(Some("overlay-agent host=h1 cni=abc"), "h1", None));
        assert!(needs_marking(Some("overlay-agent host=h1"), "h1", Some("abc")));
        assert!(!needs_marking(Some("overlay-agent host=h1 cni=abc"), "h1", Some("abc")));
    }
}
