//! The agent's main loop: watch the controller in the background, and reconcile the
//! kernel to the latest catalog on every change and every few seconds (level-triggered:
//! drift is repaired even when nothing changed upstream).
//!
//! Fail closed: when a pass cannot apply the host firewall, it attaches nothing (see
//! [`crate::reconcile`]) and the heartbeats carry the reason, so `overlayctl host ls`
//! shows this host `degraded`; the next pass that can apply it clears that.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use overlay_model::types::DEFAULT_UNDERLAY_MTU;
use overlay_model::Catalog;
use tokio::sync::watch;
use tracing::{debug, error, info, warn, Instrument};

use crate::cni::Cni;
use crate::dataplane::client::DataplaneClient;
use crate::dataplane::protocol::{tables_for, DaemonSettings};
use crate::desired::{desired_for_host, HostDesired, LocalHost};
use crate::dns::DnsFeed;
use crate::firewall::Guard;
use crate::identity::{establish, renew_forever, Controllers, Security};
use crate::metrics::Metrics;
use crate::nl::Nl;
use crate::reconcile::Reconciler;
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
    /// Where `/metrics` is served; `None`: nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The log filter (RUST_LOG syntax) `main` set up logging with.
    pub log: Option<String>,
    /// The unix socket `overlay-cni` asks (CNI, issue 12).
    pub socket: PathBuf,
    /// Controller and metrics ports endpoints must not reach on any host (the ports of
    /// the `--controller` URLs are added to these).
    pub control_ports: BTreeSet<u16>,
}

/// `IP:PORT` of a controller URL (`http://IP:PORT`, `https://IP:PORT/…`); `None` for a
/// URL without an IPv4 address and port.
pub fn controller_addr(url: &str) -> Option<SocketAddrV4> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next()?.parse().ok()
}

/// What the configuration adds to the host firewall: the controllers' addresses and
/// ports, the control ports, and this host's data-plane ports.
pub fn guard(cfg: &Config) -> Guard {
    let controllers: Vec<SocketAddrV4> =
        cfg.controllers.iter().filter_map(|u| controller_addr(u)).collect();
    let mut control_ports = cfg.control_ports.clone();
    control_ports.extend(controllers.iter().map(SocketAddrV4::port));
    Guard {
        control_addrs: controllers.iter().map(|a| *a.ip()).collect(),
        control_ports,
        data_ports: [crate::desired::VXLAN_PORT, cfg.udp_port, cfg.quic_port].into(),
    }
}

/// What heartbeats report while the firewall cannot be applied.
fn firewall_problem(error: &str) -> String {
    format!("host firewall cannot be applied ({error}); no endpoint is attached until it can")
}

/// PEM files of the cluster CA and this host's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// MTU of the device that holds `ip` (the underlay interface), and the prefix length
/// of `ip` there (the underlay network, which no overlay subnet may overlap).
pub async fn underlay_link(host: &Nl, ip: Ipv4Addr) -> Result<(u32, u8)> {
    let (index, net) = host
        .addrs()
        .await?
        .into_iter()
        .find(|(_, a)| a.ip() == ip)
        .with_context(|| format!("no interface has the underlay address {ip}"))?;
    let link = host
        .links()
        .await?
        .into_iter()
        .find(|l| l.index == index)
        .context("underlay link vanished")?;
    Ok((link.mtu, net.prefix()))
}

