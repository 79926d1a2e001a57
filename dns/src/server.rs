//! The server loop: one per endpoint, listening on 127.0.0.11:53 inside the endpoint's
//! network namespace, answering as that endpoint.
//!
//! Why this shape: the agent runs one server per endpoint, so a server must be cheap
//! (two small buffers; the records are the shared `Arc<DnsView>`), and local answers
//! must be fast. Local queries are answered inline in the receive loop — parse, resolve,
//! write into a reused buffer, send — with no allocation and no task spawn; only
//! forwards (which wait on the network) get a task of their own, bounded in number.
//! The view is swapped without locks: the loop keeps its own `Arc` and looks at the
//! watch channel's version between batches of packets.
//!
//! Sockets come in already bound ([`bind_in_netns`] opens them inside a namespace), so
//! tests bind port 0 on loopback and the agent decides where servers listen.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::records::DnsView;
use crate::resolver::{resolve, Answer};
use crate::upstream::{Transport, Upstream};
use crate::wire::{self, Rcode, MAX_QUERY_LEN, MAX_TCP_RESPONSE};

/// Limits of one server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A TCP connection with no complete query for this long is closed (RFC 7766
    /// suggests seconds, not minutes).
    pub tcp_idle: Duration,
    /// TCP connections served at once; more are closed on accept.
    pub max_tcp_connections: usize,
    /// UDP queries being forwarded at once; more get SERVFAIL right away.
    pub max_forwards: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tcp_idle: Duration::from_secs(10),
            max_tcp_connections: 32,
            max_forwards: 128,
        }
    }
}

/// Packets handled before the loop yields to other tasks, so one busy server cannot
/// hog a worker thread.
const BATCH: usize = 64;

/// Serves DNS on `udp` and `tcp` as endpoint `asker` until `shutdown` completes, with
/// the default [`ServerConfig`]. Returns early only on a fatal socket error.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    asker: String,
    view: watch::Receiver<Arc<DnsView>>,
    upstream: Arc<Upstream>,
    shutdown: impl Future,
) -> io::Result<()> {
    serve_with(udp, tcp, asker, view, upstream, ServerConfig::default(), shutdown).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    udp: UdpSocket,
    tcp: TcpListener,
    asker: String,
    view: watch::Receiver<Arc<DnsView>>,
    upstream: Arc<Upstream>,
    config: ServerConfig,
    shutdown: impl Future,
) -> io::Result<()> {
    let asker: Arc<str> = asker.into();
    let udp_loop =
        serve_udp(udp, asker.clone(), view.clone(), upstream.clone(), config.max_forwards);
    let tcp_loop = serve_tcp(tcp, asker, view, upstream, config);
    // Dropping the loops on shutdown aborts their connection and forward tasks.
    tokio::select! {
        _ = shutdown => Ok(()),
        r = udp_loop => r,
        r = tcp_loop => r,
    }
}

/// The current view, refreshed if the agent published a new one.
fn refresh(current: &mut Arc<DnsView>, view: &mut watch::Receiver<Arc<DnsView>>) {
    // Err: the agent dropped the sender; keep answering from the last view.
    if view.has_changed().unwrap_or(false) {
        *current = view.borrow_and_update().clone();
    }
}

async fn serve_udp(
    udp: UdpSocket,
    asker: Arc<str>,
    mut view: watch::Receiver<Arc<DnsView>>,
    upstream: Arc<Upstream>,
    max_forwards: usize,
) -> io::Result<()> {
    let sock = Arc::new(udp);
    let forwards = Arc::new(Semaphore::new(max_forwards));
    let mut tasks = JoinSet::new();
    let mut current = view.borrow_and_update().clone();
    // One byte more than the largest query we take, to tell an oversized one.
    let mut buf = vec![0u8; MAX_QUERY_LEN + 1];
    let mut out = Vec::with_capacity(512);
    loop {
        sock.readable().await?;
        refresh(&mut current, &mut view);
        let mut drained = false;
        for _ in 0..BATCH {
            let (n, peer) = match sock.try_recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    // e.g. an ICMP error for an earlier reply: not fatal
                    debug!(error = %e, "udp receive");
                    continue;
                }
            };
            let packet = &buf[..n];
            let respond = match wire::parse(packet) {
                Ok(query) => match resolve(&current, &asker, &query) {
                    Answer::Local(local) => {
                        local.write(&query, query.udp_limit(), &mut out);
                        true
                    }
                    Answer::Forward => match forwards.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let (sock, upstream, packet) =
                                (sock.clone(), upstream.clone(), packet.to_vec());
                            tasks.spawn(async move {
                                if let Some(resp) = upstream.forward(&packet, Transport::Udp).await
                                {
                                    if let Err(e) = sock.send_to(&resp, peer).await {
                                        debug!(%peer, error = %e, "udp send");
                                    }
                                }
                                drop(permit);
                            });
                            false
                        }
                        Err(_) => {
                            debug!("too many forwards under way");
                            wire::write_response(
                                &query,
                                Rcode::ServFail,
                                false,
                                wire::Rdata::None,
                                0,
                                query.udp_limit(),
                                &mut out,
                            );
                            true
                        }
                    },
                },
                Err(e) => {
                    debug!(%peer, error = %e, "malformed query");
                    wire::write_error(packet, Rcode::FormErr, &mut out)
                }
            };
            if respond {
                send_udp(&sock, &out, peer).await;
            }
        }
        while tasks.try_join_next().is_some() {}
        if !drained {
            // more packets are waiting: let other tasks on this worker run first
            tokio::task::yield_now().await;
        }
    }
}

