//! The data-plane daemon: `overlay-agent --dataplane-daemon SOCKET`. It owns the
//! user-space UDP engine (and the QUIC plane for `--encrypted` networks), forwards by
//! the tables the agent sends, and keeps forwarding while no agent is connected.
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

use super::client::{counters_path, pid_path};
use super::planes::Planes;
use super::protocol::{decode, encode, DaemonSettings, Request, Response};
use crate::store::write_atomic;

const COUNTERS_INTERVAL: Duration = Duration::from_secs(2);

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
    if UnixStream::connect(&socket).await.is_ok() {
        anyhow::bail!("another data-plane daemon already listens on {}", socket.display());
    }
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("listening on {}", socket.display()))?;
    // The pid file is written only once the planes run: a daemon that failed to start
    // leaves neither it nor its socket behind.
    let planes = match Planes::start(&settings).await {
        Ok(p) => Arc::new(Mutex::new(p)),
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let pid = std::process::id();
    write_atomic(&pid_path(&socket), format!("{pid}\n").as_bytes())
        .context("writing the pid file")?;
    info!(pid, udp_port = settings.udp_port, "data-plane daemon listening");

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let counters_task = tokio::spawn(write_counters(planes.clone(), counters_path(&socket)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = stop_rx.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let ctx = Session { planes: planes.clone(), settings: settings.clone(), stop: stop_tx.clone() };
                    tokio::spawn(ctx.run(stream).in_current_span());
                }
                Err(e) => warn!("accepting an agent connection: {e}"),
            },
        }
    }
    counters_task.abort();
    info!("data-plane daemon stopping");
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(pid_path(&socket));
    planes.lock().await.stop();
    Ok(())
}

struct Session {
    planes: Arc<Mutex<Planes>>,
    settings: DaemonSettings,
    stop: watch::Sender<bool>,
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
        match req {
            Request::Hello => (
                Response::Hello { pid: std::process::id(), settings: self.settings.clone() },
                false,
            ),
            Request::SetTables { tables } => match self.planes.lock().await.set_tables(&tables) {
                Ok(()) => (Response::Applied, false),
                Err(e) => (Response::Error { message: format!("{e:#}") }, false),
            },
            Request::Shutdown => (Response::Bye, true),
        }
    }
}

async fn write_counters(planes: Arc<Mutex<Planes>>, path: PathBuf) {
    let mut last = String::new();
    loop {
        tokio::time::sleep(COUNTERS_INTERVAL).await;
        let json = planes.lock().await.counters_json();
        if json != last {
            if let Err(e) = write_atomic(&path, json.as_bytes()) {
                warn!("writing {}: {e}", path.display());
            }
            last = json;
        }
    }
}

/// The pid a daemon recorded next to `socket`, if any.
pub fn recorded_pid(socket: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_path(socket)).ok()?.trim().parse().ok()
}
