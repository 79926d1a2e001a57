//! Forwarding names that are not ours to the host's own resolvers.
//!
//! Why it exists apart from the server: forwarding is the only slow, fallible path
//! (network round trips, timeouts, retries over TCP), and it runs from the agent's own
//! (host) network namespace — an endpoint's namespace usually has no route to the
//! host's resolvers, and a loopback resolver on the host (systemd-resolved's
//! 127.0.0.53) is unreachable from inside it. Sockets created here are made by tokio's
//! worker threads, which never leave the host namespace (see `server::bind_in_netns`).
//!
//! Every forward gets a fresh socket on a random port and a random query id, accepts
//! only a reply from the server it asked that carries that id and echoes the
//! question, and ends within the configured budget (2 s by default): the client gets
//! SERVFAIL rather than silence.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout, Instant};
use tracing::debug;

use crate::wire::{self, Query, Rcode, Rdata, CLASSIC_UDP_LIMIT, HEADER_LEN, MAX_TCP_RESPONSE};

/// How long a client waits at most before it gets SERVFAIL, all upstreams included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The least time one upstream gets before we try the next.
const MIN_ATTEMPT: Duration = Duration::from_millis(500);
/// glibc uses at most this many `nameserver` lines; so do we.
pub const MAX_SERVERS: usize = 3;
/// The host's resolver list.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// What systemd-resolved itself forwards to, for hosts whose resolv.conf only names the
/// loopback stub.
pub const SYSTEMD_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// How the client reached us; forwarding uses the same transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

#[derive(Debug, Error)]
pub enum UpstreamError {
    /// The resolver configuration could not be read.
    #[error("cannot read resolver configuration {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

/// The host's resolvers, shared by every server of the agent. The list can be replaced
/// at run time ([`reload`](Self::reload)) when the host's resolv.conf changes.
#[derive(Debug)]
pub struct Upstream {
    servers: RwLock<Arc<[SocketAddr]>>,
    timeout: Duration,
}

impl Upstream {
    /// Forwards to `servers`, tried in order, with the default 2 s budget.
    pub fn new(servers: Vec<SocketAddr>) -> Upstream {
        Upstream { servers: RwLock::new(servers.into()), timeout: DEFAULT_TIMEOUT }
    }

    /// Sets the total time a forward may take before the client gets SERVFAIL.
    pub fn with_timeout(mut self, timeout: Duration) -> Upstream {
        self.timeout = timeout;
        self
    }

    /// Reads `nameserver` lines from a resolv.conf file (loopback ones skipped).
    pub fn from_resolv_conf(path: &Path) -> Result<Upstream, UpstreamError> {
        Ok(Upstream::new(read_resolv_conf(path)?))
    }

    /// The host's resolvers: [`RESOLV_CONF`], or, when that names only loopback
    /// resolvers (a local stub such as systemd-resolved), [`SYSTEMD_RESOLV_CONF`]. An
    /// empty list is allowed: every forward then gets SERVFAIL at once.
    pub fn from_system() -> Upstream {
        Upstream::new(system_servers())
    }

    /// Replaces the list from a resolv.conf file; returns how many servers it has now.
    pub fn reload(&self, path: &Path) -> Result<usize, UpstreamError> {
        let servers = read_resolv_conf(path)?;
        let n = servers.len();
        self.set_servers(servers);
        Ok(n)
    }

    /// Replaces the list; forwards already under way finish with the old one.
    pub fn set_servers(&self, servers: Vec<SocketAddr>) {
        *self.servers.write().unwrap_or_else(PoisonError::into_inner) = servers.into();
    }

