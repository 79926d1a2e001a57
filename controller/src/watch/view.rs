//! What one host receives of the watch stream (pure, unit-tested).
//!
//! A host needs every host and every network; whole, the endpoints and routes of the
//! networks it *wants* (those its endpoints are attached to, and those their routes lead
//! into) and its own endpoints (also one with no attachment left); every other endpoint
//! by name only (`PutNames`: DNS answers NXDOMAIN for every overlay name). The hub
//! computes, once per revision, what each change concerns ([`Scope`]) and which hosts
//! started or stopped wanting a network ([`Event::joins`], [`Event::leaves`]); each
//! stream then only checks those against its [`HostView`]. A host that starts wanting a
//! network is sent that network's objects ([`Piece::Network`]); one that stops
//! ([`Piece::Dropped`]) is sent its endpoints by name and its routes deleted.

use std::collections::BTreeSet;

use bytes::Bytes;

/// Who receives one change whole, and who by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Every host (hosts, networks, endpoint deletions).
    pub everyone: bool,
    /// The hosts whose own endpoint this is (before and after the change).
    pub hosts: Vec<String>,
    /// Networks whose wanters receive it whole (an endpoint's networks after the change,
    /// a route's network).
    pub networks: Vec<String>,
    /// An endpoint's networks before the change that it left: their wanters that do not
    /// receive it whole get its name instead (what they held whole is replaced).
    pub was_in: Vec<String>,
    /// The endpoint is new or its name set changed: everyone else gets its name.
    pub renamed: bool,
}

/// One change of an [`Event`], encoded once for every stream that sends it.
#[derive(Debug, Clone)]
pub struct EventChange {
    pub scope: Scope,
    /// The change as a `WatchResponse.changes` field record (tag, length, message).
    pub record: Bytes,
    /// For an endpoint: its `PutNames` record, for the hosts that know it by name.
    pub names: Option<Bytes>,
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

/// What one stream's host wants; `host: None` is a watcher that sees everything (an
/// admin, or an agent that did not ask for a per-host stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    host: Option<String>,
    wanted: BTreeSet<String>,
}

impl HostView {
    pub fn new(host: Option<String>, wanted: BTreeSet<String>) -> HostView {
        HostView { host, wanted }
    }

    /// The networks the host wants whole.
    pub fn wanted(&self) -> &BTreeSet<String> {
        &self.wanted
    }

    /// The host this stream is narrowed to.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    fn is_me(&self, host: &str) -> bool {
        self.host.as_deref() == Some(host)
    }

    /// The pieces of `event` this host receives, and the view after it: networks it
    /// starts wanting first (their objects), then the changes, whole or by name, then
    /// networks it stopped wanting.
    pub fn filter<'e>(&mut self, event: &'e Event) -> Vec<Piece<'e>> {
        let Some(me) = self.host.clone() else {
            return event.changes.iter().map(|c| Piece::Record(&c.record)).collect();
        };
        let mut out = Vec::new();
        for (host, network) in &event.joins {
            if *host == me && self.wanted.insert(network.clone()) {
                out.push(Piece::Network(network));
            }
        }
        for change in &event.changes {
            let s = &change.scope;
            let wants = |nets: &[String]| nets.iter().any(|n| self.wanted.contains(n));
            if s.everyone || s.hosts.contains(&me) || wants(&s.networks) {
                out.push(Piece::Record(&change.record));
            } else if let Some(names) = &change.names {
                if s.renamed || wants(&s.was_in) {
                    out.push(Piece::Record(names));
                }
            }
        }
        for (host, network) in &event.leaves {
            if *host == me && self.wanted.remove(network) {
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
                self.wanted.insert(network.clone());
            }
        }
        for (host, network) in event.joins.iter().rev() {
            if self.is_me(host) {
                self.wanted.remove(network);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn change(tag: &str, everyone: bool, hosts: &[&str], networks: &[&str]) -> EventChange {
        EventChange {
            scope: Scope {
                everyone,
                hosts: strings(hosts),
                networks: strings(networks),
                ..Scope::default()
            },
            record: Bytes::from(tag.to_string()),
            names: None,
        }
    }

    /// An endpoint change of another host, with its name record.
    fn endpoint(tag: &str, networks: &[&str], was_in: &[&str], renamed: bool) -> EventChange {
        EventChange {
            scope: Scope {
                everyone: false,
                hosts: strings(&["h9"]),
                networks: strings(networks),
                was_in: strings(was_in),
                renamed,
            },
            record: Bytes::from(tag.to_string()),
            names: Some(Bytes::from(format!("names:{tag}"))),
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
    fn other_endpoints_arrive_by_name_when_new_renamed_or_leaving_a_wanted_network() {
        let event = Event {
            revision: 7,
            changes: vec![
                endpoint("new-in-a", &["a"], &[], true),
                endpoint("new-in-b", &["b"], &[], true),
                endpoint("same-names-in-b", &["b"], &[], false),
                endpoint("moved-a-to-b", &["b"], &["a"], false),
            ],
            ..Event::default()
        };
        let mut v = view("h1", &["a"]);
        assert_eq!(
            tags(&v.filter(&event)),
            ["new-in-a", "names:new-in-b", "names:moved-a-to-b"],
            "whole where wanted, by name where new, nothing where nothing changed for h1"
        );
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
        assert!(v.wanted().contains("b"));
        // Its last endpoint in a detaches: the change, then a's deletion.
        let leave = Event {
            revision: 9,
            changes: vec![change("own-out-of-a", false, &["h1"], &["a"])],
            joins: vec![],
            leaves: pairs(&[("h1", "a")]),
        };
        assert_eq!(tags(&v.filter(&leave)), ["own-out-of-a", "drop:a"]);
        assert_eq!(v.wanted().iter().collect::<Vec<_>>(), ["b"]);
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
