//! The data-plane daemon: `overlay-agent --dataplane-daemon SOCKET`. It owns the
//! user-space UDP engine (and the QUIC plane for `--encrypted` networks), started when
//! the first `--encap udp` network arrives, forwards by the tables the agent sends, and
//! keeps forwarding while no agent is connected. It also serves every endpoint's DNS at
//! 127.0.0.11 (issue 15): the sockets live in the endpoints' namespaces but belong to
//! this process, with the last records the agent sent, so lookups go on while the agent
//! is stopped, killed or restarted.
//!
//! It leaves `dataplane.pid` and, every couple of seconds, `dataplane-counters.json`
//! (per-VNI frame counters, including frames dropped from unknown sources) next to its
//! socket, and exits on SIGTERM/SIGINT or when an agent asks it to.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Mutex};
use tracing::{info, warn, Instrument};

use super::client::{counters_path, listen_addr, pid_path};
use super::planes::Planes;
use super::protocol::{decode, encode, DaemonSettings, Request, Response};
use crate::dns::DnsServers;
use crate::store::write_atomic;
use overlay_dns::Upstream;

const COUNTERS_INTERVAL: Duration = Duration::from_secs(2);
/// How often the DNS servers of deleted namespaces are looked for.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the daemon until it is told to stop.
pub fn run(socket: PathBuf, settings: DaemonSettings) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dataplane")
        .enable_all()
        .build()
        .context("starting the daemon's runtime")?;
    let span = tracing::info_span!("dataplane", host = %settings.host);
    rt.block_on(serve(socket, settings).instrument(span))
}

async fn serve(socket: PathBuf, settings: DaemonSettings) -> Result<()> {
    let addr = listen_addr(&socket)?;
    if std::os::unix::net::UnixStream::connect_addr(&addr).is_ok() {
        anyhow::bail!("another data-plane daemon already listens for {}", socket.display());
    }
    // A socket file left by an older build.
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(UnixListener::from_std)
        .with_context(|| format!("listening for {}", socket.display()))?;
    // The planes start with the first UDP network (a VXLAN-only host binds no port).
    let planes: Arc<Mutex<Option<Planes>>> = Arc::default();
    let dns = Arc::new(Mutex::new(DnsServers::new(Upstream::new(Vec::new()))));
    let pid = std::process::id();
    write_atomic(&pid_path(&socket), format!("{pid}\n").as_bytes())
        .context("writing the pid file")?;
    info!(pid, udp_port = settings.udp_port, "data-plane daemon listening");

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let counters_task = tokio::spawn(write_counters(planes.clone(), counters_path(&socket)));
    // A namespace deleted while no agent runs must not be kept alive by its DNS sockets.
    let prune_task = tokio::spawn({
        let dns = dns.clone();
        async move {
            loop {
                tokio::time::sleep(PRUNE_INTERVAL).await;
                dns.lock().await.prune();
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = stop_rx.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if !same_user(&stream) => {
                    warn!("refused a data-plane connection from another user");
                }
                Ok((stream, _)) => {
                    let ctx = Session {
                        planes: planes.clone(),
                        dns: dns.clone(),
                        settings: settings.clone(),
                        stop: stop_tx.clone(),
                        pid_file: pid_path(&socket),
                    };
                    tokio::spawn(ctx.run(stream).in_current_span());
                }
                Err(e) => warn!("accepting an agent connection: {e}"),
            },
        }
    }
    counters_task.abort();
    prune_task.abort();
    info!("data-plane daemon stopping");
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(pid_path(&socket));
    if let Some(p) = planes.lock().await.as_mut() {
        p.stop();
    }
    Ok(())
}

struct Session {
    planes: Arc<Mutex<Option<Planes>>>,
    dns: Arc<Mutex<DnsServers>>,
    settings: DaemonSettings,
    stop: watch::Sender<bool>,
    pid_file: PathBuf,
}

impl Session {
    async fn run(self, stream: UnixStream) {
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let (response, stop) = match decode::<Request>(&line) {
                Ok(req) => self.handle(req).await,
                Err(e) => (Response::Error { message: format!("bad request: {e}") }, false),
            };
            let Ok(text) = encode(&response) else { break };
            if w.write_all(text.as_bytes()).await.is_err() {
                break;
            }
            if stop {
                let _ = self.stop.send(true);
                break;
            }
        }
    }

    async fn handle(&self, req: Request) -> (Response, bool) {
        // The data dir may have been deleted under us (it is disposable): the pid file
        // is how the agent's tooling finds this process, so it comes back.
        let pid = std::process::id();
        if recorded_pid(&self.pid_file.with_extension("sock")) != Some(pid) {
            let _ = write_atomic(&self.pid_file, format!("{pid}\n").as_bytes());
        }
        match req {
            Request::Hello => (Response::Hello { pid, settings: self.settings.clone() }, false),
            Request::SetTables { tables } => {
                let mut planes = self.planes.lock().await;
                if planes.is_none() && !tables.networks.is_empty() {
                    match Planes::start(&self.settings).await {
                        Ok(p) => *planes = Some(p),
                        Err(e) => return (Response::Error { message: format!("{e:#}") }, false),
                    }
                }
                let Some(p) = planes.as_mut() else { return (Response::Applied, false) };
                match p.set_tables(&tables) {
                    Ok(()) => (Response::Applied, false),
                    Err(e) => (Response::Error { message: format!("{e:#}") }, false),
                }
            }
            Request::SetDns { dns } => {
                let mut servers = self.dns.lock().await;
                let outcome = servers.set(&dns);
                let response = Response::Dns {
                    revision: servers.revision(),
                    served: outcome.served.into_iter().collect(),
                    failed: outcome.failed.into_iter().collect(),
                };
                (response, false)
            }
            Request::Shutdown => (Response::Bye, true),
        }
    }
}

async fn write_counters(planes: Arc<Mutex<Option<Planes>>>, path: PathBuf) {
    let mut last = String::new();
    loop {
        tokio::time::sleep(COUNTERS_INTERVAL).await;
        let Some(json) = planes.lock().await.as_ref().map(Planes::counters_json) else {
            continue;
        };
        if json != last {
            if let Err(e) = write_atomic(&path, json.as_bytes()) {
                warn!("writing {}: {e}", path.display());
            }
            last = json;
        }
    }
}

/// Whether the peer of `stream` runs as this daemon's user (root): the abstract socket
/// has no file permissions to keep others out.
fn same_user(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    stream.peer_cred().is_ok_and(|c| c.uid() == me)
}

/// The pid a daemon recorded next to `socket`, if any.
pub fn recorded_pid(socket: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_path(socket)).ok()?.trim().parse().ok()
}
