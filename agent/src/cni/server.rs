//! The agent's unix socket for `overlay-cni` (`--socket`, default
//! `/run/overlay/agent.sock`): root only (socket 0600, a directory it creates 0700, and
//! the peer's uid checked), one request and one reply per connection, as JSON lines.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use overlay_cni::protocol::{
    self, Failure, FailureKind, Reply, Request, MAX_LINE, PROTOCOL_VERSION,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn, Instrument};

use super::{attach, Cni};

/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The default socket path (see `overlay_cni::spec::DEFAULT_SOCKET`).
pub const DEFAULT_SOCKET: &str = overlay_cni::spec::DEFAULT_SOCKET;

/// Binds `path` for root only. A socket file left by a previous agent is replaced; one
/// another process still serves is not (two agents must not share a socket).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another process (another overlay-agent?)", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the plugin's requests until the task is aborted.
pub async fn run(listener: UnixListener, path: PathBuf, cni: Arc<Cni>) {
    info!(socket = %path.display(), "serving overlay-cni requests");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let cni = cni.clone();
                tokio::spawn(async move { connection(stream, cni).await });
            }
            Err(e) => {
                warn!(socket = %path.display(), "accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, cni: Arc<Cni>) {
    let uid = stream.peer_cred().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let reply = match uid {
        Ok(0) => match read_request(read).await {
            Ok(request) => {
                let span = tracing::info_span!(
                    "cni",
                    op = ?request.op,
                    container = %request.container_id,
                    network = %request.network,
                    ifname = %request.ifname
                );
                attach::handle(&cni, request).instrument(span).await
            }
            Err(failure) => Reply::Failed(failure),
        },
        Ok(uid) => Reply::Failed(Failure::new(
            FailureKind::InvalidRequest,
            format!("only root may use the overlay agent's socket (caller uid {uid})"),
        )),
        Err(e) => {
            Reply::Failed(Failure::new(FailureKind::Internal, format!("peer credentials: {e}")))
        }
    };
    match protocol::encode(&reply) {
        Ok(line) => {
            if let Err(e) = write.write_all(line.as_bytes()).await {
                debug!("the plugin went away before the reply: {e}");
            }
        }
        Err(e) => warn!("cannot encode a reply: {e}"),
    }
}

/// One request line, bounded in size and time.
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, Failure> {
    let bad = |msg: String| Failure::new(FailureKind::InvalidRequest, msg);
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64 + 1));
    match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(0)) => return Err(bad("empty request".into())),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(bad(format!("reading the request: {e}"))),
        Err(_) => return Err(bad(format!("no request within {}s", READ_TIMEOUT.as_secs()))),
    }
    // Check the version before the shape, so an incompatible plugin is named as such.
    let version = serde_json::from_str::<serde_json::Value>(line.trim_end())
        .ok()
        .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
    if let Some(v) = version.filter(|v| *v != u64::from(PROTOCOL_VERSION)) {
        return Err(Failure::new(
            FailureKind::Version,
            format!("overlay-cni speaks protocol {v}, this agent {PROTOCOL_VERSION}: install matching versions"),
        ));
    }
    protocol::decode(&line).map_err(|e| bad(format!("bad request: {e}")))
}
