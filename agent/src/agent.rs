//! The agent's main loop: watch the controller in the background, and reconcile the
//! kernel to the latest catalog on every change and every few seconds (level-triggered:
//! drift is repaired even when nothing changed upstream).

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use overlay_model::types::DEFAULT_UNDERLAY_MTU;
use overlay_model::Catalog;
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use crate::cni::Cni;
use crate::dataplane::client::DataplaneClient;
use crate::dataplane::protocol::{tables_for, DaemonSettings};
use crate::desired::{desired_for_host, HostDesired, LocalHost};
use crate::dns::DnsServers;
use crate::identity::{establish, renew_forever, Controllers, Security};
use crate::nl::Nl;
use crate::reconcile::reconcile;
use crate::store::Store;
use crate::watch::{run_heartbeat, run_watch, Identity, Replica};

/// Everything the agent needs, after flags and config file are merged.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub controllers: Vec<String>,
    pub data_dir: PathBuf,
    pub reconcile_interval: Duration,
    /// Where the DNS upstreams come from; `None`: the host's (see [`crate::dns::upstream`]).
    pub resolv_conf: Option<PathBuf>,
    /// Port of the user-space UDP data plane's socket (on the underlay IP).
    pub udp_port: u16,
    /// Port of the QUIC endpoint for `--encrypted` networks.
    pub quic_port: u16,
    /// TAP queues (reader threads) per UDP network.
    pub udp_queues: usize,
    /// How the agent authenticates to the controllers; its certificate also carries
    /// `--encrypted` networks (not with `--insecure`).
    pub security: Security,
    /// The unix socket `overlay-cni` asks (CNI, issue 12).
    pub socket: PathBuf,
}

/// PEM files of the cluster CA and this host's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// MTU of the device that holds `ip` (the underlay interface).
pub async fn underlay_mtu(host: &Nl, ip: Ipv4Addr) -> Result<u32> {
    let index = host
        .addrs()
        .await?
        .into_iter()
        .find(|(_, a)| a.ip() == ip)
        .map(|(i, _)| i)
        .with_context(|| format!("no interface has the underlay address {ip}"))?;
    let link = host
        .links()
        .await?
        .into_iter()
        .find(|l| l.index == index)
        .context("underlay link vanished")?;
    Ok(link.mtu)
}

/// Runs until `shutdown` completes. The data plane is left as it is on return.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let store = Store::open(&cfg.data_dir)
        .with_context(|| format!("data dir {}", cfg.data_dir.display()))?;
    let host = Nl::current().context("opening netlink")?;
    let mtu = match underlay_mtu(&host, cfg.underlay_ip).await {
        Ok(m) => m,
        Err(e) => {
            warn!("cannot detect the underlay MTU ({e:#}); assuming {DEFAULT_UNDERLAY_MTU}");
            DEFAULT_UNDERLAY_MTU
        }
    };
    let me = Identity { name: cfg.name.clone(), underlay_ip: cfg.underlay_ip, underlay_mtu: mtu };
    // A wrong join token or a bad certificate ends the agent here, with the reason.
    let (dialer, tls) =
        establish(&cfg.security, &cfg.name, cfg.underlay_ip, &cfg.controllers, &cfg.data_dir)
            .await?;
    let controllers = Controllers { urls: cfg.controllers.clone(), dialer };
    let local = LocalHost {
        name: cfg.name.clone(),
        underlay_ip: cfg.underlay_ip,
        can_encrypt: tls.is_some(),
    };
    let (renewed_tx, mut renewed) = watch::channel(0u64);
    let renew_task = match (&cfg.security, &tls) {
        (Security::JoinToken { .. }, Some(files)) => Some(tokio::spawn(
            renew_forever(files.clone(), cfg.name.clone(), controllers.clone(), renewed_tx)
                .in_current_span(),
        )),
        _ => None,
    };
    let mut dataplane = DataplaneClient::new(&cfg.data_dir, daemon_settings(&cfg, mtu, &tls));

    // Until a catalog is known (from disk or a controller) nothing is reconciled, so an
    // agent that lost its state never tears down what is running.
    let persisted = match store.load_catalog() {
        Ok(c) => c,
        Err(e) => {
            warn!("ignoring unreadable persisted desired state: {e}");
            None
        }
    };
    if let Some(c) = &persisted {
        info!(revision = c.revision, "loaded persisted desired state");
    }
    let (tx, mut rx) = watch::channel(persisted.clone().map(Arc::new));
    let replica = Replica::new(persisted.unwrap_or_default());
    let watch_task = tokio::spawn(
        run_watch(me.clone(), controllers.clone(), store.clone(), replica, tx).in_current_span(),
    );
    let heartbeat_task =
        tokio::spawn(run_heartbeat(me, controllers.clone(), store.clone()).in_current_span());
    // Containers (CNI, issue 12): the plugin's socket. Without it the data plane still
    // runs; container runtimes are told the socket is unreachable.
    let cni = Cni::new(&cfg.name, &cfg.data_dir, rx.clone(), controllers.clone())
        .with_context(|| format!("container records in {}", cfg.data_dir.display()))?;
    let cni_task = match crate::cni::server::bind(&cfg.socket) {
        Ok(listener) => Some(tokio::spawn(
            crate::cni::server::run(listener, cfg.socket.clone(), cni.clone()).in_current_span(),
        )),
        Err(e) => {
            warn!(socket = %cfg.socket.display(), "not serving overlay-cni: {e}");
            None
        }
    };

    let mut dns = DnsServers::new(crate::dns::upstream(cfg.resolv_conf.as_deref()));
    let mut tick = tokio::time::interval(cfg.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut last_revision = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = rx.changed() => if r.is_err() { break },
            _ = tick.tick() => {}
            // A renewed certificate: the data plane's QUIC endpoint must present it.
            Ok(()) = renewed.changed() => {
                dataplane.set_settings(daemon_settings(&cfg, mtu, &tls));
            }
            // A container was attached or detached: realise it now.
            _ = cni.pass_wanted() => {}
        }
        let Some(catalog) = rx.borrow_and_update().clone() else { continue };
        pass(&host, &store, &local, &catalog, &mut dns, &mut dataplane, &mut last_revision, &cni)
            .await;
    }
    info!("shutting down; the data plane stays in place");
    watch_task.abort();
    heartbeat_task.abort();
    if let Some(task) = cni_task {
        task.abort();
        let _ = std::fs::remove_file(&cfg.socket);
    }
    if let Some(task) = renew_task {
        task.abort();
    }
    Ok(())
}

