//! The engine: sockets, TAP queues, worker threads, reconfiguration and counters.
//!
//! One worker thread per queue `q`. It owns the `q`-th of the `SO_REUSEPORT` UDP
//! sockets and reads the `q`-th queue of every network's TAP, so one thread carries
//! both directions of whatever flows the kernel hashes to it. Workers see the
//! forwarding tables through an `Arc` they reload when the generation counter moves
//! (woken by their eventfd); `set_networks` waits until every worker has switched, so
//! the descriptors of removed networks are closed when it returns.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::counters::{EngineCounters, VniCounters};
use crate::datapath::{self, Ctx, Net, Tables, Tap};
use crate::fwd::Fdb;
use crate::header::MAX_VNI;
use crate::reasm::{Reassembler, DEFAULT_SLOTS, DEFAULT_TIMEOUT, MAX_MESSAGE};
use crate::sys::{self, Epoll, EventFd, RecvMeta, UdpSock, MAX_BATCH};

/// Default UDP port of the data plane.
pub const DEFAULT_PORT: u16 = 7470;
/// Most worker threads (and TAP queues).
pub const MAX_QUEUES: usize = 16;

/// Offloads asked of every TAP: checksum and TCP segmentation (plus UDP segmentation
/// where the kernel has it), so reads carry GSO super-frames of up to 64 KiB.
const OFFLOADS: [u32; 2] = [
    libc::TUN_F_CSUM
        | libc::TUN_F_TSO4
        | libc::TUN_F_TSO6
        | libc::TUN_F_TSO_ECN
        | libc::TUN_F_USO4
        | libc::TUN_F_USO6,
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
];
/// Receive buffer per message: a GRO batch is at most 64 KiB.
const RX_SLOT: usize = 65536;
/// Messages per `recvmmsg`.
const RX_BATCH: usize = 8;
/// Frames read from one TAP queue before looking at the other descriptors.
const TAP_BUDGET: usize = 64;
/// `recvmmsg` calls per wake-up before looking at the other descriptors.
const UDP_BUDGET: usize = 8;
/// How long `set_networks` waits for the workers to switch tables.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends datagrams of encrypted networks (implemented by the QUIC transport).
pub trait SecureTransport: Send + Sync {
    /// Largest datagram that can go to `peer` now, or `None` if it cannot be reached.
    fn max_datagram(&self, peer: IpAddr) -> Option<usize>;
    /// Sends one datagram to `peer`; false if it was not sent.
    fn send(&self, peer: IpAddr, datagram: &[u8]) -> bool;
}

/// How to start an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Address of the UDP socket (the host's underlay IP, port [`DEFAULT_PORT`]).
    /// Peers are sent to on the same port.
    pub listen: SocketAddr,
    /// MTU of the underlay interface.
    pub underlay_mtu: u32,
    /// Worker threads and TAP queues; 0 means min(cores, 4).
    pub queues: usize,
}

/// One `--encap udp` network on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpNetwork {
    /// VNI (24 bits).
    pub vni: u32,
    /// Name of its TAP device (created if missing).
    pub tap: String,
    /// Datagrams go through the secure transport only.
    pub encrypted: bool,
    /// Underlay IPs of the other hosts carrying the network.
    pub peers: Vec<IpAddr>,
    /// MACs of endpoints on other hosts, with their host's underlay IP.
    pub remote_macs: Vec<([u8; 6], IpAddr)>,
}