/// Runs until `shutdown` completes. The data plane is left as it is on return.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let store = Store::open(&cfg.data_dir)
        .with_context(|| format!("data dir {}", cfg.data_dir.display()))?;
    let metrics = Arc::new(Metrics::new(&cfg.data_dir));
    // Bound first: a wrong --metrics-listen stops the agent at start, with the reason.
    let metrics_task = match cfg.metrics_listen {
        Some(addr) => {
            let listener = overlay_ops::http::bind(addr).await?;
            let serve =
                overlay_ops::http::serve(listener, metrics.render(), std::future::pending());
            Some(tokio::spawn(serve.in_current_span()))
        }
        None => None,
    };
    let host = Nl::current().context("opening netlink")?;
    let (mtu, prefix) = match underlay_link(&host, cfg.underlay_ip).await {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot detect the underlay MTU and prefix ({e:#}); assuming MTU {DEFAULT_UNDERLAY_MTU}");
            (DEFAULT_UNDERLAY_MTU, 0)
        }
    };
    let me = Identity {
        name: cfg.name.clone(),
        underlay_ip: cfg.underlay_ip,
        underlay_prefix: prefix,
        underlay_mtu: mtu,
    };
    let guard = guard(&cfg);
    for url in cfg.controllers.iter().filter(|u| controller_addr(u).is_none()) {
        warn!(controller = %url, "controller URL has no IPv4 address and port: endpoints are kept from it only by the control ports");
    }
    // Checked once, said clearly; each pass then reports only changes.
    let initial_problem = match crate::firewall::check() {
        Ok(version) => {
            info!("host firewall: {version}");
            None
        }
        Err(e) => {
            error!("host firewall: {e}. Install nftables (apt install nftables): until nft works this host attaches no endpoint and is shown degraded");
            Some(firewall_problem(&e))
        }
    };
    let (problem_tx, problem_rx) = watch::channel(initial_problem);
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
        // Local state is disposable: set aside, rebuilt from the controllers.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            // The file and the log after it go together: either may be the damaged one.
            for file in [crate::journal::CATALOG_FILE, crate::journal::LOG_FILE] {
                let path = store.dir().join(file);
                if !path.exists() {
                    continue;
                }
                if let Err(aside) = crate::store::set_aside(&path, &e) {
                    warn!("ignoring unreadable persisted desired state ({e}); cannot set {file} aside: {aside}");
                }
            }
            None
        }
        Err(e) => {
            warn!("ignoring unreadable persisted desired state: {e}");
            None
        }
    };
    let cluster_id_path = store.cluster_id_path();
    if cluster_id_path.exists() && store.cluster_id().is_none() {
        let why = "not a cluster id (32 hex digits)";
        if let Err(e) = crate::store::set_aside(&cluster_id_path, &why) {
            warn!("{} is unreadable and cannot be set aside: {e}", cluster_id_path.display());
        }
    }
    if let Some(c) = &persisted {
        info!(revision = c.revision, "loaded persisted desired state");
    }
    let (tx, mut rx) = watch::channel(persisted.clone().map(Arc::new));
    let replica = Replica::new(persisted.unwrap_or_default(), &cfg.name);
    let watch_task = tokio::spawn(
        run_watch(me.clone(), controllers.clone(), store.clone(), replica, tx).in_current_span(),
    );
    let heartbeat_task = tokio::spawn(
        run_heartbeat(me, controllers.clone(), store.clone(), problem_rx).in_current_span(),
    );
    // Endpoint statuses (issue 15), after every pass.
    let (report_tx, report_rx) = watch::channel(None);
    let report_task = tokio::spawn(
        crate::report::run(cfg.name.clone(), controllers.clone(), report_rx).in_current_span(),
    );
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

    let mut dns = DnsFeed::from_resolv_conf(cfg.resolv_conf.as_deref());
    let mut tick = tokio::time::interval(cfg.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // WATCHDOG=1 is sent from this loop, between passes: a pass that hangs stops it,
    // and systemd restarts the agent.
    let mut watchdog = overlay_ops::notify::watchdog_interval().map(tokio::time::interval);
    let mut ready = false;
    if rx.borrow().is_none() {
        overlay_ops::notify::notify("STATUS=waiting for the desired state from the controllers");
    }
    tokio::pin!(shutdown);
    let mut last_revision = None;
    let mut applied_revision = 0u64;
    // Subscribed before the first pass dumps the entries, so none is missed after it.
    let mut reconciler = match crate::entries::EntryWatch::open() {
        Ok(watch) => Reconciler::with_entries(watch),
        Err(e) => {
            warn!("cannot subscribe to netlink notifications ({e}): forwarding entries are dumped on every pass");
            Reconciler::new()
        }
    };
    let mut arp_table = ArpTableWatch::default();
    let mut last_content: Option<Arc<Catalog>> = None;
    // Counts the catalog's changes of content: the desired state is built again (all
    // of the catalog's endpoints) only when it moves.
    let mut content = 0u64;
    let mut desired_cache = DesiredCache::default();
    loop {
        let mut woken_by_catalog = false;
        tokio::select! {
            _ = &mut shutdown => break,
            _ = async {
                match &mut watchdog {
                    Some(w) => { w.tick().await; }
                    None => std::future::pending().await,
                }
            } => {
                overlay_ops::notify::notify("WATCHDOG=1");
                continue;
            }
            r = rx.changed() => {
                if r.is_err() { break }
                woken_by_catalog = true;
            }
            _ = tick.tick() => {}
            // A renewed certificate: the data plane's QUIC endpoint must present it.
            Ok(()) = renewed.changed() => {
                dataplane.set_settings(daemon_settings(&cfg, mtu, &tls));
            }
            // A container was attached or detached: realise it now.
            _ = cni.pass_wanted() => {}
        }
        let Some(catalog) = rx.borrow_and_update().clone() else { continue };
        let unchanged = last_content
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &catalog) || same_content(c, &catalog));
        // A progress message moves only the revision: nothing to reconcile until the
        // next tick (issue 14: idle hosts hear of every revision).
        if woken_by_catalog && unchanged {
            last_content = Some(catalog);
            continue;
        }
        if !unchanged {
            content += 1;
        }
        last_content = Some(catalog.clone());
        let ctx = PassCtx { host: &host, store: &store, local: &local, guard: &guard, cni: &cni };
        let state = PassState {
            desired: desired_cache.get(content, &catalog, &local),
            dns: &mut dns,
            dataplane: &mut dataplane,
            reconciler: &mut reconciler,
            last_revision: &mut last_revision,
            applied_revision: &mut applied_revision,
            report: &report_tx,
        };
        let firewall = pass(&ctx, &catalog, state, &metrics).await;
        arp_table.check();
        if let Some(result) = firewall {
            let problem = result.err().map(|e| firewall_problem(&e));
            // Said when it starts and when it ends, not every pass (its wording may
            // change from pass to pass: that only goes to the heartbeat and debug).
            problem_tx.send_if_modified(|p| {
                if *p == problem {
                    return false;
                }
                match (&*p, &problem) {
                    (None, Some(why)) => error!("{why}"),
                    (Some(_), None) => info!("host firewall applied; attaching endpoints"),
                    (_, why) => debug!("{why:?}"),
                }
                *p = problem;
                true
            });
        }
        if !ready {
            // The first pass is done: this host's data plane matches the desired state
            // as far as the kernel let it (failures are reported per endpoint, a
            // missing firewall as the host's problem).
            ready = true;
            overlay_ops::notify::notify("READY=1\nSTATUS=reconciling");
        }
    }
    overlay_ops::notify::notify("STOPPING=1");
    info!("shutting down; the data plane stays in place");
    if let Some(task) = metrics_task {
        task.abort();
    }
    watch_task.abort();
    heartbeat_task.abort();
    report_task.abort();
    if let Some(task) = cni_task {
        task.abort();
        let _ = std::fs::remove_file(&cfg.socket);
    }
    if let Some(task) = renew_task {
        task.abort();
    }
    Ok(())
}

