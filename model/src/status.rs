//! Endpoint status (issue 15): whether an endpoint's host has realized it.
//!
//! Where statuses live, and why: in the replicated [`crate::State`], beside the catalog
//! but not in it. Each agent reports, once per reconcile pass and only when something
//! changed, the statuses of its own host's endpoints as one raft command
//! ([`crate::Command::SetEndpointStatuses`]). So a status is durable, every member can
//! answer `endpoint ls` from its own state, and nothing is lost when leadership moves
//! (a leader's memory would be, and every agent would have to report everything again).
//! It stays out of the catalog, and so out of the watch stream and its revision: agents
//! need not hear of each other's statuses, and a report must not look like a change of
//! the desired state to every watcher.
//!
//! A status belongs to one version of its endpoint: the state machine puts it back to
//! `pending` whenever the endpoint changes (created, connected, disconnected, moved) and
//! remembers that revision as `since`; a report made from an older catalog than `since`
//! is ignored, so a late report about the previous version never marks the new one.
//!
//! What users see also depends on the other hosts (see the controller's `status`
//! module): a host's `ready` is shown `ready` once every other live host carrying one of
//! the endpoint's networks has applied revision `since`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Longest reason kept, in characters (a reason is shown in every `endpoint ls`).
pub const MAX_REASON: usize = 500;

/// Where an endpoint stands on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EndpointState {
    /// Not (yet) realized by its host for its current version.
    Pending,
    /// Namespace, interfaces, addresses, routes and DNS are in place.
    Ready,
    /// The host cannot realize it; the reason says why.
    Failed,
}

impl EndpointState {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Pending => "pending",
            EndpointState::Ready => "ready",
            EndpointState::Failed => "failed",
        }
    }
}

impl fmt::Display for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EndpointState {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(EndpointState::Pending),
            "ready" => Ok(EndpointState::Ready),
            "failed" => Ok(EndpointState::Failed),
            _ => Err(ModelError::InvalidEndpointState(s.to_string())),
        }
    }
}

/// What the state machine keeps per endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub state: EndpointState,
    /// Why it failed (empty otherwise).
    pub reason: String,
    /// The catalog revision of the endpoint's last change: reports from older catalogs
    /// are about an earlier version and are ignored.
    pub since: u64,
    /// The catalog revision the current state was reported from (0: never reported).
    pub reported: u64,
}

impl EndpointStatus {
    /// A version of the endpoint that its host has not reported on yet.
    pub fn pending(since: u64) -> EndpointStatus {
        EndpointStatus { state: EndpointState::Pending, reason: String::new(), since, reported: 0 }
    }

    /// Whether the host reported on the endpoint's current version.
    pub fn is_reported(&self) -> bool {
        self.reported != 0 && self.reported >= self.since
    }
}

/// One entry of an agent's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedStatus {
    pub endpoint: String,
    pub state: EndpointState,
    pub reason: String,
}

/// `reason` cut to [`MAX_REASON`] characters, on one line (deterministic: every member
/// keeps the same text).
pub fn clean_reason(reason: &str) -> String {
    let one_line: String =
        reason.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(MAX_REASON).collect();
    one_line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_reasons_stay_short() {
        for s in [EndpointState::Pending, EndpointState::Ready, EndpointState::Failed] {
            assert_eq!(s.as_str().parse::<EndpointState>(), Ok(s));
        }
        assert!("up".parse::<EndpointState>().is_err());
        assert_eq!(clean_reason("a\n  b\tc "), "a b c");
        assert_eq!(clean_reason(&"x".repeat(900)).len(), MAX_REASON);
        let p = EndpointStatus::pending(7);
        assert!(!p.is_reported());
        assert!(EndpointStatus { reported: 7, ..p.clone() }.is_reported());
        assert!(!EndpointStatus { reported: 6, ..p }.is_reported());
    }
}
