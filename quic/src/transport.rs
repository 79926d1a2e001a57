//! [`QuicPlane`]: one QUIC endpoint per agent (client and server on one UDP socket) that
//! carries opaque datagrams between hosts as QUIC DATAGRAM frames.
//!
//! * One connection per peer is enough; when two hosts dial each other at once both
//!   connections are kept, each side receives on both and sends on the newest.
//!   A connection that closes is forgotten; the next datagram for that peer dials again,
//!   at most once per [`DIAL_RETRY`] (so a peer that keeps refusing us is not hammered).
//!   The stateless-reset and connection-ID keys are derived from the host's private key,
//!   so an agent that
//!   restarted (even after a crash) resets the connections of its previous run as soon as
//!   their packets reach it, and its peers dial again instead of waiting for the idle
//!   timeout.
//! * [`QuicPlane::send`] never blocks: it hands the datagram to quinn (which has its own
//!   bounded buffer) or, while a connection is being set up, queues a few per peer.
//! * An accepted connection is used only if the client's address belongs to a host the
//!   caller knows (`peer_name`) and the client's certificate names that host; anything
//!   else is closed and counted in [`Counters::rejected_peers`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::congestion::{BbrConfig, CubicConfig};
use quinn::{
    ClientConfig, Connection, ConnectionError, Endpoint, EndpointConfig, IdleTimeout,
    SendDatagramError, ServerConfig, TransportConfig, VarInt,
};
use quinn_proto::HashedConnectionIdGenerator;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::runtime::{Handle, Runtime};
use tracing::{debug, info, warn};

use crate::tls;
use crate::QuicError;
use overlay_pki::Identity;

/// The UDP port of the plane unless configured otherwise.
pub const DEFAULT_PORT: u16 = 7471;
/// Outer IPv4 (20) + UDP (8) header bytes in front of every QUIC packet.
pub const IPV4_UDP_OVERHEAD: u32 = 28;
/// What QUIC adds around one datagram, as quinn budgets it: short header (1 flags byte,
/// 8-byte connection ID, up to 4 packet-number bytes), AEAD tag (16) and the DATAGRAM
/// frame's type and length (bounded by 9).
pub const QUIC_DATAGRAM_OVERHEAD: u32 = 1 + 8 + 4 + 16 + 9;
/// QUIC needs UDP payloads of at least 1200 bytes; quinn takes at most 65527.
const UDP_PAYLOAD: std::ops::RangeInclusive<u32> = 1200..=65527;
/// A peer is dialed at most this often.
pub const DIAL_RETRY: Duration = Duration::from_secs(1);
/// Datagrams held per peer while its connection is being set up; more are dropped.
const PENDING_PER_PEER: usize = 64;
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Requested kernel socket buffers (the kernel caps them at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 8 << 20;
/// quinn's own per-connection datagram queues, each way.
const DATAGRAM_BUFFER: usize = 4 << 20;
/// Congestion window at the start of a connection, so a burst of frames is not held back
/// while the controller learns the path.
const INITIAL_WINDOW: u64 = 1 << 20;
/// How long dropping a plane that owns its runtime waits for the close to be sent, and
/// then for its tasks to stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);
/// Application close codes.
const CLOSE_WRONG_HOST: u32 = 1;
const CLOSE_SHUTDOWN: u32 = 0;

/// The largest datagram [`QuicPlane::send`] carries on an underlay with this MTU.
pub fn max_datagram_for_mtu(underlay_mtu: u32) -> usize {
    underlay_mtu.saturating_sub(IPV4_UDP_OVERHEAD + QUIC_DATAGRAM_OVERHEAD) as usize
}

/// How the plane paces datagrams. quinn congestion-controls DATAGRAM frames like stream
/// data; both start from [`INITIAL_WINDOW`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    Bbr,
}

pub struct QuicConfig {
    /// Address to bind (the underlay IP); peers are dialed on the same port.
    pub listen: SocketAddr,
    pub identity: Identity,
    /// MTU of the underlay interface; QUIC packets fill it (no MTU discovery).
    pub underlay_mtu: u32,
    /// Runtime to run on; `None` starts a small one owned by the plane.
    pub runtime: Option<Handle>,
    pub congestion: Congestion,
}

impl QuicConfig {
    pub fn new(listen: SocketAddr, identity: Identity, underlay_mtu: u32) -> QuicConfig {
        QuicConfig { listen, identity, underlay_mtu, runtime: None, congestion: Congestion::Cubic }
    }
}

/// Which host (by name, as in its certificate) is expected at an underlay address;
/// `None` for addresses that carry no encrypted network.
pub type PeerName = Arc<dyn Fn(IpAddr) -> Option<String> + Send + Sync>;
/// Called with the sending host's address and one datagram, on a runtime thread.
pub type OnDatagram = Arc<dyn Fn(IpAddr, &[u8]) + Send + Sync>;

