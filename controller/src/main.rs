//! `overlay-controller`: one member of the raft-replicated store of overlay's desired
//! state (networks, IPAM, endpoints, routes, hosts), serving the gRPC API.
//!
//! Wiring only: flags and config, the data dir, the raft driver task, the liveness
//! monitor and the gRPC server. It must never acknowledge a write before it is durable
//! on a majority, and never keep running after its log could not be written.

mod api;
mod cluster;
mod config;
mod liveness;
mod metrics;
mod raft;
mod security;
mod status;
mod watch;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use overlay_grpc::Dialer;
use overlay_ops::notify;
use overlay_proto::pb;
use tokio::sync::{mpsc, watch as tokio_watch};
use tracing::{error, info, warn};

use crate::cluster::{
    Cluster, NodeStatus, Peers, Role, Shared, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES,
};
use crate::config::{Config, Flags};
use crate::raft::driver::{Driver, DriverConfig};
use crate::raft::storage::DiskStorage;
use crate::raft::transport::Transport;

/// Changes kept for watchers to resume from without a full snapshot.
const WATCH_HISTORY: usize = 20_000;

fn main() {
    let flags = Flags::parse();
    let config = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    init_tracing(config.log.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(config)) {
        error!("{e:#}");
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_tracing(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let _lock = lock_data_dir(&config)?;
    let tls = security::load(&config.security, config.listen)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Joining may wait for the cluster; a stop request must still be honoured.
    let (storage, recovering_until) = tokio::select! {
        r = open_storage(&config, &tls.dialer) => r?,
        _ = sigterm.recv() => { info!("SIGTERM before start-up finished"); return Ok(()) }
        _ = tokio::signal::ctrl_c() => { info!("interrupted before start-up finished"); return Ok(()) }
    };
    if let Some(note) = storage.recovery_note() {
        warn!("raft log recovery: {note}");
    }
    let (state, membership) = raft::restore(&storage, &config.peers)?;
    if storage.snapshot_metadata().index > 0 {
        info!(
            index = storage.snapshot_metadata().index,
            revision = state.catalog.revision,
            "restored state from snapshot"
        );
    }
    if let Some(commit) = recovering_until {
        warn!(
            commit,
            "empty data dir but the cluster has data: not voting until caught up from the leader"
        );
    }
    // The driver keeps the peer list in step with the configuration from here on.
    let peers = Peers::new(&membership.addresses, &tls.dialer)?;

    let (status_tx, _) =
        tokio_watch::channel(NodeStatus::initial(config.id, recovering_until.is_some()));
    let shared = Arc::new(Shared {
        hub: watch::WatchHub::new(&state.catalog, WATCH_HISTORY),
        state: RwLock::new(state),
        status: status_tx,
        metrics: Arc::default(),
        stalled: RwLock::default(),
    });
    let (driver_tx, driver_rx) = mpsc::channel(65_536);
    let cluster = Cluster::new(config.id, peers.clone(), shared.clone(), driver_tx);
    let transport = Transport::new(config.id, peers.clone());
    let driver_config = DriverConfig {
        id: config.id,
        snapshot_every: config.snapshot_every,
        keep_entries: 1_000,
        fixed_election_ticks: None,
    };
    let driver = Driver::new(
        driver_config.clone(),
        storage,
        Box::new(transport),
        shared.clone(),
        membership,
        recovering_until,
    )?;
    let (shutdown_tx, shutdown_rx) = tokio_watch::channel(false);
    let member = Member {
        config: driver_config,
        dir: config.data_dir.join("raft"),
        voters: config.peers.keys().copied().collect(),
        configured: config.peers.clone(),
        peers: peers.clone(),
        shared,
    };
    let mut driver_task = tokio::spawn(run_member(driver, member, driver_rx, shutdown_rx.clone()));

    let liveness = Arc::new(liveness::Liveness::default());
    tokio::spawn(liveness::monitor(cluster.clone(), liveness.clone(), config.host_down_after));
    tokio::spawn(liveness::forward(cluster.clone(), liveness.clone()));
    tokio::spawn(name_the_cluster(cluster.clone()));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let metrics_listener = overlay_ops::http::bind(addr).await?;
            let render = metrics_render(&cluster, liveness.clone(), tls.cert_not_after);
            let mut stop = shutdown_rx.clone();
            Some(tokio::spawn(overlay_ops::http::serve(metrics_listener, render, async move {
                let _ = stop.changed().await;
            })))
        }
        None => None,
    };
    let api = Arc::new(api::overlay::OverlayApi {
        cluster: cluster.clone(),
        liveness: liveness.clone(),
        signer: tls.signer.map(Arc::new),
        watches: Arc::default(),
    });
    // Watch streams are served from shared pre-encoded frames (api::watch).
    let overlay = api::watch::WithWatch::new(
        pb::overlay_server::OverlayServer::from_arc(api.clone())
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        api,
    );
    // Refuses every caller but controllers before a (possibly huge) message is read.
    let peer = tonic::service::interceptor::InterceptedService::new(
        pb::peer_server::PeerServer::new(api::peer::PeerApi { cluster: cluster.clone(), liveness })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        api::peer::only_controllers,
    );
    let mut server_shutdown = shutdown_rx.clone();
    let server = tonic::transport::Server::builder()
        .layer(metrics::CountRequests(cluster.shared.metrics.clone()))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(overlay)
        .add_service(peer)
        .serve_with_incoming_shutdown(overlay_grpc::incoming(listener, tls.server), async move {
            let _ = server_shutdown.changed().await;
        });
    let mut server_task = tokio::spawn(server);
    info!(id = config.id, listen = %config.listen, members = peers.addresses().len(), data_dir = %config.data_dir.display(), "controller started");
    notify::notify("READY=1");

    let outcome = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: shutting down"); Ok(()) }
        _ = tokio::signal::ctrl_c() => { info!("interrupted: shutting down"); Ok(()) }
        r = &mut driver_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context("raft driver failed")),
            Err(e) => Err(anyhow::anyhow!("raft driver panicked: {e}")),
        },
        r = &mut server_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("gRPC server failed: {e}")),
            Err(e) => Err(anyhow::anyhow!("gRPC server panicked: {e}")),
        },
    };
    notify::notify("STOPPING=1");
    let _ = shutdown_tx.send(true);
    // A task that already finished was polled to completion by the select above.
    if !driver_task.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(5), driver_task).await;
    }
    if !server_task.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(2), server_task).await;
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    outcome
}