/// Whether two catalogs hold the same objects (whatever their revisions).
fn same_content(a: &Catalog, b: &Catalog) -> bool {
    a.hosts == b.hosts
        && a.networks == b.networks
        && a.endpoints == b.endpoints
        && a.routes == b.routes
        && a.names == b.names
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
async fn sync_dataplane(
    dataplane: &mut DataplaneClient,
    desired: &HostDesired,
    catalog: &Catalog,
    metrics: &Metrics,
) {
    let names = catalog.hosts.values().map(|h| (h.underlay_ip, h.name.clone())).collect();
    if let Err(e) = dataplane.apply(&tables_for(desired, &names)).await {
        metrics.error("dataplane");
        warn!("data plane for --encap udp networks: {e:#}");
    }
}

/// Warns (at most once a minute) when the machine's ARP table overflowed since the last
/// look: endpoints then wait seconds for every new neighbour (see README,
/// Troubleshooting, on `gc_thresh3`).
#[derive(Default)]
struct ArpTableWatch {
    last: Option<u64>,
    warned: Option<tokio::time::Instant>,
}

impl ArpTableWatch {
    fn check(&mut self) {
        let Some(now) = crate::netns::arp_table_fulls() else { return };
        let grew = self.last.is_some_and(|last| now > last);
        self.last = Some(now);
        let quiet = self.warned.is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if grew && !quiet {
            self.warned = Some(tokio::time::Instant::now());
            warn!(
                table_fulls = now,
                "the kernel's ARP table is full (shared by every namespace on this machine): raise net.ipv4.neigh.default.gc_thresh1/2/3 (see /etc/sysctl.d/99-overlay.conf)"
            );
        }
    }
}

/// What every pass works with.
struct PassCtx<'a> {
    host: &'a Nl,
    store: &'a Store,
    local: &'a LocalHost,
    guard: &'a Guard,
    /// Containers (CNI, issue 12): held back until ready, and told of each pass.
    cni: &'a Cni,
}

