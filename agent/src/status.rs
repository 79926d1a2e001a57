//! The status of each of this host's endpoints after a reconcile pass (pure).
//!
//! An endpoint is `ready` when the pass left nothing undone for it: its namespace is
//! ours, every attachment is one this host can carry, no action for it (or for its
//! networks' devices) failed, is backing off or is held back, and the DNS at
//! 127.0.0.11 serves it. Otherwise it is `failed` with the first reason found, worded
//! for the user who runs `overlayctl endpoint ls`. Endpoints this host leaves out on
//! purpose (a container's endpoint before its namespace is mounted) get no status: they
//! stay `pending`.
//!
//! The agent reports these to the controller ([`crate::report`]); the controller then
//! also waits for the other hosts before it shows `ready` (see its `status` module).

use std::collections::{BTreeMap, BTreeSet};

use overlay_model::{Catalog, EndpointState};

use crate::desired::{EndpointDesired, HostDesired};
use crate::plan::{Action, Ns};
use crate::reconcile::Pass;

/// An endpoint's status as this host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: EndpointState,
    pub reason: String,
}

impl Status {
    fn ready() -> Status {
        Status { state: EndpointState::Ready, reason: String::new() }
    }

    fn failed(reason: impl Into<String>) -> Status {
        Status { state: EndpointState::Failed, reason: reason.into() }
    }
}

/// What the DNS side did after the pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsOutcome {
    /// Endpoints whose DNS server runs.
    pub served: BTreeSet<String>,
    /// Endpoints whose server could not start, with why.
    pub failed: BTreeMap<String, String>,
    /// Why no server could be started at all (the daemon that holds them is unreachable).
    pub unavailable: Option<String>,
}

/// The reason every endpoint of a host shows when its foreign namespace is in the way.
pub fn foreign_reason(name: &str) -> String {
    format!("namespace {name} exists and was not created by overlay-agent; it is left alone (remove it, or give the endpoint another name)")
}

/// The statuses of the catalog's endpoints on `host` after `pass` (which reconciled to
/// `desired`). `held` are endpoints left out of `desired` on purpose (no status).
/// `firewall_problem` is what a held-back action waits for.
pub fn endpoint_statuses(
    catalog: &Catalog,
    host: &str,
    desired: &HostDesired,
    held: &BTreeSet<String>,
    pass: &Pass,
    dns: &DnsOutcome,
) -> BTreeMap<String, Status> {
    let mut out = BTreeMap::new();
    for e in catalog.endpoints.values().filter(|e| e.host == host) {
        if held.contains(&e.name) {
            continue;
        }
        let status = one(e, desired, pass, dns);
        out.insert(e.name.clone(), status);
    }
    out
}

fn one(
    e: &overlay_model::Endpoint,
    desired: &HostDesired,
    pass: &Pass,
    dns: &DnsOutcome,
) -> Status {
    let name = e.name.as_str();
    if pass.foreign.contains(name) {
        return Status::failed(foreign_reason(name));
    }
    if let Some(why) = pass.unreadable.get(name) {
        return Status::failed(format!("namespace {name} cannot be read ({why})"));
    }
    let Some(ed) = desired.endpoints.get(name) else {
        return Status::failed(rejected(desired, name, None).unwrap_or_else(|| {
            format!("endpoint {name} cannot be realized on this host (see the agent's log)")
        }));
    };
    for a in &e.attachments {
        if ed.interfaces.iter().any(|i| i.name == a.interface && i.network == a.network) {
            continue;
        }
        if desired.unsupported.contains(&a.network) {
            return Status::failed(format!(
                "network {} is --encrypted but this host's agent has no certificate of its own (tls_ca with tls_cert and tls_key, or join_token): it cannot carry it",
                a.network
            ));
        }
        return Status::failed(rejected(desired, name, Some(&a.network)).unwrap_or_else(|| {
            format!("network {} cannot be carried on this host (see the agent's log)", a.network)
        }));
    }
    let ours = |a: &Action| concerns(a, ed, desired);
    if let Some(err) =
        pass.errors.iter().find(|err| ours(&err.action) && !err.action.is_best_effort())
    {
        return Status::failed(format!("{}: {:#}", describe(&err.action), err.error));
    }
    if let Some(a) = pass.deferred.iter().find(|a| ours(a) && !a.is_best_effort()) {
        let why = pass.deferred_errors.get(&a.to_string()).map_or("it failed", String::as_str);
        return Status::failed(format!("{}: {why} (retried with backoff)", describe(a)));
    }
    if pass.held_back.iter().any(ours) {
        let why = pass.firewall.as_ref().err().map_or("unknown", String::as_str);
        return Status::failed(format!(
            "host firewall cannot be applied ({why}); no endpoint is attached until it can"
        ));
    }
    if dns.served.contains(name) {
        return Status::ready();
    }
    match (dns.failed.get(name), &dns.unavailable) {
        (Some(why), _) => Status::failed(format!("DNS server at 127.0.0.11: {why}")),
        (None, Some(why)) => Status::failed(format!("DNS server at 127.0.0.11: {why}")),
        (None, None) => Status::failed("DNS server at 127.0.0.11 is not running yet"),
    }
}