/// What the plane has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams handed to QUIC.
    pub sent: u64,
    /// Datagrams received from authenticated peers and passed to `on_datagram`.
    pub received: u64,
    /// Datagrams not sent: no connection could be made, queue full, too large.
    pub dropped: u64,
    /// Connections refused: unknown address, certificate not from the CA, certificate for
    /// another host than the one at that address (inbound or outbound).
    pub rejected_peers: u64,
    /// Connections open now.
    pub connections: u64,
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    rejected_peers: AtomicU64,
    connections: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A peer's connections and, while none is up, the dial in progress.
#[derive(Default)]
struct Peer {
    connections: Vec<Connection>,
    dialing: bool,
    pending: VecDeque<Bytes>,
    last_dial: Option<Instant>,
}

struct Shared {
    endpoint: Endpoint,
    client: ClientConfig,
    port: u16,
    max_datagram: usize,
    handle: Handle,
    peer_name: PeerName,
    on_datagram: OnDatagram,
    peers: RwLock<HashMap<IpAddr, Peer>>,
    stats: Stats,
}

/// The encrypted datagram plane of one agent. Dropping it closes every connection; with
/// its own runtime it also releases the UDP socket before `drop` returns (on a caller's
/// runtime that happens once its tasks have seen the close, shortly after).
pub struct QuicPlane {
    shared: Arc<Shared>,
    local: SocketAddr,
    runtime: Option<Runtime>,
}

impl QuicPlane {
    /// Binds `cfg.listen` and starts accepting connections.
    pub fn start(
        cfg: QuicConfig,
        peer_name: PeerName,
        on_datagram: OnDatagram,
    ) -> Result<QuicPlane, QuicError> {
        let udp_payload = cfg.underlay_mtu.saturating_sub(IPV4_UDP_OVERHEAD);
        let udp_payload = match u16::try_from(udp_payload) {
            Ok(payload) if UDP_PAYLOAD.contains(&udp_payload) => payload,
            _ => return Err(QuicError::InvalidMtu(cfg.underlay_mtu)),
        };
        let (runtime, handle) = match cfg.runtime {
            Some(handle) => (None, handle),
            None => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("overlay-quic")
                    .enable_all()
                    .build()
                    .map_err(QuicError::Runtime)?;
                let handle = runtime.handle().clone();
                (Some(runtime), handle)
            }
        };

        let transport = Arc::new(transport_config(udp_payload, cfg.congestion));
        let mut server = ServerConfig::with_crypto(Arc::new(tls::server_crypto(&cfg.identity)?));
        server.transport_config(transport.clone());
        // A connection stays bound to the address it was authenticated from.
        server.migration(false);
        let mut client = ClientConfig::new(Arc::new(tls::client_crypto(&cfg.identity)?));
        client.transport_config(transport);
        let mut endpoint_config = endpoint_config(&cfg.identity);
        endpoint_config
            .max_udp_payload_size(udp_payload)
            .map_err(|_| QuicError::InvalidMtu(cfg.underlay_mtu))?;

        let socket = bind(cfg.listen)?;
        let endpoint = {
            let _guard = handle.enter();
            Endpoint::new(endpoint_config, Some(server), socket, Arc::new(quinn::TokioRuntime))
                .map_err(|source| QuicError::Bind { addr: cfg.listen, source })?
        };
        let local =
            endpoint.local_addr().map_err(|source| QuicError::Bind { addr: cfg.listen, source })?;
        let shared = Arc::new(Shared {
            endpoint,
            client,
            port: local.port(),
            max_datagram: max_datagram_for_mtu(cfg.underlay_mtu),
            handle: handle.clone(),
            peer_name,
            on_datagram,
            peers: RwLock::new(HashMap::new()),
            stats: Stats::default(),
        });
        handle.spawn(accept_loop(shared.clone()));
        info!(host = %cfg.identity.name(), %local, "encrypted plane listening");
        Ok(QuicPlane { shared, local, runtime })
    }

    /// Sends one datagram to the host at `peer` without blocking; `false` if it was
    /// dropped. With no connection yet, this starts one and queues the datagram.
    pub fn send(&self, peer: IpAddr, datagram: &[u8]) -> bool {
        let peer = peer.to_canonical();
        if let Some(conn) = self.shared.read_peers().get(&peer).and_then(|p| p.connections.last()) {
            return self.shared.send_on(conn, Bytes::copy_from_slice(datagram));
        }
        self.shared.queue_and_dial(peer, Bytes::copy_from_slice(datagram))
    }

    /// The largest datagram [`send`](Self::send) carries to `peer`: the open connection's
    /// limit, else what one will allow; `None` for an address that is no known host.
    pub fn max_datagram(&self, peer: IpAddr) -> Option<usize> {
        let peer = peer.to_canonical();
        let open = self
            .shared
            .read_peers()
            .get(&peer)
            .and_then(|p| p.connections.last())
            .map(Connection::max_datagram_size);
        match open {
            Some(size) => size,
            None => (self.shared.peer_name)(peer).map(|_| self.shared.max_datagram),
        }
    }

    pub fn counters(&self) -> Counters {
        let s = &self.shared.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            sent: get(&s.sent),
            received: get(&s.received),
            dropped: get(&s.dropped),
            rejected_peers: get(&s.rejected_peers),
            connections: get(&s.connections),
        }
    }

    /// The bound address (useful when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for QuicPlane {
    fn drop(&mut self) {
        self.shared.endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
        let Some(runtime) = self.runtime.take() else { return };
        if Handle::try_current().is_ok() {
            // Inside another runtime nothing may block.
            runtime.shutdown_background();
            return;
        }
        // Let the close reach the peers, then drop every task, so the socket is closed
        // when `shared` goes next and the address can be bound again at once.
        let endpoint = &self.shared.endpoint;
        runtime.block_on(async {
            let _ = tokio::time::timeout(SHUTDOWN_WAIT, endpoint.wait_idle()).await;
        });
        runtime.shutdown_timeout(SHUTDOWN_WAIT);
    }
}