/// The desired state built from the catalog's content `content` (see the main loop),
/// before the pass's own adjustments.
#[derive(Default)]
struct DesiredCache {
    built: Option<(u64, HostDesired)>,
}

impl DesiredCache {
    /// The desired state of content `content`, built from `catalog` if it was not yet.
    fn get(&mut self, content: u64, catalog: &Catalog, local: &LocalHost) -> HostDesired {
        match &self.built {
            Some((c, d)) if *c == content => d.clone(),
            _ => {
                let d = desired_for_host(catalog, local);
                self.built = Some((content, d.clone()));
                d
            }
        }
    }
}

/// What the main loop keeps from one pass to the next.
struct PassState<'a> {
    /// This pass's desired state as the catalog says (see [`DesiredCache`]).
    desired: HostDesired,
    /// What the data-plane daemon, which serves the endpoints' DNS, is told.
    dns: &'a mut DnsFeed,
    dataplane: &'a mut DataplaneClient,
    reconciler: &'a mut Reconciler,
    last_revision: &'a mut Option<u64>,
    /// The catalog revision the kernel reflects for remote endpoints (issue 15).
    applied_revision: &'a mut u64,
    /// Where each pass's endpoint statuses go (see [`crate::report`]).
    report: &'a watch::Sender<Option<Arc<crate::report::PassReport>>>,
}

/// One pass; returns whether the host firewall is in place (`None`: the pass did not
/// get that far).
async fn pass(
    ctx: &PassCtx<'_>,
    catalog: &Arc<Catalog>,
    st: PassState<'_>,
    metrics: &Metrics,
) -> Option<Result<(), String>> {
    let started = std::time::Instant::now();
    let PassState {
        mut desired,
        dns,
        dataplane,
        reconciler,
        last_revision,
        applied_revision,
        report,
    } = st;
    let (host, store) = (ctx.host, ctx.store);
    desired.firewall.guard = ctx.guard.clone();
    // Marks say which cluster's host made a namespace (hosts may share /run/netns).
    desired.owner.cluster = store.cluster_id();
    let held = ctx.cni.adjust(&mut desired, store);
    if *last_revision != Some(catalog.revision) {
        *last_revision = Some(catalog.revision);
        info!(
            revision = catalog.revision,
            networks = desired.networks.len(),
            endpoints = desired.endpoints.len(),
            "reconciling to new desired state"
        );
        for why in &desired.rejected {
            warn!(revision = catalog.revision, "desired state: {why}");
        }
    }
    let wanted: BTreeSet<String> = desired.endpoints.keys().cloned().collect();
    if let Some(stop) = dns.stop_unwanted(&wanted) {
        // Before the pass may delete their namespaces (a socket keeps one alive).
        if let Err(e) = dataplane.dns(&stop).await {
            debug!("stopping DNS servers of removed endpoints: {e:#}");
        }
    }
    sync_dataplane(dataplane, &desired, catalog, metrics).await;
    let result = reconciler.pass(host, store, &desired).await;
    metrics.pass(&desired, catalog.revision, result.as_ref().map_err(|_| ()), started.elapsed());
    let firewall = match &result {
        Ok(p) => {
            if p.applied > 0 {
                info!(
                    actions = p.applied,
                    errors = p.errors.len(),
                    deferred = p.deferred.len(),
                    held_back = p.held_back.len(),
                    "reconcile pass applied changes"
                )
            }
            Some(p.firewall.clone())
        }
        // Reported by the reconciler, once per change of error.
        Err(e) => {
            debug!("reconcile pass failed: {e:#}");
            None
        }
    };
    dns.refresh_upstream();
    let owned = store.owned_namespaces().unwrap_or_default();
    let ours: BTreeSet<String> = wanted.intersection(&owned).cloned().collect();
    let tables = dns.serve(catalog, &ours);
    let answer = dataplane.dns(&tables).await;
    let mut dns_outcome = dns.answered(answer, &ours);
    if tables.changes.is_some() && !dns.current(catalog.revision) {
        // The daemon held other records than we thought (it was restarted, say): all
        // of them, now.
        let answer = dataplane.dns(&dns.serve(catalog, &ours)).await;
        dns_outcome = dns.answered(answer, &ours);
    }
    if let Ok(p) = &result {
        ctx.cni.rebuild(&p.marks, &desired);
        // Remote endpoints are reachable from here once their forwarding entries,
        // neighbours and DNS records are in place.
        let forwarding_failed = p.errors.iter().map(|e| &e.action).chain(&p.deferred).any(forwards);
        if !forwarding_failed && (ours.is_empty() || dns.current(catalog.revision)) {
            *applied_revision = catalog.revision;
        }
        let statuses = crate::status::endpoint_statuses(
            catalog,
            &ctx.local.name,
            &desired,
            &held,
            p,
            &dns_outcome,
        );
        let statuses = statuses
            .into_iter()
            .filter_map(|(name, s)| {
                let e = catalog.endpoints.get(&name)?.clone();
                Some((name, (s, e)))
            })
            .collect();
        let pass_report = crate::report::PassReport {
            revision: catalog.revision,
            applied: *applied_revision,
            statuses,
        };
        report.send_replace(Some(Arc::new(pass_report)));
    }
    ctx.cni.pass_done(&dns_outcome.served);
    firewall
}

