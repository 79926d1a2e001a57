//! Endpoint statuses in the state machine (issue 15; why they live here: see
//! [`crate::status`]). Two rules, both deterministic:
//!
//! * an endpoint that changes (a `PutEndpoint`: created, connected, disconnected,
//!   moved) goes back to `pending` with `since` = the revision of that change, and a
//!   removed one loses its status;
//! * an agent's report sets the statuses it names if each endpoint is on the reporting
//!   host and the report was made from a catalog at or after `since`; anything else in
//!   it is ignored (a late report about an older version, an endpoint that moved away).

use crate::status::{clean_reason, EndpointState, EndpointStatus, ReportedStatus};
use crate::{Change, State};

impl State {
    /// The status of endpoint `name` as its host last reported it (`None`: no report and
    /// no change since the state was loaded from a snapshot without statuses).
    pub fn endpoint_status(&self, name: &str) -> Option<&EndpointStatus> {
        self.statuses.get(name)
    }

    /// Endpoints on `host` whose current version has no report yet: what the host's
    /// agent should report on next.
    pub fn unreported_on(&self, host: &str) -> Vec<String> {
        let Some(names) = self.index.on_host.get(host) else { return Vec::new() };
        names
            .iter()
            .filter(|n| self.statuses.get(*n).is_none_or(|s| !s.is_reported()))
            .cloned()
            .collect()
    }

    /// Back to `pending` for every endpoint `changes` put; gone with every one they
    /// delete. Called with the revision already advanced.
    pub(super) fn reset_statuses(&mut self, changes: &[Change]) {
        let revision = self.catalog.revision;
        for change in changes {
            match change {
                Change::PutEndpoint(e) => {
                    self.statuses.insert(e.name.clone(), EndpointStatus::pending(revision));
                }
                Change::DeleteEndpoint(name) => {
                    self.statuses.remove(name);
                }
                _ => {}
            }
        }
    }