/// A secret for `purpose` that is the same in every run of this host: derived from its
/// private key.
fn host_secret(identity: &Identity, purpose: &str) -> ring::digest::Digest {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(b"overlay-quic\0");
    digest.update(purpose.as_bytes());
    digest.update(b"\0");
    digest.update(identity.key.secret_der());
    digest.finish()
}

/// Keys that let a restarted endpoint recognise the connection IDs of its previous run
/// (quinn drops packets whose IDs it did not sign) and reset those connections with the
/// tokens it gave out then.
fn endpoint_config(identity: &Identity) -> EndpointConfig {
    let reset = host_secret(identity, "stateless reset");
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref());
    let mut config = EndpointConfig::new(Arc::new(reset_key));
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&host_secret(identity, "connection id").as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    config
}

fn transport_config(udp_payload: u16, congestion: Congestion) -> TransportConfig {
    let mut t = TransportConfig::default();
    // The underlay MTU is known; probing would only shrink datagrams to 1200 bytes first.
    t.initial_mtu(udp_payload).min_mtu(udp_payload).mtu_discovery_config(None);
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 30 s always fits a VarInt of milliseconds.
    t.max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER);
    // Frames travel only as datagrams.
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    match congestion {
        Congestion::Cubic => {
            let mut c = CubicConfig::default();
            c.initial_window(INITIAL_WINDOW);
            t.congestion_controller_factory(Arc::new(c));
        }
        Congestion::Bbr => {
            let mut c = BbrConfig::default();
            c.initial_window(INITIAL_WINDOW);
            t.congestion_controller_factory(Arc::new(c));
        }
    }
    t
}