/// Whether an action programs forwarding to remote endpoints (FDB, neighbours).
fn forwards(a: &crate::plan::Action) -> bool {
    use crate::plan::Action;
    matches!(
        a,
        Action::AddFdb { .. }
            | Action::DelFdb { .. }
            | Action::AddNeigh { .. }
            | Action::DelNeigh { .. }
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(controllers: &[&str]) -> Config {
        Config {
            name: "h1".into(),
            underlay_ip: "192.0.2.1".parse().unwrap(),
            controllers: controllers.iter().map(|s| s.to_string()).collect(),
            data_dir: PathBuf::from("/nonexistent"),
            reconcile_interval: Duration::from_secs(2),
            resolv_conf: None,
            udp_port: 7470,
            quic_port: 7471,
            udp_queues: 1,
            security: Security::Insecure,
            control_ports: [7400, 9100].into(),
            metrics_listen: None,
            log: None,
            socket: PathBuf::from("/nonexistent/agent.sock"),
        }
    }

    #[test]
    fn controller_urls_give_addresses_and_ports() {
        assert_eq!(controller_addr("http://192.0.2.9:7400"), "192.0.2.9:7400".parse().ok());
        assert_eq!(controller_addr("https://192.0.2.9:7500/"), "192.0.2.9:7500".parse().ok());
        assert_eq!(controller_addr("192.0.2.9:7400"), "192.0.2.9:7400".parse().ok());
        assert_eq!(controller_addr("https://ctl.example:7400"), None);
        assert_eq!(controller_addr("http://192.0.2.9"), None);
    }

    #[test]
    fn the_guard_covers_controllers_control_and_data_ports() {
        let g = guard(&config(&["http://192.0.2.9:7400", "https://192.0.2.10:7500", "http://x:1"]));
        let addrs: Vec<String> = g.control_addrs.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["192.0.2.9", "192.0.2.10"]);
        assert_eq!(g.control_ports, [7400, 7500, 9100].into());
        assert_eq!(g.data_ports, [4789, 7470, 7471].into());
    }

    #[test]
    fn the_desired_state_is_built_again_only_when_the_content_moves() {
        let local = LocalHost {
            name: "h2".into(),
            underlay_ip: "192.0.2.2".parse().unwrap(),
            can_encrypt: false,
        };
        let mut cache = DesiredCache::default();
        let first = crate::desired::tests::catalog();
        assert_eq!(cache.get(1, &first, &local), desired_for_host(&first, &local));
        // Same content (a tick, a progress message): the built one, whatever is passed.
        let mut other = first.clone();
        other.endpoints.clear();
        assert_eq!(cache.get(1, &other, &local), desired_for_host(&first, &local));
        assert_eq!(cache.get(2, &other, &local), desired_for_host(&other, &local));
    }

    #[test]
    fn the_problem_says_what_and_what_follows() {
        let p = firewall_problem("cannot run nft: No such file or directory (os error 2)");
        assert_eq!(
            p,
            "host firewall cannot be applied (cannot run nft: No such file or directory (os error 2)); no endpoint is attached until it can"
        );
    }
}