async fn send_udp(sock: &UdpSocket, data: &[u8], peer: SocketAddr) {
    let result = match sock.try_send_to(data, peer) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.send_to(data, peer).await,
        r => r,
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "udp send");
    }
}

async fn serve_tcp(
    tcp: TcpListener,
    asker: Arc<str>,
    view: watch::Receiver<Arc<DnsView>>,
    upstream: Arc<Upstream>,
    config: ServerConfig,
) -> io::Result<()> {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = tcp.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning
                        warn!(error = %e, "tcp accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                while conns.try_join_next().is_some() {}
                if conns.len() >= config.max_tcp_connections {
                    debug!(%peer, "too many tcp connections; closing");
                    continue;
                }
                let conn = serve_conn(stream, asker.clone(), view.clone(), upstream.clone(), config.tcp_idle);
                conns.spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%peer, error = %e, "tcp connection");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One TCP connection: length-prefixed queries, answered in order, until the client
/// closes, sends junk, or stays idle for `idle`.
async fn serve_conn(
    mut stream: TcpStream,
    asker: Arc<str>,
    mut view: watch::Receiver<Arc<DnsView>>,
    upstream: Arc<Upstream>,
    idle: Duration,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut current = view.borrow_and_update().clone();
    let mut buf = Vec::with_capacity(512);
    let mut out = Vec::with_capacity(512);
    loop {
        let mut len = [0u8; 2];
        match timeout(idle, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()), // idle
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len > MAX_QUERY_LEN {
            // Answer FORMERR from the header, then hang up: the rest is not worth reading.
            let mut head = [0u8; wire::HEADER_LEN];
            let read = timeout(idle, stream.read_exact(&mut head)).await;
            if read.is_ok_and(|r| r.is_ok()) && wire::write_error(&head, Rcode::FormErr, &mut out) {
                write_framed(&mut stream, &out, idle).await?;
            }
            return Ok(());
        }
        buf.resize(len, 0);
        match timeout(idle, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        refresh(&mut current, &mut view);
        match wire::parse(&buf) {
            Ok(query) => match resolve(&current, &asker, &query) {
                Answer::Local(local) => local.write(&query, MAX_TCP_RESPONSE, &mut out),
                Answer::Forward => match upstream.forward(&buf, Transport::Tcp).await {
                    Some(resp) => out = resp,
                    None => continue,
                },
            },
            Err(_) => {
                if !wire::write_error(&buf, Rcode::FormErr, &mut out) {
                    continue;
                }
            }
        }
        write_framed(&mut stream, &out, idle).await?;
    }
}

/// Writes one length-prefixed message in a single write.
async fn write_framed(stream: &mut TcpStream, msg: &[u8], idle: Duration) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::ErrorKind::InvalidData)?;
    let mut framed = Vec::with_capacity(2 + msg.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    timeout(idle, stream.write_all(&framed))
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Opens a UDP socket and a TCP listener on `addr` inside the network namespace at
/// `netns_path` (e.g. `/var/run/netns/NAME`), both non-blocking, ready for
/// `tokio::net::UdpSocket::from_std` / `TcpListener::from_std`.
///
/// A socket belongs to the namespace it was created in for its whole life, so a
/// short-lived thread enters the namespace, binds and exits; no thread of the caller
/// (nor of tokio) ever changes namespace. The namespace's `lo` must be up for
/// 127.0.0.11 to be reachable: that is the agent's job.
pub fn bind_in_netns(
    netns_path: &Path,
    addr: SocketAddr,
) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let ns = File::open(netns_path)?;
    let thread = std::thread::Builder::new().name("ovdns-bind".into()).spawn(move || {
        // SAFETY: setns only reads the fd, which `ns` keeps open for the call; it
        // changes the network namespace of this thread alone, which exits right after.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let udp = std::net::UdpSocket::bind(addr)?;
        udp.set_nonblocking(true)?;
        let tcp = std::net::TcpListener::bind(addr)?;
        tcp.set_nonblocking(true)?;
        Ok((udp, tcp))
    })?;
    thread.join().map_err(|_| io::Error::other("namespace bind thread panicked"))?
}