/// What a member needs to start a new raft driver after a stall.
struct Member {
    config: DriverConfig,
    dir: std::path::PathBuf,
    voters: Vec<u64>,
    configured: std::collections::BTreeMap<u64, String>,
    peers: Peers,
    shared: Arc<Shared>,
}

/// Runs raft drivers in turn: when one cannot write its log, the member stalls until it
/// can (see `raft::stall`), then reopens its storage and starts a new one.
async fn run_member(
    first: Driver,
    m: Member,
    mut inbox: mpsc::Receiver<cluster::DriverMsg>,
    mut shutdown: tokio_watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let id = m.config.id;
    let mut next: anyhow::Result<Driver> = Ok(first);
    loop {
        let error = match next {
            Ok(driver) => match driver.run(&mut inbox, shutdown.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            },
            Err(e) => e,
        };
        raft::stall::announce(id, &error);
        let why = error.root_cause().to_string();
        if !raft::stall::wait_until_writable(id, &m.dir, &why, &m.shared, &mut inbox, &mut shutdown)
            .await
        {
            return Ok(());
        }
        next = reopen(&m);
    }
}

/// A new driver on what the data dir really holds (the old one may have been ahead).
fn reopen(m: &Member) -> anyhow::Result<Driver> {
    let storage = DiskStorage::open(&m.dir, &m.voters)
        .with_context(|| format!("reopening the raft log in {}", m.dir.display()))?;
    if let Some(note) = storage.recovery_note() {
        warn!("raft log recovery: {note}");
    }
    let (state, membership) = raft::restore(&storage, &m.configured)?;
    {
        let mut guard = m.shared.state.write().unwrap_or_else(|p| p.into_inner());
        *guard = state;
        m.shared.hub.reset(&guard.catalog);
    }
    raft::stall::reset_status(&m.shared, m.config.id);
    m.peers.set(&membership.addresses);
    let transport = Transport::new(m.config.id, m.peers.clone());
    Driver::new(m.config.clone(), storage, Box::new(transport), m.shared.clone(), membership, None)
}