    /// The current list.
    pub fn servers(&self) -> Arc<[SocketAddr]> {
        self.servers.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Forwards the raw query `packet` and returns the response for the client: the
    /// upstream's (with the client's id), a TC response if it does not fit the
    /// client's UDP limit, or SERVFAIL when no upstream answered in time. `None` when
    /// the packet warrants no response at all (it is not a query).
    pub async fn forward(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let query = match wire::parse(packet) {
            Ok(q) => q,
            Err(_) => {
                let mut out = Vec::new();
                return wire::write_error(packet, Rcode::FormErr, &mut out).then_some(out);
            }
        };
        let limit = match transport {
            Transport::Udp => query.udp_limit(),
            Transport::Tcp => MAX_TCP_RESPONSE,
        };
        let deadline = Instant::now() + self.timeout;
        let servers = self.servers();
        let id = random_id();
        let mut outgoing = packet.to_vec();
        outgoing[..2].copy_from_slice(&id.to_be_bytes());
        let share = self.timeout / (servers.len().max(1) as u32);

        for &server in servers.iter() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let budget = share.max(MIN_ATTEMPT).min(deadline - now);
            let result = match transport {
                Transport::Udp => udp_exchange(server, &outgoing, &query, id, budget).await,
                Transport::Tcp => tcp_exchange(server, &outgoing, &query, id, budget).await,
            };
            let mut response = match result {
                Ok(r) => r,
                Err(e) => {
                    debug!(%server, name = %query.name.to_dotted(), error = %e, "upstream failed");
                    continue;
                }
            };
            if transport == Transport::Udp && wire::is_truncated(&response) {
                let budget = deadline.saturating_duration_since(Instant::now());
                match tcp_exchange(server, &outgoing, &query, id, budget).await {
                    Ok(full) if full.len() <= limit => response = full,
                    Ok(_) => {} // still too big for the client: pass TC on
                    Err(e) => debug!(%server, error = %e, "upstream retry over TCP failed"),
                }
            }
            if response.len() > limit {
                wire::write_response(
                    &query,
                    Rcode::NoError,
                    false,
                    Rdata::None,
                    0,
                    0,
                    &mut response,
                );
            }
            response[..2].copy_from_slice(&query.id.to_be_bytes());
            return Some(response);
        }
        let mut out = Vec::new();
        wire::write_response(&query, Rcode::ServFail, false, Rdata::None, 0, limit, &mut out);
        Some(out)
    }
}

fn read_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, UpstreamError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| UpstreamError::Read { path: path.to_owned(), source })?;
    Ok(parse_resolv_conf(&text))
}

fn system_servers() -> Vec<SocketAddr> {
    for path in [RESOLV_CONF, SYSTEMD_RESOLV_CONF] {
        match read_resolv_conf(Path::new(path)) {
            Ok(servers) if !servers.is_empty() => return servers,
            Ok(_) => debug!(path, "no usable nameserver"),
            Err(e) => debug!(error = %e, "skipping"),
        }
    }
    Vec::new()
}

/// The usable `nameserver` addresses of a resolv.conf text, port 53, at most
/// [`MAX_SERVERS`]. Loopback and unspecified addresses are skipped: from an endpoint
/// they would mean the endpoint itself (or us: a loop), and a host-local stub is not
/// something to forward to from outside the host namespace's point of view. Link-local
/// IPv6 addresses with a zone (`fe80::1%eth0`) are skipped too.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            continue;
        }
        let addr = SocketAddr::new(ip, 53);
        if !out.contains(&addr) && out.len() < MAX_SERVERS {
            out.push(addr);
        }
    }
    out
}

/// A query id nobody off this host can predict.
fn random_id() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    RandomState::new().hash_one(n) as u16
}

/// Whether `response` answers our `outgoing` query: id, QR, and the same question.
fn answers(response: &[u8], outgoing: &[u8], query: &Query<'_>, id: u16) -> bool {
    let qend = query.question_end;
    wire::is_response_to(response, id)
        && response.get(4..6) == Some(&[0, 1])
        && match (response.get(HEADER_LEN..qend), outgoing.get(HEADER_LEN..qend)) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        }
}

