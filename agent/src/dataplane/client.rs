//! The agent's side: keep one data-plane daemon with the right settings running, and
//! hand it the tables after every reconcile pass.
//!
//! The daemon is this same binary started with `--dataplane-daemon SOCKET` in its own
//! session, so it outlives the agent: an agent that is stopped, killed or upgraded
//! leaves UDP-encapsulated traffic flowing, exactly as it leaves kernel VXLAN devices
//! in place. A restarted agent finds the daemon through its socket and takes over.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tracing::{info, warn};

use super::protocol::{decode, encode, DaemonSettings, DnsTables, Request, Response, Tables};

/// Longest a request may take (a TAP device is created in well under this).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a freshly spawned daemon may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the daemon leaves its pid and counters, inside `data_dir` (`dataplane.pid`,
/// `dataplane-counters.json` next to this name). It listens on [`listen_addr`] of it.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("dataplane.sock")
}

/// The daemon's socket: an abstract unix socket (in the host's network namespace, no
/// file), named after `socket`, so an agent whose data dir was deleted still finds the
/// daemon that holds its endpoints' DNS. Only processes of the daemon's own user are
/// answered (see the daemon's `accept`).
pub fn listen_addr(socket: &Path) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    let full = format!("overlay-agent-dataplane:{}", socket.display());
    // sun_path holds 107 bytes after the leading NUL: keep the end (the distinct part).
    let start = full.len().saturating_sub(100);
    let name = full.get(start..).unwrap_or(&full);
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// A connection to the daemon for `socket`.
async fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    let std = std::os::unix::net::UnixStream::connect_addr(&listen_addr(socket)?)?;
    std.set_nonblocking(true)?;
    UnixStream::from_std(std)
}

pub fn pid_path(socket: &Path) -> PathBuf {
    socket.with_extension("pid")
}

