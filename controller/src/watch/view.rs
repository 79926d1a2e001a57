//! What one host receives of the watch stream (pure, unit-tested).
//!
//! A host needs every host, the networks it carries (those with at least one of its
//! endpoints attached), every endpoint attached to those, its own endpoints (also one
//! with no attachment left) and the routes of those networks. The hub computes, once per
//! revision, what each change concerns ([`Scope`]) and which hosts started or stopped
//! carrying a network ([`Event::joins`], [`Event::leaves`]); each stream then only
//! checks those against its [`HostView`]. A host that starts carrying a network is sent
//! that network's objects ([`Piece::Network`]); one that stops is sent a
//! `DeleteNetwork` ([`Piece::Dropped`]) and its agent drops what it no longer needs.

use std::collections::BTreeSet;

use bytes::Bytes;

/// Who receives one change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Every host (host objects).
    pub everyone: bool,
    /// The hosts whose own endpoint this is (before and after the change).
    pub hosts: Vec<String>,
    /// Networks whose carriers receive it (an endpoint's networks before and after).
    pub networks: Vec<String>,
}

/// One change of an [`Event`], encoded once for every stream that sends it.
#[derive(Debug, Clone)]
pub struct EventChange {
    pub scope: Scope,
    /// The change as a `WatchResponse.changes` field record (tag, length, message).
    pub record: Bytes,
}

/// One applied revision as the streams see it.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub revision: u64,
    pub changes: Vec<EventChange>,
    /// (host, network): the host carries the network from this revision on.
    pub joins: Vec<(String, String)>,
    /// (host, network): the host no longer carries the network from this revision on.
    pub leaves: Vec<(String, String)>,
}

/// What a stream sends for an event, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Every object of this network (the host just started carrying it).
    Network(&'a str),
    /// One change record.
    Record(&'a Bytes),
    /// `DeleteNetwork` of this network (the host stopped carrying it).
    Dropped(&'a str),
}

/// What one stream's host carries; `host: None` is a watcher that sees everything (an
/// admin watching without naming a host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    host: Option<String>,
    carried: BTreeSet<String>,
}

impl HostView {
    pub fn new(host: Option<String>, carried: BTreeSet<String>) -> HostView {
        HostView { host, carried }
    }

    #[cfg(test)]
    pub fn carried(&self) -> &BTreeSet<String> {
        &self.carried
    }

    fn is_me(&self, host: &str) -> bool {
        self.host.as_deref() == Some(host)
    }

    /// The pieces of `event` this host receives, and the view after it: networks it
    /// starts carrying first (their objects), then the relevant changes, then networks
    /// it stopped carrying.
    pub fn filter<'e>(&mut self, event: &'e Event) -> Vec<Piece<'e>> {
        let Some(me) = self.host.clone() else {
            return event.changes.iter().map(|c| Piece::Record(&c.record)).collect();
        };
        let mut out = Vec::new();
        for (host, network) in &event.joins {
            if *host == me && self.carried.insert(network.clone()) {
                out.push(Piece::Network(network));
            }
        }
        for change in &event.changes {
            let s = &change.scope;
            if s.everyone
                || s.hosts.contains(&me)
                || s.networks.iter().any(|n| self.carried.contains(n))
            {
                out.push(Piece::Record(&change.record));
            }
        }
        for (host, network) in &event.leaves {
            if *host == me && self.carried.remove(network) {
                out.push(Piece::Dropped(network));
            }
        }
        out
    }

    /// The view before `event`, given the view after it: walking the history backwards
    /// from the present gives what a resuming watcher carried at its revision.
    pub fn rewind(&mut self, event: &Event) {
        if self.host.is_none() {
            return;
        }
        for (host, network) in event.leaves.iter().rev() {
            if self.is_me(host) {
                self.carried.insert(network.clone());
            }
        }
        for (host, network) in event.joins.iter().rev() {
            if self.is_me(host) {
                self.carried.remove(network);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn change(tag: &str, everyone: bool, hosts: &[&str], networks: &[&str]) -> EventChange {
        EventChange {
            scope: Scope {
                everyone,
                hosts: hosts.iter().map(|s| s.to_string()).collect(),
                networks: networks.iter().map(|s| s.to_string()).collect(),
            },
            record: Bytes::from(tag.to_string()),
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(h, n)| (h.to_string(), n.to_string())).collect()
    }

    fn view(host: &str, carried: &[&str]) -> HostView {
        HostView::new(Some(host.into()), carried.iter().map(|s| s.to_string()).collect())
    }

    fn tags(pieces: &[Piece<'_>]) -> Vec<String> {
        pieces
            .iter()
            .map(|p| match p {
                Piece::Network(n) => format!("net:{n}"),
                Piece::Record(b) => String::from_utf8(b.to_vec()).unwrap(),
                Piece::Dropped(n) => format!("drop:{n}"),
            })
            .collect()
    }

    #[test]
    fn a_host_gets_hosts_its_networks_and_its_own_endpoints() {
        let event = Event {
            revision: 7,
            changes: vec![
                change("host", true, &[], &[]),
                change("ep-in-a", false, &["h2"], &["a"]),
                change("ep-in-b", false, &["h2"], &["b"]),
                change("own-bare", false, &["h1"], &[]),
                change("route-b", false, &[], &["b"]),
                change("net-c", false, &[], &["c"]),
            ],
            ..Event::default()
        };
        let mut v = view("h1", &["a"]);
        assert_eq!(tags(&v.filter(&event)), ["host", "ep-in-a", "own-bare"]);
        let mut all = HostView::new(None, BTreeSet::new());
        assert_eq!(all.filter(&event).len(), 6, "a watcher without a host sees everything");
    }

    #[test]
    fn starting_and_stopping_to_carry_a_network() {
        // h1's first endpoint in b: b's objects first, then the change itself.
        let join = Event {
            revision: 8,
            changes: vec![change("own-in-b", false, &["h1"], &["b"])],
            joins: pairs(&[("h2", "c"), ("h1", "b")]),
            leaves: vec![],
        };
        let mut v = view("h1", &["a"]);
        assert_eq!(tags(&v.filter(&join)), ["net:b", "own-in-b"]);
        assert!(v.carried().contains("b"));
        // Its last endpoint in a detaches: the change, then a's deletion.
        let leave = Event {
            revision: 9,
            changes: vec![change("own-out-of-a", false, &["h1"], &["a"])],
            joins: vec![],
            leaves: pairs(&[("h1", "a")]),
        };
        assert_eq!(tags(&v.filter(&leave)), ["own-out-of-a", "drop:a"]);
        assert_eq!(v.carried().iter().collect::<Vec<_>>(), ["b"]);
        // Later changes in a no longer reach h1.
        let later = Event {
            revision: 10,
            changes: vec![change("x", false, &["h2"], &["a"])],
            ..Event::default()
        };
        assert!(v.filter(&later).is_empty());

        // Rewinding the three events gives the view before them.
        v.rewind(&later);
        v.rewind(&leave);
        v.rewind(&join);
        assert_eq!(v, view("h1", &["a"]));
    }
}