/// Why the engine refused a request.
#[derive(Debug, Error)]
pub enum Error {
    /// The UDP socket could not be set up.
    #[error("cannot open the UDP socket on {addr}: {source}")]
    Socket {
        /// Address asked for.
        addr: SocketAddr,
        /// The system's reason.
        source: io::Error,
    },
    /// The underlay MTU is too small to carry anything.
    #[error("underlay MTU {0} is too small for the overlay")]
    MtuTooSmall(u32),
    /// A TAP device could not be opened or created.
    #[error("cannot open TAP device {name}: {source}")]
    Tap {
        /// Device name.
        name: String,
        /// The system's reason.
        source: io::Error,
    },
    /// A TAP name the kernel would refuse.
    #[error("invalid TAP device name {0:?}: 1-15 bytes without '/', NUL or whitespace")]
    TapName(String),
    /// VNI above 24 bits.
    #[error("VNI {0} does not fit 24 bits")]
    VniRange(u32),
    /// The same VNI twice.
    #[error("VNI {0} is listed twice")]
    DuplicateVni(u32),
    /// The same TAP for two networks.
    #[error("TAP device {0} is listed for two networks")]
    DuplicateTap(String),
    /// Thread or descriptor set-up failed.
    #[error("cannot start the engine's workers: {0}")]
    Worker(io::Error),
}

/// The running data plane. Dropping it stops every thread.
pub struct Engine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    ctx: Ctx,
    local: SocketAddr,
    queues: usize,
    sockets: Vec<UdpSock>,
    wakers: Vec<EventFd>,
    tables: RwLock<Arc<Tables>>,
    generation: AtomicU64,
    acks: Vec<AtomicU64>,
    stop: AtomicBool,
    reconfig: Mutex<()>,
    deliver: Mutex<Reassembler>,
}

