//! Tells the controller how this host's endpoints stand (issue 15).
//!
//! After every reconcile pass the main loop publishes a [`PassReport`]: the catalog
//! revision it reconciled to, the revision the kernel now reflects for the other hosts'
//! endpoints (`applied`: forwarding entries, neighbours and DNS records all in place),
//! and each local endpoint's [`Status`]. This task sends `ReportStatus` with only what
//! the controller has not acknowledged yet — a status that changed, an endpoint whose
//! catalog object changed (the controller reset it to `pending`), or one the controller
//! asked for in its last answer (`wanted`) — so one raft write per host per pass at
//! most, and none when nothing changed. It also reports at least every
//! [`REFRESH`], carrying `applied` to a leader that just took over (it keeps applied
//! revisions in memory, like last-seen times).
//!
//! A controller that does not know the call (an older version) is told nothing more
//! than once a minute; the data plane never waits for any of this.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use overlay_model::Endpoint;
use overlay_proto::pb;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::identity::Controllers;
use crate::status::Status;

/// Longest time between two reports.
pub const REFRESH: Duration = Duration::from_secs(2);
/// After a controller said it does not know status reports.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What one pass found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    /// The catalog revision the statuses come from.
    pub revision: u64,
    /// The catalog revision the kernel reflects for remote endpoints (0: none yet).
    pub applied: u64,
    /// Each local endpoint's status, with its catalog object as the pass saw it.
    pub statuses: BTreeMap<String, (Status, Endpoint)>,
}

/// What has to go out now (pure): entries not acknowledged as they are, or wanted.
pub fn to_send<'a>(
    report: &'a PassReport,
    acked: &BTreeMap<String, (Status, Endpoint)>,
    wanted: &BTreeSet<String>,
) -> Vec<(&'a String, &'a (Status, Endpoint))> {
    report
        .statuses
        .iter()
        .filter(|(name, entry)| wanted.contains(*name) || acked.get(*name) != Some(*entry))
        .collect()
}

