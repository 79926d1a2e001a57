//! Level-triggered passes: observe the kernel, plan against the desired state, apply.
//! The caller runs one on every catalog change and every couple of seconds, so anything
//! changed by hand or left half-done by a failure converges on a later pass.
//!
//! A [`Reconciler`] keeps what one pass must know of the previous ones:
//! * failed actions, retried with exponential backoff (a conflicting route must not be
//!   re-planned and re-logged every second) and reported once per change of error;
//! * conditions worth a warning (a namespace that cannot be read, a foreign device under
//!   one of our names, …), logged when they appear, change or go away — not every pass;
//! * the remote neighbours the user-space data plane was given for each TAP uplink, so
//!   the plan can announce the new ones (the kernel keeps that for VXLAN devices).
//!
//! One failing namespace or action never stops the rest of a pass.
//!
//! Fail closed: the host firewall is applied before anything else, and when it cannot
//! be (no `nft`, or nft fails) the pass holds back every action that would attach an
//! endpoint or connect a network ([`attaches`]) and reports why in [`Pass::firewall`].
//! What is already attached stays as it is (its rules are still in the kernel unless
//! someone removed them); nothing new appears unisolated.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use overlay_model::Mac;
use tracing::{debug, info, warn};

use crate::apply::{apply, run_nft, ApplyError};
use crate::desired::{HostDesired, Uplink};
use crate::entries::EntryWatch;
use crate::firewall;
use crate::nl::Nl;
use crate::observe::{observe_host_links, observe_with_links, FirewallCache};
use crate::plan::{fold, in_the_way, plan, plan_forwarding, Action, Ns};
use crate::store::Store;

/// The longest a failing action waits before it is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What one pass did.
#[derive(Debug)]
pub struct Pass {
    /// The actions tried this pass.
    pub actions: Vec<Action>,
    pub errors: Vec<ApplyError>,
    /// Actions planned but not tried: they failed recently and are backing off.
    pub deferred: Vec<Action>,
    /// Actions not tried because the firewall is not in place.
    pub held_back: Vec<Action>,
    /// How many actions were applied (the firewall's included when it succeeded).
    pub applied: usize,
    /// Whether the host firewall is in place, or why not.
    pub firewall: Result<(), String>,
    // --- Endpoint status (issue 15): what the pass saw, for the endpoints' statuses.
    /// Namespaces with a wanted endpoint's name that are not ours.
    pub foreign: BTreeSet<String>,
    /// Namespaces of ours that could not be read, with why.
    pub unreadable: BTreeMap<String, String>,
    /// Why each deferred action failed last (by its `Display`).
    pub deferred_errors: BTreeMap<String, String>,
    /// The marks (the alias of `lo`, see [`crate::marks`]) of the namespaces of ours
    /// that were observed, by name.
    pub marks: BTreeMap<String, String>,
}

impl Default for Pass {
    fn default() -> Pass {
        Pass {
            actions: Vec::new(),
            errors: Vec::new(),
            deferred: Vec::new(),
            held_back: Vec::new(),
            applied: 0,
            firewall: Ok(()),
            foreign: BTreeSet::new(),
            unreadable: BTreeMap::new(),
            deferred_errors: BTreeMap::new(),
            marks: BTreeMap::new(),
        }
    }
}

/// One action that keeps failing.
#[derive(Debug)]
struct Failure {
    error: String,
    attempts: u32,
    retry_at: Instant,
}

/// How long to wait after the `attempts`th failure in a row: 1 s, 2 s, 4 s, … 60 s.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
}

/// Memory between passes; see the module documentation.
#[derive(Debug, Default)]
pub struct Reconciler {
    failures: BTreeMap<String, Failure>,
    /// Condition key -> message, as last reported.
    conditions: BTreeMap<String, String>,
    tap_neigh: BTreeMap<String, BTreeMap<Ipv4Addr, Mac>>,
    /// Why announcements last failed (their root cause), while they do.
    announce_error: Option<String>,
    /// Takes back the namespaces marked as this host's that the record lost.
    claimer: crate::marks::Claimer,
    /// The host's forwarding entries kept current by notifications; `None`: dumped on
    /// every pass.
    entries: Option<EntryWatch>,
    /// The host firewall, read again only when nftables changed.
    firewall: FirewallCache,
}

