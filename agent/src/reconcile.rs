//! One level-triggered pass: observe the kernel, plan against the desired state, apply.
//! The caller runs it on every catalog change and every couple of seconds, so anything
//! changed by hand or left half-done by a failure converges on the next pass.

use anyhow::Result;
use tracing::{info, warn};

use crate::apply::{apply, ApplyError};
use crate::desired::HostDesired;
use crate::nl::Nl;
use crate::observe::observe;
use crate::plan::{plan, Action};
use crate::store::Store;

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    pub actions: Vec<Action>,
    pub errors: Vec<ApplyError>,
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

/// Observes, plans and applies once.
pub async fn reconcile(host: &Nl, store: &Store, desired: &HostDesired) -> Result<Pass> {
    let observed = observe(host, store).await?;
    for name in desired.endpoints.keys().filter(|n| observed.foreign.contains(*n)) {
        warn!(endpoint = %name, "namespace {name} exists and was not created by overlay-agent; leaving it alone");
    }
    for name in &desired.unsupported {
        warn!(network = %name, "network {name} is --encrypted but this agent has no host certificate (tls_ca, tls_cert, tls_key); not carrying it");
    }
    let actions = plan(desired, &observed);
    for a in &actions {
        let network = network_of(desired, a).unwrap_or("");
        info!(endpoint = a.netns().unwrap_or(""), network, "plan: {a}");
    }
    let errors = apply(host, store, &actions).await;
    Ok(Pass { actions, errors })
}