pub fn counters_path(socket: &Path) -> PathBuf {
    socket.with_file_name("dataplane-counters.json")
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Conn {
    async fn connect(socket: &Path) -> std::io::Result<Conn> {
        let (r, w) = connect(socket).await?.into_split();
        Ok(Conn { reader: BufReader::new(r), writer: w })
    }

    async fn call(&mut self, req: &Request) -> Result<Response> {
        let exchange = async {
            self.writer.write_all(encode(req)?.as_bytes()).await?;
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                bail!("the data-plane daemon closed the connection");
            }
            Ok(decode::<Response>(&line)?)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .context("the data-plane daemon did not answer in time")?
    }
}

/// What the daemon said about the DNS it serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsAnswer {
    pub revision: Option<u64>,
    pub served: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// Handle on the (possibly not yet running) daemon.
pub struct DataplaneClient {
    socket: PathBuf,
    settings: DaemonSettings,
    conn: Option<Conn>,
    /// The daemon we spawned, reaped if it exits while we run.
    child: Option<Child>,
}

impl DataplaneClient {
    pub fn new(data_dir: &Path, settings: DaemonSettings) -> DataplaneClient {
        DataplaneClient { socket: socket_path(data_dir), settings, conn: None, child: None }
    }

    /// New settings (a renewed certificate): a daemon running with other settings is
    /// replaced on the next [`apply`](Self::apply).
    pub fn set_settings(&mut self, settings: DaemonSettings) {
        if settings != self.settings {
            self.settings = settings;
            self.conn = None;
        }
    }

    /// A connection to the running daemon, started if `needed` and none runs; `None`
    /// when none runs and none is needed.
    async fn ensure(&mut self, needed: bool) -> Result<Option<&mut Conn>> {
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                warn!("the data-plane daemon exited ({status}); starting another");
                self.child = None;
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            match Conn::connect(&self.socket).await {
                Ok(c) => self.adopt(c).await?,
                Err(_) if !needed => return Ok(None),
                Err(_) => self.spawn().await?,
            }
        }
        Ok(self.conn.as_mut())
    }

    /// One request; the connection is dropped (and made again next time) on failure.
    async fn request(&mut self, needed: bool, req: &Request) -> Result<Option<Response>> {
        let Some(conn) = self.ensure(needed).await? else { return Ok(None) };
        match conn.call(req).await {
            Ok(Response::Error { message }) => bail!("data plane: {message}"),
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    /// Makes the daemon forward by `tables`. A host without UDP networks starts no
    /// daemon for them, but one already running (networks just removed) is told to drop
    /// them.
    pub async fn apply(&mut self, tables: &Tables) -> Result<()> {
        let req = Request::SetTables { tables: tables.clone() };
        match self.request(!tables.networks.is_empty(), &req).await? {
            None | Some(Response::Applied) => Ok(()),
            Some(other) => {
                self.conn = None;
                bail!("data plane: unexpected answer {other:?}")
            }
        }
    }

    /// Makes the daemon serve the endpoints' DNS as `dns` says (issue 15); it is started
    /// when some endpoint is to be served. Returns the records' revision it holds, the
    /// endpoints it serves and those it could not, with why.
    pub async fn dns(&mut self, dns: &DnsTables) -> Result<DnsAnswer> {
        let req = Request::SetDns { dns: Box::new(dns.clone()) };
        match self.request(!dns.serve.is_empty(), &req).await? {
            None => Ok(DnsAnswer::default()),
            Some(Response::Dns { revision, served, failed }) => {
                Ok(DnsAnswer { revision, served, failed })
            }
            Some(other) => {
                self.conn = None;
                bail!("data plane: unexpected answer {other:?}")
            }
        }
    }

    /// Takes over a running daemon, or replaces it when it runs with other settings.
    async fn adopt(&mut self, mut conn: Conn) -> Result<()> {
        match conn.call(&Request::Hello).await? {
            Response::Hello { settings, pid } if settings == self.settings => {
                info!(pid, "using the running data-plane daemon");
                self.conn = Some(conn);
                Ok(())
            }
            Response::Hello { pid, .. } => {
                info!(pid, "replacing the data-plane daemon (other build or settings)");
                let _ = conn.call(&Request::Shutdown).await;
                drop(conn);
                wait_gone(&self.socket).await;
                self.spawn().await
            }
            other => bail!("data plane: unexpected answer to hello: {other:?}"),
        }
    }

    /// A daemon of an older build listens on a socket file instead: it is told to stop,
    /// so the new one can take its ports.
    async fn stop_legacy(&self) {
        let Ok(stream) = UnixStream::connect(&self.socket).await else { return };
        let (r, w) = stream.into_split();
        let mut old = Conn { reader: BufReader::new(r), writer: w };
        info!("stopping the data-plane daemon of an older build");
        let _ = old.call(&Request::Shutdown).await;
        for _ in 0..100 {
            if UnixStream::connect(&self.socket).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn spawn(&mut self) -> Result<()> {
        self.stop_legacy().await;
        let exe = std::env::current_exe().context("locating overlay-agent's own binary")?;
        let settings = serde_json::to_string(&self.settings)?;
        let mut cmd = Command::new(exe);
        cmd.arg("--dataplane-daemon")
            .arg(&self.socket)
            .arg("--dataplane-settings")
            .arg(settings)
            .stdin(Stdio::null());
        // Its own session: a signal to the agent's process group does not reach it.
        // SAFETY: setsid is async-signal-safe and touches nothing of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting the data-plane daemon")?;
        info!(pid = child.id(), "started the data-plane daemon");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(mut conn) = Conn::connect(&self.socket).await {
                if let Ok(Response::Hello { .. }) = conn.call(&Request::Hello).await {
                    self.conn = Some(conn);
                    return Ok(());
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!("the data-plane daemon exited at start ({status}); see its log above");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the data-plane daemon did not listen on {}", self.socket.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits (bounded) until nobody listens on `socket` any more.
async fn wait_gone(socket: &Path) {
    for _ in 0..100 {
        if connect(socket).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