/// The network an action's device belongs to, for logging.
fn network_of<'a>(desired: &'a HostDesired, action: &Action) -> Option<&'a str> {
    let dev = match action {
        Action::CreateBridge { name, .. } | Action::CreateVxlan { name, .. } => name,
        Action::CreateVeth { bridge, .. } => bridge,
        Action::DeleteLink { name, .. } => name,
        Action::SetMtu { dev, .. }
        | Action::SetMac { dev, .. }
        | Action::SetMaster { dev, .. }
        | Action::SetAlias { dev }
        | Action::SetUp { dev, .. }
        | Action::AddAddress { dev, .. }
        | Action::DelAddress { dev, .. }
        | Action::AddFdb { dev, .. }
        | Action::DelFdb { dev, .. }
        | Action::AddNeigh { dev, .. }
        | Action::DelNeigh { dev, .. } => dev,
        _ => return None,
    };
    desired
        .networks
        .values()
        .find(|n| &n.bridge == dev || &n.uplink == dev)
        .map(|n| n.name.as_str())
}

/// Whether `action` would make an endpoint or a network reachable: a namespace, bridge,
/// uplink or veth appearing, a device plugged into a bridge or brought up on the host,
/// or the host starting to route. Removals, attributes, addresses, forwarding entries
/// and routes inside namespaces are not.
pub fn attaches(action: &Action) -> bool {
    matches!(
        action,
        Action::CreateNamespace { .. }
            | Action::CreateBridge { .. }
            | Action::CreateVxlan { .. }
            | Action::CreateVeth { .. }
            | Action::SetMaster { .. }
            | Action::SetUp { ns: Ns::Host, .. }
            | Action::SetForwarding { ns: Ns::Host, on: true }
    )
}

/// The device an action works on, with its namespace.
fn device(action: &Action) -> Option<(Ns, &str)> {
    match action {
        Action::DeleteLink { ns, name } => Some((ns.clone(), name)),
        Action::SetMtu { ns, dev, .. }
        | Action::SetMac { ns, dev, .. }
        | Action::SetUp { ns, dev }
        | Action::AddAddress { ns, dev, .. }
        | Action::DelAddress { ns, dev, .. } => Some((ns.clone(), dev)),
        Action::SetMaster { dev, .. }
        | Action::AddFdb { dev, .. }
        | Action::DelFdb { dev, .. }
        | Action::AddNeigh { dev, .. }
        | Action::DelNeigh { dev, .. } => Some((Ns::Host, dev)),
        _ => None,
    }
}

/// Splits a plan into (the firewall action, if any; what may run; what is held back).
/// With the firewall in place (`fail_closed` false) nothing is held back; without it,
/// what [`attaches`] is, and so is everything that works in a namespace or on a device
/// that one of those would have created (it could only fail).
pub fn split(
    actions: &[Action],
    fail_closed: bool,
) -> (Option<&firewall::Ruleset>, Vec<Action>, Vec<Action>) {
    let mut namespaces = std::collections::BTreeSet::new();
    let mut devices = std::collections::BTreeSet::new();
    for a in actions.iter().filter(|a| fail_closed && attaches(a)) {
        match a {
            Action::CreateNamespace { name } => {
                namespaces.insert(name.as_str());
            }
            Action::CreateBridge { name, .. } | Action::CreateVxlan { name, .. } => {
                devices.insert((Ns::Host, name.as_str()));
            }
            Action::CreateVeth { netns, host_name, inside, .. } => {
                devices.insert((Ns::Host, host_name.as_str()));
                devices.insert((Ns::Netns(netns.clone()), inside.as_str()));
            }
            _ => {}
        }
    }
    let depends = |a: &Action| {
        a.netns().is_some_and(|n| namespaces.contains(n))
            || device(a).is_some_and(|d| devices.contains(&d))
    };
    let mut ruleset = None;
    let (mut run, mut held) = (Vec::new(), Vec::new());
    for a in actions {
        match a {
            Action::ApplyFirewall { ruleset: r } => ruleset = Some(r),
            a if fail_closed && (attaches(a) || depends(a)) => held.push(a.clone()),
            a => run.push(a.clone()),
        }
    }
    (ruleset, run, held)
}

