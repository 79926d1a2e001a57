//! Containers (CNI, issue 12): the agent's side of `overlay-cni`.
//!
//! The plugin asks over a unix socket ([`server`], protocol in `overlay_cni::protocol`);
//! the agent attaches the container as an endpoint like any other:
//!
//! * ADD: the runtime's namespace (`CNI_NETNS`) is bind-mounted as `/run/netns/NAME`
//!   (NAME from the container's name, see `overlay_cni::naming`), the endpoint is created
//!   through the controller on this host (or connected, for a container's further
//!   network) with the interface the runtime asked for, and the answer waits, bounded,
//!   until this agent's own reconcile pass has realised it: interface, address, routes
//!   and the DNS at 127.0.0.11 inside.
//! * DEL: disconnects, or removes the endpoint with its last network; the reconcile pass
//!   unmounts the namespace (never destroying the runtime's). Succeeds when there is
//!   nothing to remove.
//! * CHECK: reports the attachment as it is, or fails.
//!
//! What the agent attached is recorded in `DATA_DIR/cni.json` ([`registry`]), so DEL works
//! across agent restarts and the reconcile loop knows which namespaces are containers'.
//! The loop calls [`Cni::adjust`] before each pass and [`Cni::pass_done`] after it; a
//! handler asks for a pass with [`Cni::pass_wanted`]. Decisions are pure ([`decide`]).

pub mod decide;
pub mod registry;
pub mod server;

mod attach;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use overlay_model::Catalog;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::desired::HostDesired;
use crate::identity::Controllers;
use crate::netns;
use crate::store::Store;
use registry::Registry;

/// What one reconcile pass left behind, for handlers waiting on it.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    /// Passes finished so far.
    pub seq: u64,
    /// Endpoints whose DNS server runs after this pass.
    pub dns_served: Arc<BTreeSet<String>>,
}

/// State shared by the socket's handlers and the reconcile loop.
pub struct Cni {
    /// This host's name.
    host: String,
    registry: Mutex<Registry>,
    /// One CNI operation at a time changes records, mounts and endpoints.
    ops: tokio::sync::Mutex<()>,
    catalog: watch::Receiver<Option<Arc<Catalog>>>,
    controllers: Controllers,
    poke: Notify,
    passes: watch::Sender<PassReport>,
}

impl Cni {
    /// Opens the records in `data_dir`. `catalog` is the agent's desired state.
    pub fn new(
        host: &str,
        data_dir: &Path,
        catalog: watch::Receiver<Option<Arc<Catalog>>>,
        controllers: Controllers,
    ) -> io::Result<Arc<Cni>> {
        let registry = match Registry::open(data_dir) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                // Local state is disposable: keep the bad file for a human, go on without
                // it (containers attached before are left alone, never torn down).
                // (Records come back from the containers' namespaces' marks: `rebuild`.)
                crate::store::set_aside(&data_dir.join("cni.json"), &e)?;
                Registry::open(data_dir)?
            }
            Err(e) => return Err(e),
        };
        Ok(Arc::new(Cni {
            host: host.to_string(),
            registry: Mutex::new(registry),
            ops: tokio::sync::Mutex::new(()),
            catalog,
            controllers,
            poke: Notify::new(),
            passes: watch::channel(PassReport::default()).0,
        }))
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A poisoned lock only means a panic elsewhere; the records are still whole
        // (every change is one `set`).
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before a pass: leaves containers' endpoints that are not ready (or being
    /// detached) out of `desired` (returned: they get no status), records the mounted
    /// namespaces of ready ones as the agent's own, so the pass realises them there,
    /// and names each container in its endpoint (it goes into the namespace's mark).
    pub fn adjust(&self, desired: &mut HostDesired, store: &Store) -> BTreeSet<String> {
        let names: BTreeSet<String> = desired.endpoints.keys().cloned().collect();
        let view = registry::loop_view(self.registry().records(), &names, netns::inode);
        for id in &view.forget {
            if let Err(e) = self.registry().set(id, None) {
                warn!(container = %id, "cannot forget a detached container: {e}");
            }
        }
        let mut held = BTreeSet::new();
        for name in &view.hold_back {
            if desired.endpoints.remove(name).is_some() {
                held.insert(name.clone());
            }
        }
        for name in &view.adopt {
            if let Err(e) = store.record_namespace(name) {
                warn!(endpoint = %name, "cannot record the container's namespace (its mark says it is ours all the same): {e}");
            }
        }
        for r in self.registry().records() {
            if let Some(ed) = desired.endpoints.get_mut(&r.endpoint) {
                ed.container = Some(r.container_id.clone());
            }
        }
        held
    }

    /// After a pass: a container's namespace whose mark names the container but which
    /// has no record (the data dir was lost) gets its record back, so the runtime's DEL
    /// and CHECK find it. `marks` are the observed marks by namespace.
    pub fn rebuild(&self, marks: &BTreeMap<String, String>, desired: &HostDesired) {
        for (name, alias) in marks {
            let Some(mark) = crate::marks::parse(alias) else { continue };
            let (true, Some(id)) = (mark.owner.host == self.host, mark.container) else {
                continue;
            };
            let Some(ed) = desired.endpoints.get(name) else { continue };
            let mut registry = self.registry();
            if registry.get(&id).is_some() || registry.by_endpoint(name).is_some() {
                continue;
            }
            let Some(inode) = netns::inode(name) else { continue };
            let record = registry::Record {
                container_id: id.clone(),
                endpoint: name.clone(),
                // Unknown once the record is lost; only the inode is checked.
                netns: String::new(),
                inode,
                interfaces: ed
                    .interfaces
                    .iter()
                    .map(|i| (i.name.clone(), i.network.clone()))
                    .collect(),
                phase: registry::Phase::Attached,
            };
            match registry.set(&id, Some(record)) {
                Ok(()) => {
                    info!(endpoint = %name, container = %id, "container record rebuilt from its namespace's mark")
                }
                Err(e) => {
                    warn!(endpoint = %name, container = %id, "cannot rebuild the container's record: {e}")
                }
            }
        }
    }

    /// After a pass: wakes the handlers waiting for one.
    pub fn pass_done(&self, dns_served: &BTreeSet<String>) {
        self.passes.send_modify(|r| {
            r.seq += 1;
            r.dns_served = Arc::new(dns_served.clone());
        });
    }

    /// Completes when a handler wants a pass now (a container was attached or detached).
    pub async fn pass_wanted(&self) {
        self.poke.notified().await
    }
}