/// Sends reports until the task is dropped.
pub async fn run(
    host: String,
    controllers: Controllers,
    mut reports: watch::Receiver<Option<Arc<PassReport>>>,
) {
    let mut acked: BTreeMap<String, (Status, Endpoint)> = BTreeMap::new();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut sent_applied = 0u64;
    let mut client = None;
    let mut next_url = 0usize;
    let mut backoff = Duration::from_millis(200);
    let mut last_error: Option<String> = None;
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let periodic = tokio::select! {
            r = reports.changed() => { if r.is_err() { return; } false }
            _ = refresh.tick() => true,
        };
        let Some(report) = reports.borrow_and_update().clone() else { continue };
        acked.retain(|name, _| report.statuses.contains_key(name));
        let due = to_send(&report, &acked, &wanted);
        if due.is_empty() && wanted.is_empty() && report.applied == sent_applied && !periodic {
            continue;
        }
        let request = pb::StatusReport {
            host: host.clone(),
            revision: report.revision,
            statuses: due
                .iter()
                .map(|(name, (status, _))| pb::EndpointStatusReport {
                    endpoint: name.to_string(),
                    status: status.state.to_string(),
                    reason: status.reason.clone(),
                })
                .collect(),
            applied_revision: report.applied,
        };
        let sent: Vec<(String, (Status, Endpoint))> =
            due.into_iter().map(|(n, e)| (n.clone(), e.clone())).collect();
        let result = send(&controllers, &mut client, &mut next_url, request).await;
        match result {
            Ok(answer) => {
                if last_error.take().is_some() {
                    info!("endpoint statuses reach the controllers again");
                }
                for (name, entry) in sent {
                    debug!(endpoint = %name, status = %entry.0.state, "status reported");
                    acked.insert(name, entry);
                }
                wanted = answer.wanted.into_iter().collect();
                sent_applied = report.applied;
                backoff = Duration::from_millis(200);
            }
            Err(Failure::Unsupported(why)) => {
                if last_error.as_deref() != Some(why.as_str()) {
                    info!("the controllers do not take endpoint status reports ({why}): an older version? statuses stay pending until they are upgraded");
                    last_error = Some(why);
                }
                tokio::time::sleep(UNSUPPORTED_RETRY).await;
            }
            Err(Failure::Other(why)) => {
                if last_error.as_deref() != Some(why.as_str()) {
                    warn!("cannot report endpoint statuses: {why}; retrying");
                    last_error = Some(why);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

enum Failure {
    Unsupported(String),
    Other(String),
}

/// One report to the controller `client` is connected to (or the next URL).
async fn send(
    controllers: &Controllers,
    client: &mut Option<pb::overlay_client::OverlayClient<tonic::transport::Channel>>,
    next_url: &mut usize,
    request: pb::StatusReport,
) -> Result<pb::StatusReportResponse, Failure> {
    let urls = &controllers.urls;
    if urls.is_empty() {
        return Err(Failure::Other("no controller URL".into()));
    }
    let c = match client {
        Some(c) => c,
        None => {
            let url = &urls[*next_url % urls.len()];
            *next_url += 1;
            client.insert(controllers.connect(url).await.map_err(Failure::Other)?)
        }
    };
    let mut req = tonic::Request::new(request);
    req.set_timeout(RPC_TIMEOUT);
    match c.report_status(req).await {
        Ok(answer) => Ok(answer.into_inner()),
        Err(status) => {
            *client = None;
            if status.code() == tonic::Code::Unimplemented {
                Err(Failure::Unsupported(status.message().to_string()))
            } else {
                Err(Failure::Other(status.message().to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use overlay_model::EndpointState;

    fn ep(name: &str, ip: &str) -> Endpoint {
        Endpoint {
            name: name.into(),
            host: "h1".into(),
            attachments: vec![overlay_model::Attachment {
                network: "n".into(),
                interface: "eth0".into(),
                ip: ip.parse().unwrap(),
                mac: overlay_model::Mac::from_counter(1),
                aliases: vec![],
            }],
        }
    }

    fn st(state: EndpointState) -> Status {
        Status { state, reason: String::new() }
    }

    #[test]
    fn only_what_changed_or_was_asked_for_goes_out() {
        let ready = (st(EndpointState::Ready), ep("a", "10.0.0.2"));
        let report = PassReport {
            revision: 5,
            applied: 5,
            statuses: [
                ("a".to_string(), ready.clone()),
                ("b".to_string(), (st(EndpointState::Ready), ep("b", "10.0.0.3"))),
            ]
            .into(),
        };
        let names = |v: Vec<(&String, &(Status, Endpoint))>| -> Vec<String> {
            v.into_iter().map(|(n, _)| n.clone()).collect()
        };
        let none = BTreeSet::new();
        assert_eq!(names(to_send(&report, &BTreeMap::new(), &none)), ["a", "b"]);
        let acked: BTreeMap<_, _> = report.statuses.clone();
        assert!(to_send(&report, &acked, &none).is_empty());
        // Asked for again by the controller (say, its report was stale).
        assert_eq!(names(to_send(&report, &acked, &["b".to_string()].into())), ["b"]);
        // The endpoint changed upstream (same status): its new version needs a report.
        let mut changed = report.clone();
        changed.statuses.insert("a".into(), (st(EndpointState::Ready), ep("a", "10.0.0.9")));
        assert_eq!(names(to_send(&changed, &acked, &none)), ["a"]);
        // The status changed.
        let mut failed = report.clone();
        failed.statuses.insert(
            "b".into(),
            (Status { state: EndpointState::Failed, reason: "x".into() }, ep("b", "10.0.0.3")),
        );
        assert_eq!(names(to_send(&failed, &acked, &none)), ["b"]);
    }
}