/// Conditions worth a warning in this observation, keyed so that a change shows.
fn conditions(
    desired: &HostDesired,
    observed: &crate::observed::ObservedHost,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in desired.endpoints.keys().filter(|n| observed.foreign.contains(*n)) {
        out.insert(
            format!("foreign namespace {name}"),
            format!(
                "namespace {name} exists and was not created by overlay-agent; leaving it alone"
            ),
        );
    }
    for name in &desired.unsupported {
        out.insert(
            format!("unsupported network {name}"),
            format!("network {name} is --encrypted but this agent has no host certificate (tls_ca, tls_cert, tls_key); not carrying it"),
        );
    }
    for (name, error) in &observed.unreadable {
        out.insert(
            format!("unreadable namespace {name}"),
            format!("namespace {name} cannot be read ({error}); leaving it as it is"),
        );
    }
    for dev in in_the_way(desired, observed) {
        out.insert(
            format!("device in the way {dev}"),
            format!("device {dev} has a name overlay-agent needs but was not made by it; leaving it alone"),
        );
    }
    out
}

impl Reconciler {
    pub fn new() -> Reconciler {
        Reconciler::default()
    }

    /// Passes take the host's forwarding entries from `entries` instead of dumping
    /// them every time (see [`crate::entries`]).
    pub fn with_entries(entries: EntryWatch) -> Reconciler {
        Reconciler { entries: Some(entries), ..Reconciler::default() }
    }

    /// How many times the forwarding entries were dumped (`None`: on every pass).
    pub fn entry_dumps(&self) -> Option<u64> {
        self.entries.as_ref().map(EntryWatch::dumps)
    }

    /// Actions that failed and are not yet fixed.
    pub fn failing(&self) -> usize {
        self.failures.len()
    }

    /// Logs the conditions that appeared, changed or went away since the last report.
    fn report(&mut self, now: BTreeMap<String, String>) {
        for (key, message) in &now {
            if self.conditions.get(key) != Some(message) {
                warn!(condition = %key, "{message}");
            }
        }
        for key in self.conditions.keys().filter(|k| !now.contains_key(*k)) {
            info!(condition = %key, "resolved: {key}");
        }
        self.conditions = now;
    }

    /// Announcements are not retried, but a cause that makes them all fail (no
    /// CAP_NET_RAW, say) must not go unnoticed: warned once per change of cause.
    fn report_announcements(&mut self, tried: &[Action], errors: &[ApplyError]) {
        let failed = errors.iter().find(|e| e.action.is_best_effort());
        let cause = failed.map(|e| e.error.root_cause().to_string());
        let any_ok = tried.iter().filter(|a| a.is_best_effort()).count()
            > errors.iter().filter(|e| e.action.is_best_effort()).count();
        match cause {
            Some(cause) if self.announce_error.as_ref() != Some(&cause) => {
                warn!("cannot send gratuitous ARP announcements ({cause}): peers of new endpoints wait for their own ARP retries");
                self.announce_error = Some(cause);
            }
            None if any_ok && self.announce_error.take().is_some() => {
                info!("gratuitous ARP announcements work again");
            }
            _ => {}
        }
    }

