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
mod notify;
mod raft;
mod security;
mod watch;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use overlay_model::State;
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
    let voters: Vec<u64> = config.peers.keys().copied().collect();
    let storage = DiskStorage::open(&config.data_dir.join("raft"), &voters)
        .with_context(|| format!("opening the raft log in {}", config.data_dir.display()))?;
    if let Some(note) = storage.recovery_note() {
        warn!("raft log recovery: {note}");
    }
    let state = match storage.snapshot_data() {
        Some((meta, data)) => {
            let state = State::from_bytes(data).map_err(|e| {
                anyhow::anyhow!("snapshot at index {} is unreadable: {e}", meta.index)
            })?;
            info!(
                index = meta.index,
                revision = state.catalog.revision,
                "restored state from snapshot"
            );
            state
        }
        None => State::new(),
    };
    let peers = Peers::new(config.peers.clone(), &tls.dialer)?;
    let recovering_until = if storage.is_fresh() && config.peers.len() > 1 {
        existing_cluster_commit(&config, &peers).await
    } else {
        None
    };
    if let Some(commit) = recovering_until {
        warn!(
            commit,
            "empty data dir but the cluster has data: not voting until caught up from the leader"
        );
    }

    let (status_tx, _) = tokio_watch::channel(NodeStatus {
        id: config.id,
        role: Role::Follower,
        term: 0,
        leader: 0,
        commit: 0,
        applied: 0,
        snapshot_index: 0,
        recovering: recovering_until.is_some(),
    });
    let revision = state.catalog.revision;
    let shared = Arc::new(Shared {
        state: RwLock::new(state),
        hub: watch::WatchHub::new(revision, WATCH_HISTORY),
        status: status_tx,
    });
    let (driver_tx, driver_rx) = mpsc::channel(65_536);
    let cluster = Cluster::new(config.id, peers.clone(), shared.clone(), driver_tx);
    let transport = Transport::start(config.id, &peers);
    let driver = Driver::new(
        DriverConfig { id: config.id, snapshot_every: config.snapshot_every, keep_entries: 1_000 },
        storage,
        driver_rx,
        transport,
        shared,
        recovering_until,
    )?;
    let (shutdown_tx, shutdown_rx) = tokio_watch::channel(false);
    let mut driver_task = tokio::spawn(driver.run(shutdown_rx.clone()));

    let liveness = Arc::new(liveness::Liveness::default());
    tokio::spawn(liveness::monitor(cluster.clone(), liveness.clone(), config.host_down_after));
    tokio::spawn(name_the_cluster(cluster.clone()));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let overlay = pb::overlay_server::OverlayServer::new(api::overlay::OverlayApi {
        cluster: cluster.clone(),
        liveness: liveness.clone(),
        signer: tls.signer.map(Arc::new),
        watches: Arc::default(),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Refuses every caller but controllers before a (possibly huge) message is read.
    let peer = tonic::service::interceptor::InterceptedService::new(
        pb::peer_server::PeerServer::new(api::peer::PeerApi { cluster: cluster.clone(), liveness })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        api::peer::only_controllers,
    );
    let mut server_shutdown = shutdown_rx.clone();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(overlay)
        .add_service(peer)
        .serve_with_incoming_shutdown(overlay_grpc::incoming(listener, tls.server), async move {
            let _ = server_shutdown.changed().await;
        });
    let mut server_task = tokio::spawn(server);
    info!(id = config.id, listen = %config.listen, members = config.peers.len(), data_dir = %config.data_dir.display(), "controller started");
    notify::notify("READY=1");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
    outcome
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

/// For a member starting on an empty data dir: the highest commit index any reachable
/// peer reports, if the cluster already holds data. Such a member may have voted in a
/// term before losing its disk, so it must not vote until it has caught up.
async fn existing_cluster_commit(config: &Config, peers: &Peers) -> Option<u64> {
    let mut highest = 0;
    for &id in config.peers.keys().filter(|&&id| id != config.id) {
        let Some(mut client) = peers.client(id) else { continue };
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