/// The line of `desired.rejected` about endpoint `name` (in `network`, if given).
fn rejected(desired: &HostDesired, name: &str, network: Option<&str>) -> Option<String> {
    let quoted = format!("{name:?}");
    let lines = desired.rejected.iter();
    match network {
        None => lines.clone().find(|l| l.contains(&quoted)).cloned(),
        Some(n) => {
            let net = format!("network {n:?}");
            let in_net = format!("network {n}");
            lines
                .clone()
                .find(|l| l.contains(&quoted) && l.contains(&in_net))
                .or_else(|| lines.clone().find(|l| l.starts_with(&net)))
                .cloned()
        }
    }
}

/// Whether action `a` works on endpoint `ed`: in its namespace, on the host side of one
/// of its veths, or on a device of one of its networks (bridge, uplink).
pub fn concerns(a: &Action, ed: &EndpointDesired, desired: &HostDesired) -> bool {
    if a.netns() == Some(ed.name.as_str()) {
        return true;
    }
    let Some(dev) = host_device(a) else { return false };
    ed.interfaces.iter().any(|i| {
        i.host_name == dev
            || i.peer_tmp == dev
            || desired.networks.get(&i.network).is_some_and(|n| n.bridge == dev || n.uplink == dev)
    })
}

/// The host device an action works on, if any.
fn host_device(a: &Action) -> Option<&str> {
    match a {
        Action::CreateBridge { name, .. } | Action::CreateVxlan { name, .. } => Some(name),
        Action::DeleteLink { ns: Ns::Host, name } => Some(name),
        Action::SetMtu { ns: Ns::Host, dev, .. }
        | Action::SetMac { ns: Ns::Host, dev, .. }
        | Action::SetUp { ns: Ns::Host, dev }
        | Action::AddAddress { ns: Ns::Host, dev, .. }
        | Action::DelAddress { ns: Ns::Host, dev, .. }
        | Action::SetMaster { dev, .. }
        | Action::SetAlias { dev }
        | Action::AddFdb { dev, .. }
        | Action::DelFdb { dev, .. }
        | Action::AddNeigh { dev, .. }
        | Action::DelNeigh { dev, .. } => Some(dev),
        _ => None,
    }
}