    /// Observes, plans and applies once, trying only the actions that are not backing
    /// off. An error means nothing could be observed (so nothing was planned, or only
    /// the first stage). Two stages: [`plan_forwarding`] from the host's devices alone,
    /// applied before the endpoint namespaces are observed (what a peer waiting for a
    /// new remote endpoint needs), then the full [`plan`].
    pub async fn pass(&mut self, host: &Nl, store: &Store, desired: &HostDesired) -> Result<Pass> {
        // Local state is disposable: what the record lost, the kernel's marks tell.
        let endpoints = desired.endpoints.keys().map(String::as_str).collect();
        self.claimer.claim(store, &desired.owner, &endpoints).await;
        let observed = async {
            let mut links = observe_host_links(host, self.entries.as_mut()).await?;
            // Stage 1: peers' forwarding and announcements, from the host's devices.
            let fast = plan_forwarding(desired, &links, &self.tap_neigh);
            let (tried, errors, deferred) = self.apply_tracked(host, store, desired, fast).await;
            let failed: BTreeSet<String> = errors.iter().map(|e| e.action.to_string()).collect();
            for a in tried.iter().filter(|a| !failed.contains(&a.to_string())) {
                fold(&mut links, a);
            }
            let mut observed = observe_with_links(store, links, &mut self.firewall).await?;
            // What stage 1 announced need not be announced again.
            observed.tap_neigh = desired
                .networks
                .values()
                .filter(|n| self.tap_neigh.contains_key(&n.uplink))
                .map(|n| (n.uplink.clone(), n.neigh.clone()))
                .collect();
            anyhow::Ok((observed, tried, errors, deferred))
        };
        let (observed, mut tried, mut errors, mut deferred) = match observed.await {
            Ok(o) => o,
            Err(e) => {
                let mut now = self.conditions.clone();
                now.insert("observe".into(), format!("cannot observe this host: {e:#}"));
                self.report(now);
                return Err(e);
            }
        };
        self.report(conditions(desired, &observed));

        // Stage 2: everything else, the firewall first; without it nothing attaches.
        let actions = plan(desired, &observed);
        let (ruleset, _, _) = split(&actions, false);
        let firewall = match ruleset {
            Some(r) => run_nft(firewall::install, r).await.map_err(|e| format!("{e:#}")),
            None => Ok(()),
        };
        let firewall_applied = ruleset.is_some() && firewall.is_ok();
        if firewall_applied {
            if let Some(a) = actions.iter().find(|a| matches!(a, Action::ApplyFirewall { .. })) {
                info!("plan: {a}");
            }
        }
        let (_, run, held_back) = split(&actions, firewall.is_err());
        // While the firewall fails every pass plans the same again: the caller reports
        // the failure once, so these go to debug.
        for a in &held_back {
            let network = network_of(desired, a).unwrap_or("");
            debug!(endpoint = a.netns().unwrap_or(""), network, "held back: {a}");
        }
        let (t, e, d) = self.apply_tracked(host, store, desired, run).await;
        tried.extend(t);
        errors.extend(e);
        deferred.extend(d);

        self.tap_neigh = desired
            .networks
            .values()
            .filter(|n| matches!(n.uplink_kind, Uplink::Tap { .. }))
            .map(|n| (n.uplink.clone(), n.neigh.clone()))
            .collect();
        // Forget failures of actions no longer planned: fixed some other way.
        let planned: BTreeSet<String> =
            tried.iter().chain(&deferred).chain(&held_back).map(Action::to_string).collect();
        self.failures.retain(|key, _| planned.contains(key));
        let applied = tried.len() + usize::from(firewall_applied);
        let deferred_errors = deferred
            .iter()
            .filter_map(|a| {
                let key = a.to_string();
                let error = self.failures.get(&key)?.error.clone();
                Some((key, error))
            })
            .collect();
        let foreign =
            desired.endpoints.keys().filter(|n| observed.foreign.contains(*n)).cloned().collect();
        Ok(Pass {
            actions: tried,
            errors,
            deferred,
            held_back,
            applied,
            firewall,
            foreign,
            unreadable: observed.unreadable.clone(),
            deferred_errors,
            marks: observed
                .namespaces
                .iter()
                .filter_map(|(name, ns)| {
                    let alias = ns.as_ref()?.links.get("lo")?.alias.clone()?;
                    Some((name.clone(), alias))
                })
                .collect(),
        })
    }