async fn udp_exchange(
    server: SocketAddr,
    outgoing: &[u8],
    query: &Query<'_>,
    id: u16,
    budget: Duration,
) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // Room for the largest answer the client asked for, plus one byte to notice a
    // datagram that did not fit.
    let size =
        query.edns.map_or(CLASSIC_UDP_LIMIT, |e| usize::from(e.udp_size)).max(CLASSIC_UDP_LIMIT);
    let exchange = async {
        let sock = UdpSocket::bind(local).await?;
        sock.connect(server).await?;
        sock.send(outgoing).await?;
        let mut buf = vec![0u8; size + 1];
        loop {
            let n = sock.recv(&mut buf).await?;
            if n <= size && answers(&buf[..n], outgoing, query, id) {
                buf.truncate(n);
                return Ok(buf);
            }
            debug!(%server, bytes = n, "ignoring stray or oversized datagram");
        }
    };
    timeout(budget, exchange).await.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

async fn tcp_exchange(
    server: SocketAddr,
    outgoing: &[u8],
    query: &Query<'_>,
    id: u16,
    budget: Duration,
) -> io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        stream.set_nodelay(true)?;
        let len = u16::try_from(outgoing.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut msg = Vec::with_capacity(2 + outgoing.len());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(outgoing);
        stream.write_all(&msg).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await?;
        if answers(&buf, outgoing, query, id) {
            Ok(buf)
        } else {
            Err(io::Error::new(io::ErrorKind::InvalidData, "reply does not answer the query"))
        }
    };
    timeout(budget, exchange).await.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_skips_loopback_and_junk() {
        let text = "\
# comment
search example.com
nameserver 127.0.0.53
nameserver 10.1.2.3 # trailing comment
nameserver ::1
nameserver 0.0.0.0
nameserver ::ffff:127.0.0.1
nameserver fe80::1%eth0
nameserver not-an-ip
nameserver
nameserver 10.1.2.3
nameserver 2001:db8::1
options ndots:2
nameserver 10.9.9.9
nameserver 10.9.9.10
";
        let got = parse_resolv_conf(text);
        let want: Vec<SocketAddr> = vec![
            "10.1.2.3:53".parse().expect("addr"),
            "[2001:db8::1]:53".parse().expect("addr"),
            "10.9.9.9:53".parse().expect("addr"),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn reload_replaces_servers() {
        let dir = std::env::temp_dir().join(format!("ovdns-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "nameserver 10.0.0.1\n").expect("write");
        let up = Upstream::from_resolv_conf(&path).expect("reads");
        assert_eq!(up.servers().len(), 1);
        std::fs::write(&path, "nameserver 10.0.0.1\nnameserver 10.0.0.2\n").expect("write");
        assert_eq!(up.reload(&path).expect("reads"), 2);
        assert!(matches!(
            Upstream::from_resolv_conf(&dir.join("missing")),
            Err(UpstreamError::Read { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ids_vary() {
        let ids: std::collections::BTreeSet<u16> = (0..64).map(|_| random_id()).collect();
        assert!(ids.len() > 50, "{}", ids.len());
    }

    #[tokio::test]
    async fn no_servers_means_servfail_at_once() {
        let up = Upstream::new(Vec::new());
        let mut q = Vec::new();
        wire::write_query(9, "example.com", wire::TYPE_A, None, &mut q).expect("valid");
        let start = std::time::Instant::now();
        let resp = up.forward(&q, Transport::Udp).await.expect("a response");
        assert!(start.elapsed() < Duration::from_millis(100));
        let r = wire::read_response(&resp).expect("reads");
        assert_eq!((r.id, r.rcode), (9, 2));
    }

    #[tokio::test]
    async fn garbage_gets_formerr_or_nothing() {
        let up = Upstream::new(Vec::new());
        assert_eq!(up.forward(&[1, 2, 3], Transport::Udp).await, None);
        let resp = up.forward(&[0, 5, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0], Transport::Tcp).await;
        let r = wire::read_response(&resp.expect("a response")).expect("reads");
        assert_eq!((r.id, r.rcode), (5, 1));
    }
}