/// An action in a user's words.
pub fn describe(a: &Action) -> String {
    match a {
        Action::CreateNamespace { name } => format!("creating namespace {name}"),
        Action::MarkNamespace { name, .. } => {
            format!("marking namespace {name} as overlay-agent's")
        }
        Action::CreateVeth { inside, netns, .. } => {
            format!("creating interface {inside} in {netns}")
        }
        Action::AddRoute { route, .. } => format!("route {} via {}", route.dest, route.via),
        Action::DelRoute { route, .. } => {
            format!("removing route {} via {}", route.dest, route.via)
        }
        Action::AddAddress { dev, addr, .. } => format!("address {addr} on {dev}"),
        Action::CreateBridge { name, .. } => format!("creating bridge {name}"),
        Action::CreateVxlan { name, .. } => format!("creating VXLAN device {name}"),
        Action::WriteResolvConf { netns } => format!("writing /etc/netns/{netns}/resolv.conf"),
        Action::SetSysctls { netns, .. } => format!("setting sysctls in {netns}"),
        Action::SetForwarding { ns, on } => format!("setting ip_forward={} in {ns}", u8::from(*on)),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::apply::ApplyError;
    use crate::desired::tests::catalog;
    use crate::desired::RouteSpec;
    use crate::desired::{desired_for_host, LocalHost};

    fn local() -> LocalHost {
        LocalHost {
            name: "h2".into(),
            underlay_ip: "192.0.2.2".parse().unwrap(),
            can_encrypt: false,
        }
    }

    fn served(names: &[&str]) -> DnsOutcome {
        DnsOutcome { served: names.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn ready_when_nothing_is_left_undone() {
        let c = catalog();
        let d = desired_for_host(&c, &local());
        let names: Vec<&str> = d.endpoints.keys().map(String::as_str).collect();
        assert_eq!(names, ["api", "db"]);
        let s =
            endpoint_statuses(&c, "h2", &d, &BTreeSet::new(), &Pass::default(), &served(&names));
        assert!(s.values().all(|s| s.state == EndpointState::Ready), "{s:?}");
        // Without DNS it is not.
        let s =
            endpoint_statuses(&c, "h2", &d, &BTreeSet::new(), &Pass::default(), &served(&["db"]));
        assert_eq!(s["api"].state, EndpointState::Failed);
        assert!(s["api"].reason.contains("DNS"), "{:?}", s["api"]);
        // A held container endpoint has no status at all.
        let held = BTreeSet::from(["api".to_string()]);
        let s = endpoint_statuses(&c, "h2", &d, &held, &Pass::default(), &served(&names));
        assert!(!s.contains_key("api"));
    }

    #[test]
    fn each_cause_is_named() {
        let c = catalog();
        let d = desired_for_host(&c, &local());
        let dns = served(&["api", "db"]);
        let none = BTreeSet::new();
        // A foreign namespace in the way.
        let pass = Pass { foreign: ["api".to_string()].into(), ..Pass::default() };
        let s = endpoint_statuses(&c, "h2", &d, &none, &pass, &dns);
        assert_eq!(s["api"].reason, foreign_reason("api"));
        assert!(s["api"]
            .reason
            .starts_with("namespace api exists and was not created by overlay-agent"));
        assert_eq!(s["db"].state, EndpointState::Ready);
        // A route the kernel refuses.
        let route =
            RouteSpec { dest: "10.9.0.0/16".parse().unwrap(), via: "10.0.1.9".parse().unwrap() };
        let failed = Action::AddRoute { netns: "db".into(), route };
        let pass = Pass {
            errors: vec![ApplyError {
                action: failed,
                error: anyhow::anyhow!("Network is unreachable (os error 101)"),
            }],
            ..Pass::default()
        };
        let s = endpoint_statuses(&c, "h2", &d, &none, &pass, &dns);
        assert_eq!(
            s["db"].reason,
            "route 10.9.0.0/16 via 10.0.1.9: Network is unreachable (os error 101)"
        );
        assert_eq!(s["api"].state, EndpointState::Ready);
        // The host firewall failing holds back the namespace.
        let pass = Pass {
            held_back: vec![Action::CreateNamespace { name: "api".into() }],
            firewall: Err("cannot run nft: No such file or directory (os error 2)".into()),
            ..Pass::default()
        };
        let s = endpoint_statuses(&c, "h2", &d, &none, &pass, &dns);
        assert!(
            s["api"].reason.starts_with("host firewall cannot be applied (cannot run nft"),
            "{:?}",
            s["api"]
        );
        // A network device failing concerns every endpoint of that network here.
        let bridge = d.networks.values().next().unwrap().bridge.clone();
        let pass = Pass {
            deferred: vec![Action::SetUp { ns: Ns::Host, dev: bridge.clone() }],
            ..Pass::default()
        };
        let s = endpoint_statuses(&c, "h2", &d, &none, &pass, &dns);
        let net = d.networks.values().next().unwrap().name.clone();
        for (name, ed) in &d.endpoints {
            let in_net = ed.interfaces.iter().any(|i| i.network == net);
            assert_eq!(s[name].state == EndpointState::Failed, in_net, "{name}: {:?}", s[name]);
        }
    }

    #[test]
    fn a_network_this_host_cannot_carry_is_named() {
        let mut c = catalog();
        for n in c.networks.values_mut() {
            n.encap = overlay_model::Encap::Udp;
            n.encrypted = true;
        }
        let d = desired_for_host(&c, &local());
        let s = endpoint_statuses(
            &c,
            "h2",
            &d,
            &BTreeSet::new(),
            &Pass::default(),
            &served(&["api", "db"]),
        );
        for st in s.values() {
            assert_eq!(st.state, EndpointState::Failed);
            assert!(
                st.reason.contains("is --encrypted but this host's agent has no certificate"),
                "{st:?}"
            );
        }
    }
}