/// The data-plane daemon's settings: a daemon started by another build of the agent or
/// with other settings is replaced.
fn daemon_settings(cfg: &Config, underlay_mtu: u32, tls: &Option<TlsFiles>) -> DaemonSettings {
    // The binary's size and mtime stand in for a build id: an upgraded binary differs.
    let build = std::env::current_exe()
        .and_then(std::fs::metadata)
        .map(|m| {
            let mtime =
                m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            format!(
                "{} {} {}",
                env!("CARGO_PKG_VERSION"),
                m.len(),
                mtime.map_or(0, |d| d.as_secs())
            )
        })
        .unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_string());
    DaemonSettings {
        build,
        host: cfg.name.clone(),
        underlay_ip: cfg.underlay_ip,
        underlay_mtu,
        udp_port: cfg.udp_port,
        quic_port: cfg.quic_port,
        queues: cfg.udp_queues,
        tls: tls.as_ref().map(|t| (t.ca.clone(), t.cert.clone(), t.key.clone())),
        // A renewed certificate (same paths, new contents) makes the settings differ, so
        // the daemon is replaced and presents the new one.
        tls_serial: tls.as_ref().map(|t| file_fingerprint(&t.cert)).unwrap_or_default(),
    }
}

/// Size and mtime of a file, standing for its contents.
fn file_fingerprint(path: &std::path::Path) -> String {
    std::fs::metadata(path)
        .map(|m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{} {mtime}", m.len())
        })
        .unwrap_or_default()
}

/// Hands the TAP-uplink networks' tables to the data-plane daemon (which creates their
/// TAP devices), so the netlink pass that follows finds the devices to plug in.
async fn sync_dataplane(dataplane: &mut DataplaneClient, desired: &HostDesired, catalog: &Catalog) {
    let names = catalog.hosts.values().map(|h| (h.underlay_ip, h.name.clone())).collect();
    if let Err(e) = dataplane.apply(&tables_for(desired, &names)).await {
        warn!("data plane for --encap udp networks: {e:#}");
    }
}

#[allow(clippy::too_many_arguments)]
async fn pass(
    host: &Nl,
    store: &Store,
    local: &LocalHost,
    catalog: &Catalog,
    dns: &mut DnsServers,
    dataplane: &mut DataplaneClient,
    last_revision: &mut Option<u64>,
    cni: &Cni,
) {
    let mut desired = desired_for_host(catalog, local);
    cni.adjust(&mut desired, store);
    if *last_revision != Some(catalog.revision) {
        *last_revision = Some(catalog.revision);
        info!(
            revision = catalog.revision,
            networks = desired.networks.len(),
            endpoints = desired.endpoints.len(),
            "reconciling to new desired state"
        );
    }
    let wanted: BTreeSet<String> = desired.endpoints.keys().cloned().collect();
    dns.stop_unwanted(&wanted);
    sync_dataplane(dataplane, &desired, catalog).await;
    match reconcile(host, store, &desired).await {
        Ok(p) if !p.actions.is_empty() => {
            info!(
                actions = p.actions.len(),
                errors = p.errors.len(),
                "reconcile pass applied changes"
            )
        }
        Ok(_) => {}
        Err(e) => warn!("reconcile pass failed: {e:#}"),
    }
    dns.publish(catalog);
    let owned = store.owned_namespaces().unwrap_or_default();
    let ours: BTreeSet<String> = wanted.intersection(&owned).cloned().collect();
    dns.start_missing(&ours);
    cni.pass_done(&ours);
}