impl Shared {
    fn tables(&self) -> Arc<Tables> {
        self.tables.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Publishes new tables and waits until every worker uses them.
    fn publish(&self, tables: Tables) {
        *self.tables.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tables);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.wakers.iter().for_each(EventFd::notify);
        let deadline = Instant::now() + SWITCH_TIMEOUT;
        while self.acks.iter().any(|a| a.load(Ordering::Acquire) < generation) {
            if Instant::now() > deadline {
                tracing::warn!("udp workers did not switch tables within {SWITCH_TIMEOUT:?}");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Engine {
    /// Binds the UDP socket and starts the workers. Call it from the host's network
    /// namespace: sockets and TAP devices belong to the namespace of the thread that
    /// creates them.
    pub fn start(config: EngineConfig) -> Result<Engine, Error> {
        let queues = match config.queues {
            0 => std::thread::available_parallelism().map_or(1, usize::from).min(4),
            n => n.min(MAX_QUEUES),
        };
        let mtu = config.underlay_mtu as usize;
        if mtu < 40 + 8 + crate::header::HEADER_LEN + 64 {
            return Err(Error::MtuTooSmall(config.underlay_mtu));
        }
        let socket_err = |addr, source| Error::Socket { addr, source };
        let first =
            UdpSock::bind(config.listen, queues > 1).map_err(|e| socket_err(config.listen, e))?;
        let local = first.local_addr().map_err(|e| socket_err(config.listen, e))?;
        let mut sockets = vec![first];
        for _ in 1..queues {
            sockets.push(UdpSock::bind(local, true).map_err(|e| socket_err(local, e))?);
        }
        let wakers = (0..queues).map(|_| EventFd::new()).collect::<io::Result<Vec<_>>>();
        let shared = Arc::new(Shared {
            ctx: Ctx {
                port: local.port(),
                mtu,
                next_id: AtomicU32::new(0),
                unknown_vni: AtomicU64::new(0),
                malformed: AtomicU64::new(0),
            },
            local,
            queues,
            sockets,
            wakers: wakers.map_err(Error::Worker)?,
            tables: RwLock::new(Arc::new(Tables::default())),
            generation: AtomicU64::new(0),
            acks: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
            reconfig: Mutex::new(()),
            deliver: Mutex::new(Reassembler::new(DEFAULT_SLOTS, DEFAULT_TIMEOUT)),
        });
        let mut engine = Engine { shared: shared.clone(), threads: Vec::new() };
        for q in 0..queues {
            let worker = Worker::new(q, shared.clone()).map_err(Error::Worker)?;
            let handle = std::thread::Builder::new()
                .name(format!("ov-udp-{q}"))
                .spawn(move || worker.run())
                .map_err(Error::Worker)?;
            engine.threads.push(handle);
        }
        tracing::info!(%local, queues, "udp data plane started");
        Ok(engine)
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// Number of worker threads (and TAP queues).
    pub fn queues(&self) -> usize {
        self.shared.queues
    }

    /// Makes `networks` the full set this host carries (idempotent): opens the TAP
    /// queues of new networks (creating persistent devices as needed), closes those of
    /// networks no longer listed, and swaps all forwarding tables at once. Call it
    /// from the host's network namespace. On error nothing changes.
    pub fn set_networks(&self, networks: Vec<UdpNetwork>) -> Result<(), Error> {
        let _guard = self.shared.reconfig.lock().unwrap_or_else(PoisonError::into_inner);
        validate(&networks)?;
        let old = self.shared.tables();
        let mut created: Vec<Arc<Tap>> = Vec::new();
        let mut nets = HashMap::new();
        for n in networks {
            let prev = old.nets.get(&n.vni);
            // Keep open queues unless the device is gone or was recreated meanwhile.
            let index = sys::interface_index(&n.tap);
            let same = |t: &Tap| t.name == n.tap && Some(t.index) == index;
            let reuse = old.nets.values().find(|o| same(&o.tap)).map(|o| o.tap.clone());
            let tap = match reuse {
                Some(tap) => tap,
                None => match open_tap(&n.tap, index.is_none(), self.shared.queues) {
                    Ok((tap, fresh)) => {
                        let tap = Arc::new(tap);
                        if fresh {
                            created.push(tap.clone());
                        }
                        tap
                    }
                    Err(e) => {
                        // Undo: devices made by this call vanish with their queues.
                        for t in &created {
                            if let Some(q) = t.queues.first() {
                                let _ = sys::set_persist(q, false);
                            }
                        }
                        return Err(e);
                    }
                },
            };
            let counters = prev.map_or_else(Default::default, |p| p.counters.clone());
            let net = Net {
                vni: n.vni,
                encrypted: n.encrypted,
                fdb: Fdb::new(&n.peers, &n.remote_macs),
                tap,
                counters,
            };
            nets.insert(n.vni, Arc::new(net));
        }
        let secure = old.secure.clone();
        drop(old);
        self.shared.publish(Tables { nets, secure });
        Ok(())
    }

    /// Sets the transport of encrypted networks.
    pub fn set_secure(&self, transport: Arc<dyn SecureTransport>) {
        let _guard = self.shared.reconfig.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.shared.tables();
        let tables = Tables { nets: old.nets.clone(), secure: Some(transport) };
        drop(old);
        self.shared.publish(tables);
    }

    /// Hands the engine a datagram the secure transport received from `from`.
    pub fn deliver(&self, from: IpAddr, datagram: &[u8]) {
        let tables = self.shared.tables();
        let mut reasm = self.shared.deliver.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        datapath::receive(&self.shared.ctx, &tables, &mut reasm, now, from, datagram, true, 0);
    }

    /// Counters of every network carried now.
    pub fn counters(&self) -> BTreeMap<u32, VniCounters> {
        self.shared.tables().nets.iter().map(|(v, n)| (*v, n.counters.snapshot())).collect()
    }

    /// Drops not attributable to a network.
    pub fn engine_counters(&self) -> EngineCounters {
        let ctx = &self.shared.ctx;
        EngineCounters {
            dropped_unknown_vni: ctx.unknown_vni.load(Ordering::Relaxed),
            dropped_malformed: ctx.malformed.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wakers.iter().for_each(EventFd::notify);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("local", &self.shared.local)
            .field("queues", &self.shared.queues)
            .finish()
    }
}

fn validate(networks: &[UdpNetwork]) -> Result<(), Error> {
    let mut vnis = std::collections::HashSet::new();
    let mut taps = std::collections::HashSet::new();
    for n in networks {
        if n.vni > MAX_VNI {
            return Err(Error::VniRange(n.vni));
        }
        let bad = |c: char| c == '/' || c == '\0' || c.is_whitespace();
        if n.tap.is_empty()
            || n.tap.len() > 15
            || n.tap.contains(bad)
            || n.tap == "."
            || n.tap == ".."
        {
            return Err(Error::TapName(n.tap.clone()));
        }
        if !vnis.insert(n.vni) {
            return Err(Error::DuplicateVni(n.vni));
        }
        if !taps.insert(n.tap.as_str()) {
            return Err(Error::DuplicateTap(n.tap.clone()));
        }
    }
    Ok(())
}

/// Opens `queues` queues of TAP `name`, persistent; `fresh` when it did not exist.
fn open_tap(name: &str, fresh: bool, queues: usize) -> Result<(Tap, bool), Error> {
    let err = |source| Error::Tap { name: name.to_string(), source };
    let files =
        (0..queues).map(|_| sys::open_tap_queue(name, &OFFLOADS)).collect::<io::Result<Vec<_>>>();
    let files = files.map_err(err)?;
    if let Some(first) = files.first() {
        sys::set_persist(first, true).map_err(err)?;
    }
    let index = sys::interface_index(name).unwrap_or(0);
    Ok((Tap { name: name.to_string(), index, queues: files }, fresh))
}

/// One worker thread's state: its buffers are allocated once, here.
struct Worker {
    q: usize,
    shared: Arc<Shared>,
    tables: Arc<Tables>,
    generation: u64,
    epoll: Epoll,
    nets: Vec<Arc<Net>>,
    msg: Box<[u8]>,
    rx: Box<[u8]>,
    meta: [RecvMeta; MAX_BATCH],
    reasm: Reassembler,
    scratch: Vec<u8>,
}

const TOKEN_WAKE: u64 = 0;
const TOKEN_UDP: u64 = 1;
const TOKEN_TAP0: u64 = 2;

impl Worker {
    fn new(q: usize, shared: Arc<Shared>) -> io::Result<Worker> {
        let mut w = Worker {
            q,
            tables: shared.tables(),
            shared,
            generation: u64::MAX,
            epoll: Epoll::new()?,
            nets: Vec::new(),
            msg: vec![0; MAX_MESSAGE].into_boxed_slice(),
            rx: vec![0; RX_SLOT * RX_BATCH].into_boxed_slice(),
            meta: [RecvMeta::default(); MAX_BATCH],
            reasm: Reassembler::new(DEFAULT_SLOTS, DEFAULT_TIMEOUT),
            scratch: Vec::with_capacity(65536),
        };
        w.reload()?;
        Ok(w)
    }

    /// Picks up the current tables and watches their TAP queues.
    fn reload(&mut self) -> io::Result<()> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        let tables = self.shared.tables();
        let epoll = Epoll::new()?;
        epoll.add(self.shared.wakers[self.q].as_raw_fd(), TOKEN_WAKE)?;
        epoll.add(self.shared.sockets[self.q].as_raw_fd(), TOKEN_UDP)?;
        let nets: Vec<Arc<Net>> = tables.nets.values().cloned().collect();
        for (i, n) in nets.iter().enumerate() {
            if let Some(f) = n.tap.queues.get(self.q) {
                epoll.add(f.as_raw_fd(), TOKEN_TAP0 + i as u64)?;
            }
        }
        self.epoll = epoll;
        self.nets = nets;
        self.tables = tables;
        self.generation = generation;
        self.shared.acks[self.q].store(generation, Ordering::Release);
        Ok(())
    }

    fn run(mut self) {
        let mut events = [sys::NO_EVENT; 64];
        while !self.shared.stop.load(Ordering::Acquire) {
            if self.shared.generation.load(Ordering::Acquire) != self.generation {
                if let Err(e) = self.reload() {
                    tracing::error!(queue = self.q, error = %e, "udp worker cannot switch tables");
                    // Release the old tables anyway so removed devices close.
                    self.nets.clear();
                    self.tables = self.shared.tables();
                    self.generation = self.shared.generation.load(Ordering::Acquire);
                    self.shared.acks[self.q].store(self.generation, Ordering::Release);
                }
            }
            let n = match self.epoll.wait(&mut events, 1000) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(queue = self.q, error = %e, "udp worker poll failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            for ev in &events[..n] {
                match sys::token(ev) {
                    TOKEN_WAKE => self.shared.wakers[self.q].drain(),
                    TOKEN_UDP => self.pump_udp(),
                    t => self.pump_tap((t - TOKEN_TAP0) as usize),
                }
            }
        }
    }

    /// Reads frames from TAP queue `q` of network `i` and sends them.
    fn pump_tap(&mut self, i: usize) {
        let Worker { q, shared, tables, nets, msg, scratch, epoll, .. } = self;
        let Some(net) = nets.get(i) else { return };
        let Some(file) = net.tap.queues.get(*q) else { return };
        let sock = &shared.sockets[*q];
        for _ in 0..TAP_BUDGET {
            match (&*file).read(msg) {
                Ok(n) => datapath::transmit(&shared.ctx, tables, net, sock, &mut msg[..n], scratch),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // The device is gone (deleted under us): stop watching it, or
                    // level-triggered epoll would report it forever. The next
                    // set_networks reopens or drops it.
                    tracing::warn!(tap = %net.tap.name, error = %e, "tap read failed; queue detached");
                    let _ = epoll.delete(file.as_raw_fd());
                    return;
                }
            }
        }
    }

    /// Receives datagrams from this worker's socket and delivers them.
    fn pump_udp(&mut self) {
        let Worker { q, shared, tables, rx, meta, reasm, .. } = self;
        let sock = &shared.sockets[*q];
        for _ in 0..UDP_BUDGET {
            let got = match sock.recv_batch(rx, RX_SLOT, &mut meta[..RX_BATCH]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(error = %e, "udp receive failed");
                    return;
                }
            };
            let now = Instant::now();
            for (i, m) in meta[..got].iter().enumerate() {
                let Some(src) = m.src.filter(|_| !m.truncated) else {
                    shared.ctx.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let data = &rx[i * RX_SLOT..i * RX_SLOT + m.len];
                for d in data.chunks(m.segment.max(1)) {
                    datapath::receive(&shared.ctx, tables, reasm, now, src.ip(), d, false, *q);
                }
            }
            if got < RX_BATCH {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(vni: u32, tap: &str) -> UdpNetwork {
        UdpNetwork { vni, tap: tap.into(), encrypted: false, peers: vec![], remote_macs: vec![] }
    }

    #[test]
    fn validation() {
        assert!(validate(&[net(1, "ovu-1"), net(2, "ovu-2")]).is_ok());
        assert!(matches!(validate(&[net(1 << 24, "a")]), Err(Error::VniRange(_))));
        assert!(matches!(validate(&[net(1, "a b")]), Err(Error::TapName(_))));
        assert!(matches!(validate(&[net(1, "0123456789abcdef")]), Err(Error::TapName(_))));
        assert!(matches!(validate(&[net(1, "")]), Err(Error::TapName(_))));
        assert!(matches!(validate(&[net(1, "a"), net(1, "b")]), Err(Error::DuplicateVni(1))));
        assert!(matches!(validate(&[net(1, "a"), net(2, "a")]), Err(Error::DuplicateTap(_))));
    }

    #[test]
    fn start_and_stop_without_networks() {
        let listen = "127.0.0.1:0".parse().expect("addr");
        let small = Engine::start(EngineConfig { listen, underlay_mtu: 100, queues: 1 });
        assert!(matches!(small, Err(Error::MtuTooSmall(100))));
        let e =
            Engine::start(EngineConfig { listen, underlay_mtu: 1500, queues: 3 }).expect("start");
        assert_eq!(e.queues(), 3);
        assert_ne!(e.local_addr().port(), 0);
        assert!(e.counters().is_empty());
        let t = Instant::now();
        drop(e);
        assert!(t.elapsed() < Duration::from_millis(500), "drop took {:?}", t.elapsed());
    }
}