    /// Applies the `actions` that are not backing off; returns (tried, their errors,
    /// deferred), after recording failures and recoveries.
    async fn apply_tracked(
        &mut self,
        host: &Nl,
        store: &Store,
        desired: &HostDesired,
        actions: Vec<Action>,
    ) -> (Vec<Action>, Vec<ApplyError>, Vec<Action>) {
        let now = Instant::now();
        let (due, deferred): (Vec<Action>, Vec<Action>) = actions
            .into_iter()
            .partition(|a| self.failures.get(&a.to_string()).is_none_or(|f| now >= f.retry_at));
        for a in &due {
            let network = network_of(desired, a).unwrap_or("");
            if a.is_best_effort() {
                debug!(endpoint = a.netns().unwrap_or(""), network, "plan: {a}");
            } else {
                info!(endpoint = a.netns().unwrap_or(""), network, "plan: {a}");
            }
        }
        for a in &deferred {
            debug!(endpoint = a.netns().unwrap_or(""), "backing off: {a}");
        }
        let errors = apply(host, store, &due).await;
        let failed: BTreeMap<String, &ApplyError> =
            errors.iter().map(|e| (e.action.to_string(), e)).collect();
        for a in due.iter().filter(|a| !a.is_best_effort()) {
            let key = a.to_string();
            let endpoint = a.netns().unwrap_or("");
            let network = network_of(desired, a).unwrap_or("");
            match failed.get(&key) {
                Some(e) => {
                    let error = format!("{:#}", e.error);
                    let attempts = self.failures.get(&key).map_or(0, |f| f.attempts) + 1;
                    let same = self.failures.get(&key).is_some_and(|f| f.error == error);
                    let wait = backoff(attempts);
                    if same {
                        debug!(endpoint, network, attempts, "{key} failed again: {error}");
                    } else {
                        warn!(endpoint, network, attempts, retry_in = ?wait, "{key} failed: {error}");
                    }
                    self.failures.insert(key, Failure { error, attempts, retry_at: now + wait });
                }
                None => {
                    if let Some(f) = self.failures.remove(&key) {
                        info!(
                            endpoint,
                            network,
                            attempts = f.attempts,
                            "{key} succeeded after failing"
                        );
                    }
                }
            }
        }
        for e in errors.iter().filter(|e| e.action.is_best_effort()) {
            debug!("{}: {:#}", e.action, e.error);
        }
        self.report_announcements(&due, &errors);
        (due, errors, deferred)
    }
}

/// One pass with no memory of earlier ones (tests, one-shot tools).
pub async fn reconcile(host: &Nl, store: &Store, desired: &HostDesired) -> Result<Pass> {
    Reconciler::new().pass(host, store, desired).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::desired::tests::catalog;
    use crate::desired::{desired_for_host, LocalHost};
    use crate::observed::ObservedHost;

    #[test]
    fn without_a_firewall_nothing_is_attached() {
        let local = LocalHost {
            name: "h2".into(),
            underlay_ip: "192.0.2.2".parse().unwrap(),
            can_encrypt: false,
        };
        let d = desired_for_host(&catalog(), &local);
        let actions = plan(&d, &ObservedHost::default());
        assert!(matches!(actions[0], Action::ApplyFirewall { .. }), "the firewall goes first");

        let (ruleset, run, held) = split(&actions, false);
        assert!(ruleset.is_some());
        assert!(held.is_empty());
        assert_eq!(run.len(), actions.len() - 1);

        let (_, run, held) = split(&actions, true);
        assert!(!run.iter().any(attaches));
        // Nor anything inside the namespaces or on the devices that were not created.
        assert!(run.iter().all(|a| a.netns().is_none()), "{run:?}");
        assert!(
            !run.iter()
                .any(|a| matches!(a, Action::AddAddress { dev, .. } if dev.starts_with("ovb-"))),
            "{run:?}"
        );
        // Nothing that creates or plugs in: no namespace, bridge, uplink or veth, no
        // host routing.
        for a in &run {
            assert!(
                !matches!(
                    a,
                    Action::CreateNamespace { .. }
                        | Action::CreateBridge { .. }
                        | Action::CreateVxlan { .. }
                        | Action::CreateVeth { .. }
                        | Action::SetMaster { .. }
                        | Action::SetForwarding { ns: Ns::Host, on: true }
                ),
                "{a}"
            );
        }
        let created: Vec<&str> = held
            .iter()
            .filter_map(|a| match a {
                Action::CreateNamespace { name } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(created, ["api", "db"]);
        assert!(held.iter().any(|a| matches!(a, Action::SetForwarding { ns: Ns::Host, on: true })));
        // Removals still run (nothing that is wanted gone is kept alive).
        assert!(!attaches(&Action::DeleteNamespace { name: "x".into() }));
        assert!(!attaches(&Action::SetForwarding { ns: Ns::Host, on: false }));
        assert!(!attaches(&Action::SetUp { ns: Ns::Netns("x".into()), dev: "lo".into() }));
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(0).as_secs(), 1);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