fn bind(addr: SocketAddr) -> Result<std::net::UdpSocket, QuicError> {
    let err = |source| QuicError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    if let Err(e) = socket
        .set_recv_buffer_size(SOCKET_BUFFER)
        .and_then(|()| socket.set_send_buffer_size(SOCKET_BUFFER))
    {
        debug!("cannot enlarge the socket buffers: {e}");
    }
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

impl Shared {
    fn read_peers(&self) -> RwLockReadGuard<'_, HashMap<IpAddr, Peer>> {
        self.peers.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_peers(&self) -> RwLockWriteGuard<'_, HashMap<IpAddr, Peer>> {
        self.peers.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands `datagram` to quinn unless its queue is full (dropping the new datagram
    /// rather than, as quinn would, the oldest queued one, so the drop is counted).
    fn send_on(&self, conn: &Connection, datagram: Bytes) -> bool {
        if conn.datagram_send_buffer_space() < datagram.len() {
            bump(&self.stats.dropped);
            return false;
        }
        match conn.send_datagram(datagram) {
            Ok(()) => {
                bump(&self.stats.sent);
                true
            }
            Err(e) => {
                if !matches!(e, SendDatagramError::ConnectionLost(_)) {
                    debug!(peer = %conn.remote_address(), "datagram not sent: {e}");
                }
                bump(&self.stats.dropped);
                false
            }
        }
    }

    fn queue_and_dial(self: &Arc<Self>, peer: IpAddr, datagram: Bytes) -> bool {
        let Some(name) = (self.peer_name)(peer) else {
            bump(&self.stats.dropped);
            return false;
        };
        let mut peers = self.write_peers();
        let state = peers.entry(peer).or_default();
        if let Some(conn) = state.connections.last() {
            // Connected since the caller looked.
            return self.send_on(conn, datagram);
        }
        let queued = state.pending.len() < PENDING_PER_PEER;
        if queued {
            state.pending.push_back(datagram);
        } else {
            bump(&self.stats.dropped);
        }
        let now = Instant::now();
        if !state.dialing && state.last_dial.is_none_or(|at| now >= at + DIAL_RETRY) {
            state.dialing = true;
            state.last_dial = Some(now);
            self.handle.spawn(dial(self.clone(), peer, name));
        }
        queued
    }

    /// Starts using an authenticated connection: sends what waited for it, then reads
    /// until it closes.
    fn established(self: &Arc<Self>, peer: IpAddr, conn: Connection) {
        bump(&self.stats.connections);
        {
            let mut peers = self.write_peers();
            let state = peers.entry(peer).or_default();
            state.connections.push(conn.clone());
            for datagram in std::mem::take(&mut state.pending) {
                self.send_on(&conn, datagram);
            }
        }
        info!(%peer, id = conn.stable_id(), "connected");
        self.handle.spawn(read_loop(self.clone(), peer, conn));
    }

    fn closed(&self, peer: IpAddr, conn: &Connection, reason: &ConnectionError) {
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        let mut peers = self.write_peers();
        // The entry stays (it remembers the last dial); there is one per known host.
        if let Some(state) = peers.get_mut(&peer) {
            state.connections.retain(|c| c.stable_id() != conn.stable_id());
        }
        info!(%peer, id = conn.stable_id(), "connection closed: {reason}");
    }

    fn dial_failed(&self, peer: IpAddr) {
        let mut peers = self.write_peers();
        if let Some(state) = peers.get_mut(&peer) {
            state.dialing = false;
            if state.connections.is_empty() {
                let lost = state.pending.len() as u64;
                state.pending.clear();
                self.stats.dropped.fetch_add(lost, Ordering::Relaxed);
            }
        }
    }

    /// A handshake failed: counted as a rejection when it was this side that refused the
    /// peer (its certificate did not verify); a timeout or the peer refusing us is not.
    fn handshake_failed(&self, peer: IpAddr, direction: &str, e: &ConnectionError) {
        if matches!(e, ConnectionError::TransportError(_)) {
            bump(&self.stats.rejected_peers);
            warn!(%peer, "{direction} connection rejected: {e}");
        } else {
            warn!(%peer, "{direction} connection failed: {e}");
        }
    }
}

async fn dial(shared: Arc<Shared>, peer: IpAddr, name: String) {
    let addr = SocketAddr::new(peer, shared.port);
    let connecting = match shared.endpoint.connect_with(shared.client.clone(), addr, &name) {
        Ok(connecting) => connecting,
        Err(e) => {
            warn!(%peer, host = %name, "cannot dial: {e}");
            shared.dial_failed(peer);
            return;
        }
    };
    match connecting.await {
        Ok(conn) => {
            // The server's certificate was checked for `name` during the handshake.
            shared.write_peers().entry(peer).or_default().dialing = false;
            shared.established(peer, conn);
        }
        Err(e) => {
            shared.handshake_failed(peer, "outbound", &e);
            shared.dial_failed(peer);
        }
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let peer = incoming.remote_address().ip().to_canonical();
        let Some(name) = (shared.peer_name)(peer) else {
            bump(&shared.stats.rejected_peers);
            warn!(%peer, "connection from an address that is no known host refused");
            incoming.refuse();
            continue;
        };
        shared.handle.spawn(accept(shared.clone(), peer, name, incoming));
    }
    debug!("endpoint closed: no longer accepting");
}

async fn accept(shared: Arc<Shared>, peer: IpAddr, name: String, incoming: quinn::Incoming) {
    let conn = match incoming.accept() {
        Ok(connecting) => connecting.await,
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(e) => return shared.handshake_failed(peer, "inbound", &e),
    };
    if let Err(reason) = tls::check_peer_name(&conn, &name) {
        bump(&shared.stats.rejected_peers);
        warn!(%peer, expected = %name, "inbound connection rejected: {reason}");
        conn.close(VarInt::from_u32(CLOSE_WRONG_HOST), b"certificate does not name this host");
        return;
    }
    shared.established(peer, conn);
}

async fn read_loop(shared: Arc<Shared>, peer: IpAddr, conn: Connection) {
    let reason = loop {
        match conn.read_datagram().await {
            Ok(datagram) => {
                bump(&shared.stats.received);
                (shared.on_datagram)(peer, &datagram);
            }
            Err(e) => break e,
        }
    };
    shared.closed(peer, &conn, &reason);
}
