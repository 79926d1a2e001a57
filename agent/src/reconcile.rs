//! One level-triggered pass: observe the kernel, plan against the desired state, apply.
//! The caller runs it on every catalog change and every couple of seconds, so anything
//! changed by hand or left half-done by a failure converges on the next pass.
//!
//! Fail closed: the host firewall is applied before anything else, and when it cannot
//! be (no `nft`, or nft fails) the pass holds back every action that would attach an
//! endpoint or connect a network ([`attaches`]) and reports why in [`Pass::firewall`].
//! What is already attached stays as it is (its rules are still in the kernel unless
//! someone removed them); nothing new appears unisolated.

use anyhow::Result;
use tracing::{debug, info, warn};

use crate::apply::{apply, ApplyError};
use crate::desired::HostDesired;
use crate::firewall;
use crate::nl::Nl;
use crate::observe::observe;
use crate::plan::{plan, Action, Ns};
use crate::store::Store;

/// What one pass did.
#[derive(Debug)]
pub struct Pass {
    /// Every planned action, including held-back ones.
    pub actions: Vec<Action>,
    pub errors: Vec<ApplyError>,
    /// Actions not applied because the firewall is not in place.
    pub held_back: Vec<Action>,
    /// How many actions were applied (the firewall's included when it succeeded).
    pub applied: usize,
    /// Whether the host firewall is in place, or why not.
    pub firewall: Result<(), String>,
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

/// Installs `ruleset` (the blocking `nft` run off the async threads).
async fn install(ruleset: &firewall::Ruleset) -> Result<(), String> {
    let ruleset = ruleset.clone();
    tokio::task::spawn_blocking(move || firewall::install(&ruleset))
        .await
        .map_err(|e| format!("firewall task: {e}"))?
}

/// Observes, plans and applies once: the firewall first, then the rest (without what
/// [`attaches`] if the firewall failed).
pub async fn reconcile(host: &Nl, store: &Store, desired: &HostDesired) -> Result<Pass> {
    let observed = observe(host, store).await?;
    for name in desired.endpoints.keys().filter(|n| observed.foreign.contains(*n)) {
        warn!(endpoint = %name, "namespace {name} exists and was not created by overlay-agent; leaving it alone");
    }
    for name in &desired.unsupported {
        warn!(network = %name, "network {name} is --encrypted but this agent has no host certificate (tls_ca, tls_cert, tls_key); not carrying it");
    }
    let actions = plan(desired, &observed);
    let (ruleset, _, _) = split(&actions, false);
    let firewall = match ruleset {
        Some(r) => install(r).await,
        None => Ok(()),
    };
    let (_, run, held_back) = split(&actions, firewall.is_err());
    // While the firewall fails every pass plans the same again: the caller reports the
    // failure once, so these go to debug.
    for a in actions.iter().filter(|a| !run.contains(a)) {
        let network = network_of(desired, a).unwrap_or("");
        match (a, &firewall) {
            (Action::ApplyFirewall { .. }, Ok(())) => {
                info!(endpoint = a.netns().unwrap_or(""), network, "plan: {a}")
            }
            _ => debug!(endpoint = a.netns().unwrap_or(""), network, "held back: {a}"),
        }
    }
    for a in &run {
        let network = network_of(desired, a).unwrap_or("");
        info!(endpoint = a.netns().unwrap_or(""), network, "plan: {a}");
    }
    let errors = apply(host, store, &run).await;
    let applied = run.len() + usize::from(ruleset.is_some() && firewall.is_ok());
    Ok(Pass { actions, errors, held_back, applied, firewall })
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
}