    /// Applies an agent's report (see the module documentation). Never fails: a report
    /// that is partly stale is applied for the rest.
    pub(super) fn set_statuses(&mut self, host: &str, revision: u64, reports: &[ReportedStatus]) {
        for r in reports {
            let on_host = self.catalog.endpoints.get(&r.endpoint).is_some_and(|e| e.host == host);
            if !on_host {
                continue;
            }
            let status =
                self.statuses.entry(r.endpoint.clone()).or_insert(EndpointStatus::pending(0));
            if revision < status.since || revision == 0 {
                continue;
            }
            status.state = r.state;
            status.reason = match r.state {
                EndpointState::Ready => String::new(),
                _ => clean_reason(&r.reason),
            };
            status.reported = revision;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::state::fixtures::state_with;
    use crate::status::{EndpointState, ReportedStatus};
    use crate::{Command, State};

    fn setup() -> State {
        state_with(
            &[("h1", "192.0.2.1"), ("h2", "192.0.2.2")],
            &[("front", "10.0.1.0/24"), ("back", "10.0.2.0/24")],
        )
    }

    fn create(s: &mut State, name: &str, host: &str) -> u64 {
        let cmd = Command::CreateEndpoint {
            name: name.into(),
            host: host.into(),
            network: "front".into(),
            ip: None,
            aliases: vec![],
        };
        s.apply(&cmd).unwrap().revision
    }

    fn report(host: &str, revision: u64, entries: &[(&str, EndpointState, &str)]) -> Command {
        Command::SetEndpointStatuses {
            host: host.into(),
            revision,
            statuses: entries
                .iter()
                .map(|(e, state, reason)| ReportedStatus {
                    endpoint: e.to_string(),
                    state: *state,
                    reason: reason.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_new_endpoint_is_pending_until_its_host_reports() {
        let mut s = setup();
        let r = create(&mut s, "a", "h1");
        let st = s.endpoint_status("a").unwrap();
        assert_eq!((st.state, st.since, st.reported), (EndpointState::Pending, r, 0));
        assert_eq!(s.unreported_on("h1"), ["a"]);
        let applied = s.apply(&report("h1", r, &[("a", EndpointState::Ready, "")])).unwrap();
        // A report changes no object and no revision: watchers never see it.
        assert!(applied.changes.is_empty());
        assert_eq!(applied.revision, r);
        assert_eq!(s.endpoint_status("a").unwrap().state, EndpointState::Ready);
        assert!(s.unreported_on("h1").is_empty());
    }

    #[test]
    fn a_change_resets_and_stale_or_foreign_reports_are_ignored() {
        let mut s = setup();
        let r1 = create(&mut s, "a", "h1");
        s.apply(&report("h1", r1, &[("a", EndpointState::Ready, "")])).unwrap();
        let r2 = s
            .apply(&Command::Connect {
                network: "back".into(),
                endpoint: "a".into(),
                ip: None,
                aliases: vec![],
            })
            .unwrap()
            .revision;
        assert_eq!(s.endpoint_status("a").unwrap().state, EndpointState::Pending);
        assert_eq!(s.endpoint_status("a").unwrap().since, r2);
        // Made from the catalog before the connect: about the old version.
        s.apply(&report("h1", r1, &[("a", EndpointState::Ready, "")])).unwrap();
        assert_eq!(s.endpoint_status("a").unwrap().state, EndpointState::Pending);
        // Another host may not speak for it.
        s.apply(&report("h2", r2, &[("a", EndpointState::Ready, "")])).unwrap();
        assert_eq!(s.endpoint_status("a").unwrap().state, EndpointState::Pending);
        // Unknown endpoints are skipped, the rest applied; reasons are kept short.
        let long = format!("route refused:\n{}", "x".repeat(900));
        s.apply(&report(
            "h1",
            r2,
            &[("zz", EndpointState::Ready, ""), ("a", EndpointState::Failed, &long)],
        ))
        .unwrap();
        let st = s.endpoint_status("a").unwrap();
        assert_eq!(st.state, EndpointState::Failed);
        assert!(st.reason.starts_with("route refused: xxx"), "{}", st.reason);
        assert_eq!(st.reason.chars().count(), crate::status::MAX_REASON);
        assert!(s.endpoint_status("zz").is_none());
        // Removed: the status goes too.
        s.apply(&Command::RemoveEndpoint { name: "a".into() }).unwrap();
        assert!(s.endpoint_status("a").is_none());
    }

    #[test]
    fn statuses_survive_snapshots_and_format_4_starts_pending() {
        let mut s = setup();
        let r = create(&mut s, "a", "h1");
        create(&mut s, "b", "h2");
        s.apply(&report("h1", r, &[("a", EndpointState::Failed, "namespace a exists")])).unwrap();
        let back = State::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.endpoint_status("a").unwrap().reason, "namespace a exists");
        // Format 4 is format 5 without the statuses at the end.
        let mut v4 = vec![4u8];
        #[derive(serde::Serialize)]
        struct V4<'a> {
            catalog: &'a crate::Catalog,
            ipams: &'a std::collections::BTreeMap<String, crate::Ipam>,
            meta: &'a crate::ClusterMeta,
        }
        v4.extend(
            postcard::to_stdvec(&V4 { catalog: &s.catalog, ipams: &s.ipams, meta: &s.meta })
                .unwrap(),
        );
        let old = State::from_bytes(&v4).unwrap();
        assert_eq!(old.catalog, s.catalog);
        assert!(old.endpoint_status("a").is_none());
        assert_eq!(old.unreported_on("h1"), ["a"]);
        // Any report of the host counts for an endpoint without a known `since`.
        let mut old = old;
        old.apply(&report("h1", 1, &[("a", EndpointState::Ready, "")])).unwrap();
        assert_eq!(old.endpoint_status("a").unwrap().state, EndpointState::Ready);
    }
}