/// What `/metrics` shows: the event metrics, and the raft status and catalog as they are
/// at the scrape.
fn metrics_render(
    cluster: &Cluster,
    liveness: Arc<liveness::Liveness>,
    cert_not_after: Option<std::time::SystemTime>,
) -> overlay_ops::http::Render {
    let mut registry = prometheus_client::registry::Registry::default();
    cluster.shared.metrics.register(&mut registry);
    let shared = cluster.shared.clone();
    registry.register_collector(Box::new(overlay_ops::metrics::Scraped(move || {
        let status = shared.status.borrow().clone();
        let problems = liveness.problems();
        metrics::scrape(&status, &shared.read_state().catalog, &problems, cert_not_after)
    })));
    Arc::new(move || overlay_ops::metrics::encode(&registry))
}

/// Gives the cluster its id the first time this member leads a cluster without one.
/// Only the leader's own proposal can set it (`InitCluster` is internal).
async fn name_the_cluster(cluster: Cluster) {
    let mut status = cluster.shared.status.subscribe();
    loop {
        let unnamed = cluster.read_state().meta().cluster_id.is_none();
        if !unnamed {
            return;
        }
        if cluster.status().role == Role::Leader {
            let outcome = match overlay_pki::random_bytes::<16>() {
                Ok(bytes) => {
                    let cluster_id = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    let command = overlay_model::Command::InitCluster { cluster_id };
                    cluster.propose_local(command).await.map(|_| ()).map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(()) => {
                    info!(cluster_id = ?cluster.read_state().meta().cluster_id, "cluster named")
                }
                Err(e) => {
                    warn!("naming the cluster: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            continue;
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Holds an exclusive lock on the data dir for the life of the process, so two
/// controllers never write one log.
fn lock_data_dir(config: &Config) -> anyhow::Result<std::fs::File> {
    let path = config.data_dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "data dir {} is in use by another overlay-controller",
            config.data_dir.display()
        )
    })?;
    let id_path = config.data_dir.join("member-id");
    match std::fs::read_to_string(&id_path) {
        Ok(text) if text.trim() != config.id.to_string() => anyhow::bail!(
            "data dir {} belongs to member {}, not --id {}",
            config.data_dir.display(),
            text.trim(),
            config.id
        ),
        Ok(_) => {}
        Err(_) => std::fs::write(&id_path, format!("{}\n", config.id))
            .with_context(|| format!("writing {}", id_path.display()))?,
    }
    Ok(file)
}

/// Opens this member's raft storage, and says until which commit index it must not vote.
///
/// * A data dir with a log: recovered as it is (`--join` is then not needed).
/// * `--join`: a snapshot from any member that answers, retried until one does.
/// * `--peers` on an empty data dir: a new cluster, unless the others already hold data
///   (this member lost its disk, or starts late); then it starts from their snapshot
///   and, having maybe voted before, does not vote until it has caught up.
async fn open_storage(
    config: &Config,
    dialer: &Dialer,
) -> anyhow::Result<(DiskStorage, Option<u64>)> {
    let dir = config.data_dir.join("raft");
    let open_err = || format!("opening the raft log in {}", config.data_dir.display());
    let voters: Vec<u64> = config.peers.keys().copied().collect();
    if DiskStorage::has_state(&dir).with_context(open_err)? {
        if !config.join.is_empty() {
            info!("the data dir holds this member's log: --join is not needed and is ignored");
        }
        return Ok((DiskStorage::open(&dir, &voters).with_context(open_err)?, None));
    }
    if !config.join.is_empty() {
        let mut backoff = Duration::from_millis(500);
        loop {
            if let Some(joined) = fetch_join_snapshot(dialer, config.id, &config.join).await? {
                return joined_storage(config, &dir, joined);
            }
            warn!(join = ?config.join, "no member answered with a snapshot to join from yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    let others: Vec<String> =
        config.peers.iter().filter(|(&id, _)| id != config.id).map(|(_, a)| a.clone()).collect();
    if !others.is_empty() {
        if let Some(joined) = fetch_join_snapshot(dialer, config.id, &others).await? {
            return joined_storage(config, &dir, joined);
        }
    }
    let storage = DiskStorage::open(&dir, &voters).with_context(open_err)?;
    // Peers without the JoinSnapshot call (an older version) still say how far they are.
    let recovering_until =
        if others.is_empty() { None } else { existing_cluster_commit(dialer, &others).await };
    Ok((storage, recovering_until))
}

fn joined_storage(
    config: &Config,
    dir: &std::path::Path,
    (snapshot, commit): (::raft::prelude::Snapshot, u64),
) -> anyhow::Result<(DiskStorage, Option<u64>)> {
    let meta = snapshot.get_metadata().clone();
    let storage = DiskStorage::open_joined(dir, snapshot)
        .with_context(|| format!("initialising the raft log in {}", config.data_dir.display()))?;
    // A voter starting over may have voted in the current term before losing its disk.
    let voter = meta.get_conf_state().voters.contains(&config.id);
    info!(
        index = meta.index,
        voters = ?meta.get_conf_state().voters,
        learners = ?meta.get_conf_state().learners,
        "starting from a snapshot of the cluster"
    );
    if !voter {
        info!(
            id = config.id,
            "not a member yet: waiting for `overlayctl cluster member add {} ADDRESS`", config.id
        );
    }
    Ok((storage, voter.then_some(commit)))
}

/// The first snapshot (index > 0) a member at one of `addresses` gives, with its commit
/// index. `None` when no member answered with data; an error when one refused us.
async fn fetch_join_snapshot(
    dialer: &Dialer,
    id: u64,
    addresses: &[String],
) -> anyhow::Result<Option<(::raft::prelude::Snapshot, u64)>> {
    use protobuf::Message as _;
    for address in addresses {
        let channel = match Peers::connect(dialer, address) {
            Ok(c) => c,
            Err(e) => {
                warn!(address, error = %e, "unusable member address");
                continue;
            }
        };
        let mut client = Peers::client_on(channel);
        let mut request = tonic::Request::new(pb::JoinSnapshotRequest { id });
        request.set_timeout(Duration::from_secs(60));
        match client.join_snapshot(request).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                let snapshot = ::raft::prelude::Snapshot::parse_from_bytes(&resp.snapshot)
                    .with_context(|| format!("member {address} sent an unreadable snapshot"))?;
                if snapshot.get_metadata().index > 0 {
                    info!(
                        address,
                        index = snapshot.get_metadata().index,
                        "got a snapshot to start from"
                    );
                    return Ok(Some((snapshot, resp.commit_index)));
                }
            }
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                anyhow::bail!(
                    "member {address} refused to let member {id} join: {}",
                    status.message()
                )
            }
            Err(status) => {
                info!(address, error = status.message(), "no snapshot from this member");
            }
        }
    }
    Ok(None)
}

/// The highest commit index any reachable member at `addresses` reports, if the cluster
/// already holds data.
async fn existing_cluster_commit(dialer: &Dialer, addresses: &[String]) -> Option<u64> {
    let mut highest = 0;
    for address in addresses {
        let Ok(channel) = Peers::connect(dialer, address) else { continue };
        let mut client = Peers::client_on(channel);
        let mut request = tonic::Request::new(pb::Empty {});
        request.set_timeout(Duration::from_secs(1));
        if let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_millis(1500), client.member_status(request)).await
        {
            if let Some(m) = resp.into_inner().member {
                highest = highest.max(m.commit_index);
            }
        }
    }
    (highest > 0).then_some(highest)
}
