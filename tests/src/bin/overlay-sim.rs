//! `overlay-sim [--agents N] [--endpoints N] [--networks N] [--span N] [--changes N]
//! [--steady-secs N] [--silence N] [--restart 0|1]`: the control plane at scale, simulated on this
//! machine (see `bench/sim.sh`). Not run in CI.
//!
//! Starts a real 3-member controller cluster on loopback (release binaries next to this
//! one, TLS with a throwaway CA), then N simulated agents in this process. Each agent
//! has its own `agent` certificate from that CA and runs the agent's own code for
//! registering and heartbeating (`overlay_agent::watch::run_heartbeat`) and for watching
//! (`watch_forever`: URL rotation, resume from the last revision, batching, jittered
//! backoff); only what it does with the messages differs (it counts them instead of
//! programming a kernel). Topology: `--networks` networks; network k is carried by
//! `--span` consecutive hosts starting at k·N/networks; endpoint j is in network
//! j mod networks, on the next of those hosts in turn. Prints a table:
//!
//! * setup: hosts, networks, endpoints created (admin, 64 concurrent calls), and rate;
//! * each member's RSS after setup, peak RSS (VmHWM) over the run, and CPU;
//! * sync from scratch: from starting every agent until each has its whole snapshot
//!   (every endpoint, whole if it is on a network the host wants, else by name);
//! * steady state for `--steady-secs` (heartbeats every second, keepalives): each
//!   member's CPU as a share of one core;
//! * `--changes` endpoint creates, one at a time: from the call until every agent has
//!   the endpoint, p50/p99/max over all (change, agent) pairs,
//!   and the slowest agent per change;
//! * `--silence N` (default 100): N agents spread over the hosts stop heartbeating (their
//!   tasks are aborted, as if their hosts died); time until the cluster shows all of
//!   them down, then, once they heartbeat again, until all are ready, and how many
//!   revisions each took (a liveness pass writes its transitions as one);
//! * `--restart 1`: the leader is stopped (SIGTERM) and started again; time until every
//!   agent has applied a change made after it is back, and how many hosts were shown
//!   down.
//!
//! Everything lives under a temporary directory `ovsim-*` (removed at the end) and on
//! 127.0.0.1; host underlay addresses (100.64.x.x) are data only, never contacted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use overlay_agent::identity::Controllers;
use overlay_agent::store::Store;
use overlay_agent::watch::{run_heartbeat, watch_forever, Identity as AgentIdentity, WatchSink};
use overlay_grpc::Dialer;
use overlay_pki::{Ca, Identity, Role, Subject};
use overlay_proto::pb;
use overlay_proto::pb::overlay_client::OverlayClient;
use overlay_tests::bench::{arg, check_flags, loadavg, pct};
use tonic::transport::Channel;

const FLAGS: [&str; 8] = [
    "--agents",
    "--endpoints",
    "--networks",
    "--span",
    "--changes",
    "--steady-secs",
    "--silence",
    "--restart",
];

#[derive(Clone, Copy)]
struct Opts {
    agents: usize,
    endpoints: usize,
    networks: usize,
    span: usize,
    changes: usize,
    steady_secs: u64,
    /// Agents that stop heartbeating for a while (0: none).
    silence: usize,
    restart: bool,
}

/// Where everything lives, and placement of endpoints on hosts and networks.
struct Topology {
    opts: Opts,
    /// Bits of each network's address block.
    block_bits: u32,
}

impl Topology {
    fn new(opts: Opts) -> Result<Topology> {
        let per_net = opts.endpoints.div_ceil(opts.networks.max(1)) + opts.changes + 8;
        let block_bits = (usize::BITS - per_net.leading_zeros()).max(8);
        if opts.networks << block_bits > 1 << 24 {
            bail!("{} networks of {per_net} addresses do not fit 10.0.0.0/8", opts.networks);
        }
        if opts.span == 0 || opts.span > opts.agents || opts.networks == 0 {
            bail!("--span must be 1..=--agents and --networks at least 1");
        }
        Ok(Topology { opts, block_bits })
    }

    fn subnet(&self, k: usize) -> String {
        let base = (10u32 << 24) + ((k as u32) << self.block_bits);
        format!("{}/{}", std::net::Ipv4Addr::from(base), 32 - self.block_bits)
    }

    fn first_host(&self, k: usize) -> usize {
        k * self.opts.agents / self.opts.networks
    }

    /// (network, host) of endpoint j.
    fn place(&self, j: usize) -> (usize, usize) {
        let k = j % self.opts.networks;
        let i = j / self.opts.networks;
        (k, (self.first_host(k) + i % self.opts.span) % self.opts.agents)
    }

    /// The endpoints each host should know, whole or by name: every one (DNS answers
    /// for every overlay name).
    fn expected(&self) -> Vec<usize> {
        vec![self.opts.endpoints; self.opts.agents]
    }
}

fn hash(s: &str) -> u64 {
    // FNV-1a: names only need telling apart.
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// What every simulated agent reports.
#[derive(Default)]
struct AgentState {
    revision: AtomicU64,
    endpoints: AtomicUsize,
    snapshots: AtomicUsize,
    synced: AtomicBool,
    /// Endpoints of the last snapshot received whole (the others came by name).
    whole: AtomicUsize,
}

#[derive(Default)]
struct Shared {
    agents: Vec<AgentState>,
    /// (agent, probe endpoint name) -> when it arrived.
    probes: Mutex<HashMap<(usize, String), Instant>>,
}

/// A simulated agent's replica: endpoint name -> network name (hashes).
struct SimSink {
    idx: usize,
    shared: Arc<Shared>,
    endpoints: HashMap<u64, u64>,
    staging: Option<HashMap<u64, u64>>,
    revision: u64,
}

impl SimSink {
    fn apply_change(map: &mut HashMap<u64, u64>, change: &pb::Change, probe: &mut Vec<String>) {
        use pb::change::Kind;
        match &change.kind {
            Some(Kind::PutEndpoint(e)) => {
                let net = e.attachments.first().map(|a| hash(&a.network)).unwrap_or(0);
                map.insert(hash(&e.name), net);
                if e.name.starts_with("probe-") || e.name.starts_with("marker-") {
                    probe.push(e.name.clone());
                }
            }
            Some(Kind::DeleteEndpoint(name)) => {
                map.remove(&hash(name));
            }
            Some(Kind::PutNames(names)) => {
                // Known by name only: network 0 (no network hashes to it in practice).
                for line in names.entries.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    let name = line.split(|&b| b == b' ').next().unwrap_or_default();
                    let name = String::from_utf8_lossy(name);
                    map.insert(hash(&name), 0);
                    if name.starts_with("probe-") || name.starts_with("marker-") {
                        probe.push(name.into_owned());
                    }
                }
            }
            _ => {}
        }
    }
}

impl WatchSink for SimSink {
    fn revision(&self) -> u64 {
        self.revision
    }

    fn apply_batch(&mut self, batch: &[pb::WatchResponse]) -> Result<(), String> {
        let mut probes = Vec::new();
        let state = &self.shared.agents[self.idx];
        for msg in batch {
            if msg.reset {
                self.staging = Some(HashMap::new());
                state.snapshots.fetch_add(1, Ordering::Relaxed);
            }
            match self.staging.as_mut() {
                Some(staging) => {
                    msg.changes.iter().for_each(|c| Self::apply_change(staging, c, &mut probes));
                    if msg.snapshot_done {
                        self.endpoints = self.staging.take().unwrap_or_default();
                        let whole = self.endpoints.values().filter(|n| **n != 0).count();
                        state.whole.store(whole, Ordering::Relaxed);
                        self.revision = msg.revision;
                        state.synced.store(true, Ordering::Relaxed);
                    }
                }
                None => {
                    let map = &mut self.endpoints;
                    msg.changes.iter().for_each(|c| Self::apply_change(map, c, &mut probes));
                    self.revision = self.revision.max(msg.revision);
                }
            }
        }
        state.endpoints.store(self.endpoints.len(), Ordering::Relaxed);
        state.revision.store(self.revision, Ordering::Relaxed);
        if !probes.is_empty() {
            let now = Instant::now();
            let mut seen = self.shared.probes.lock().unwrap_or_else(|p| p.into_inner());
            for p in probes {
                seen.entry((self.idx, p)).or_insert(now);
            }
        }
        Ok(())
    }

    fn interrupted(&mut self) {
        self.staging = None;
    }
}

/// One controller process.
struct Member {
    id: u64,
    addr: SocketAddr,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl Member {
    fn start(&mut self, bin: &Path) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(bin)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM, then wait (bounded), then SIGKILL.
            unsafe_kill(c.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on a child we started and have not reaped; no memory involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// (CPU seconds, VmRSS MiB, VmHWM MiB) of a process.
fn proc_stats(pid: u32) -> Option<(f64, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are 11 and 12 after the state (field 3).
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    Some((ticks / hz.max(1.0), kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
}

fn cpu_of(members: &[Member]) -> Vec<f64> {
    members.iter().map(|m| m.pid().and_then(proc_stats).map_or(0.0, |s| s.0)).collect()
}

fn self_cpu() -> f64 {
    proc_stats(std::process::id()).map_or(0.0, |s| s.0)
}

fn client(dialer: &Dialer, url: &str) -> Result<OverlayClient<Channel>> {
    let endpoint = dialer.endpoint(url)?.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true);
    Ok(OverlayClient::new(dialer.connect_lazy(endpoint)).max_decoding_message_size(512 << 20))
}

/// Calls `f` on the members in turn until one succeeds (bounded).
async fn any_member<T, F, Fut>(clients: &[OverlayClient<Channel>], start: usize, f: F) -> Result<T>
where
    F: Fn(OverlayClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = None;
    for attempt in 0..30 {
        let c = clients[(start + attempt) % clients.len()].clone();
        match tokio::time::timeout(Duration::from_secs(15), f(c)).await {
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => bail!("{}", s.message()),
            Ok(Err(s)) => last = Some(s.message().to_string()),
            Err(_) => last = Some("timed out".into()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("no member answered: {}", last.unwrap_or_default())
}

/// Registers and heartbeats as agent `me` does, until aborted.
fn spawn_heartbeat(
    me: &AgentIdentity,
    controllers: &Controllers,
    store: &Store,
) -> tokio::task::JoinHandle<()> {
    let (me, controllers, store) = (me.clone(), controllers.clone(), store.clone());
    tokio::spawn(async move {
        // Never sends: the agent reports no problem.
        let (_problem_tx, problem_rx) = tokio::sync::watch::channel(None);
        run_heartbeat(me, controllers, store, problem_rx).await;
    })
}

/// Waits until every host in `names` shows `status`; false when `within` passed first.
async fn wait_hosts(
    clients: &[OverlayClient<Channel>],
    names: &std::collections::HashSet<String>,
    status: &str,
    within: Duration,
) -> Result<bool> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let list = any_member(clients, 0, |mut c| async move {
            c.list_hosts(pb::ListHostsRequest { consistency: 0 }).await
        })
        .await?;
        let done = list.hosts.iter().filter(|h| names.contains(&h.name) && h.status == status);
        if done.count() == names.len() {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}

/// The cluster's revision (linearizable read) and how many hosts are not `ready`.
async fn hosts_revision(clients: &[OverlayClient<Channel>]) -> Result<(u64, usize)> {
    let list = any_member(clients, 0, |mut c| async move {
        c.list_hosts(pb::ListHostsRequest { consistency: 0 }).await
    })
    .await?;
    Ok((list.revision, list.hosts.iter().filter(|h| h.status != "ready").count()))
}

/// Runs `n` calls of `f(i)` with `concurrency` in flight.
async fn concurrently<F, Fut>(n: usize, concurrency: usize, f: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        if set.len() >= concurrency {
            if let Some(r) = set.join_next().await {
                r??;
            }
        }
        set.spawn(f(i));
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The simulated agents log as the agent does; quiet unless RUST_LOG says otherwise.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(&args)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: &[String]) -> Result<()> {
    check_flags(args, &FLAGS)?;
    let opts = Opts {
        agents: arg(args, "--agents", 1000)?,
        endpoints: arg(args, "--endpoints", 100_000)?,
        networks: arg(args, "--networks", 100)?,
        span: arg(args, "--span", 20)?,
        changes: arg(args, "--changes", 50)?,
        steady_secs: arg(args, "--steady-secs", 20)?,
        silence: arg(args, "--silence", 100)?,
        restart: arg::<u8>(args, "--restart", 1)? != 0,
    };
    let topo = Topology::new(opts)?;
    raise_fd_limit();
    let bin =
        std::env::current_exe()?.parent().context("binary directory")?.join("overlay-controller");
    if !bin.exists() {
        bail!("{} not found: build the workspace's binaries first", bin.display());
    }
    let dir = tempdir()?;
    let result = simulate(&topo, &bin, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ovsim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

struct Cluster {
    members: Vec<Member>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }
}

async fn simulate(topo: &Topology, bin: &Path, dir: &Path) -> Result<()> {
    let o = topo.opts;
    let load_start = loadavg().unwrap_or_default();
    eprintln!("certificates for {} agents…", o.agents);
    let ca = Ca::generate()?;
    let pki = dir.join("pki");
    ca.save(&pki, false)?;
    let (cert, key) = ca.issue(&Subject::new("controller", Role::Controller))?.save(&pki)?;
    let admin = Identity::from_issued(&ca, &ca.issue(&Subject::new("admin", Role::Admin))?)?;
    let admin_dialer = Dialer::tls(overlay_pki::tls::client_config(&admin.ca, Some(&admin))?);
    let underlay = |i: usize| std::net::Ipv4Addr::from(0x6440_0000u32 + i as u32 + 1);
    let mut agent_ids = Vec::with_capacity(o.agents);
    for i in 0..o.agents {
        let s = Subject::new(&format!("h{i}"), Role::Agent).with_ips(vec![underlay(i).into()]);
        agent_ids.push(Identity::from_issued(&ca, &ca.issue(&s)?)?);
    }

    // The cluster.
    let listeners: Vec<std::net::TcpListener> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddr> =
        listeners.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
    drop(listeners);
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let path = |p: &Path| p.display().to_string();
    let mut cluster = Cluster { members: Vec::new() };
    for (i, addr) in addrs.iter().enumerate() {
        let id = i as u64 + 1;
        let args = vec![
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.to_string(),
            "--data-dir".into(),
            path(&dir.join(format!("m{id}"))),
            "--peers".into(),
            peers.clone(),
            "--tls-ca".into(),
            path(&pki.join(overlay_pki::CA_CERT_FILE)),
            "--tls-cert".into(),
            path(&cert),
            "--tls-key".into(),
            path(&key),
        ];
        let mut m =
            Member { id, addr: *addr, child: None, args, log: dir.join(format!("m{id}.log")) };
        m.start(bin)?;
        cluster.members.push(m);
    }
    let urls: Vec<String> = addrs.iter().map(|a| format!("https://{a}")).collect();
    let clients: Vec<OverlayClient<Channel>> =
        urls.iter().map(|u| client(&admin_dialer, u)).collect::<Result<_>>()?;
    let leader = wait_leader(&clients, Duration::from_secs(30)).await?;
    eprintln!(
        "cluster up (leader {leader}); setting up {} hosts, {} networks, {} endpoints…",
        o.agents, o.networks, o.endpoints
    );

    // Setup through the admin API.
    let setup_start = Instant::now();
    let cl = Arc::new(clients.clone());
    concurrently(o.agents, 64, |i| {
        let cl = cl.clone();
        let req = pb::RegisterHostRequest {
            name: format!("h{i}"),
            underlay_ip: underlay(i).to_string(),
            underlay_mtu: 1500,
            underlay_prefix: 24,
            ..Default::default()
        };
        async move {
            any_member(&cl, i, |mut c| {
                let req = req.clone();
                async move { c.register_host(req).await }
            })
            .await
            .map(|_| ())
        }
    })
    .await?;
    for k in 0..o.networks {
        let req = pb::CreateNetworkRequest {
            name: format!("n{k}"),
            subnet: topo.subnet(k),
            ..Default::default()
        };
        any_member(&cl, k, |mut c| {
            let req = req.clone();
            async move { c.create_network(req).await }
        })
        .await?;
    }
    let created = Arc::new(AtomicUsize::new(0));
    let placements: Arc<Vec<(usize, usize)>> =
        Arc::new((0..o.endpoints).map(|j| topo.place(j)).collect());
    concurrently(o.endpoints, 64, |j| {
        let cl = cl.clone();
        let created = created.clone();
        let (k, h) = placements[j];
        let req = pb::CreateEndpointRequest {
            name: format!("e{j}"),
            host: format!("h{h}"),
            network: format!("n{k}"),
            ..Default::default()
        };
        async move {
            let r = any_member(&cl, j, |mut c| {
                let req = req.clone();
                async move { c.create_endpoint(req).await }
            })
            .await;
            match r {
                Ok(_) => {}
                // A retried create that had committed.
                Err(e) if e.to_string().contains("exists") => {}
                Err(e) => return Err(e),
            }
            let n = created.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_multiple_of(10_000) {
                eprintln!("  {n} endpoints");
            }
            Ok(())
        }
    })
    .await?;
    let setup_secs = setup_start.elapsed().as_secs_f64();
    let rss_after_setup: Vec<f64> =
        cluster.members.iter().map(|m| m.pid().and_then(proc_stats).map_or(0.0, |s| s.1)).collect();
    eprintln!("setup done in {setup_secs:.0} s; starting {} agents…", o.agents);

    // The agents.
    let revision_before_sync = hosts_revision(&cl).await?.0;
    let expected = topo.expected();
    let shared = Arc::new(Shared {
        agents: (0..o.agents).map(|_| AgentState::default()).collect(),
        probes: Mutex::new(HashMap::new()),
    });
    let cpu0 = cpu_of(&cluster.members);
    let sim0 = self_cpu();
    let sync_start = Instant::now();
    let mut tasks = Vec::new();
    // Apart, so that `--silence` can stop and start them again.
    let mut heartbeats = Vec::new();
    let mut heartbeat_args = Vec::new();
    for (i, identity) in agent_ids.into_iter().enumerate() {
        let dialer = Dialer::tls(overlay_pki::tls::client_config(&identity.ca, Some(&identity))?);
        // Agents start on different members, as a spread-out configuration would.
        let mut rotated = urls.clone();
        rotated.rotate_left(i % urls.len());
        let controllers = Controllers { urls: rotated, dialer };
        let store = Store::open(&dir.join("agents").join(format!("h{i}")))?;
        let me = AgentIdentity {
            name: format!("h{i}"),
            underlay_ip: underlay(i),
            underlay_prefix: 24,
            underlay_mtu: 1500,
        };
        let name = me.name.clone();
        heartbeats.push(spawn_heartbeat(&me, &controllers, &store));
        heartbeat_args.push((me, controllers.clone(), store.clone()));
        let mut sink = SimSink {
            idx: i,
            shared: shared.clone(),
            endpoints: HashMap::new(),
            staging: None,
            revision: 0,
        };
        tasks.push(tokio::spawn(async move {
            watch_forever(&name, &controllers, &store, &mut sink).await;
        }));
    }
    let synced = |shared: &Shared| {
        shared
            .agents
            .iter()
            .zip(&expected)
            .filter(|(a, n)| {
                a.synced.load(Ordering::Relaxed) && a.endpoints.load(Ordering::Relaxed) >= **n
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_report = Instant::now();
    while synced(&shared) < o.agents {
        if Instant::now() > deadline {
            bail!("only {} of {} agents synced within 600 s", synced(&shared), o.agents);
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("  {} of {} agents synced", synced(&shared), o.agents);
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sync_secs = sync_start.elapsed().as_secs_f64();
    let cpu1 = cpu_of(&cluster.members);
    let sim1 = self_cpu();
    let received: usize = expected.iter().sum();
    let whole: usize = shared.agents.iter().map(|a| a.whole.load(Ordering::Relaxed)).sum();
    // More than one per agent: streams that broke (or lagged) mid-sync and started over.
    let sync_snapshots: usize =
        shared.agents.iter().map(|a| a.snapshots.load(Ordering::Relaxed)).sum();
    // Writes while the agents synced: host status flaps (a starved heartbeat marks a
    // host down, the next one up again) are sent to every watcher.
    let (revision_after_sync, not_ready) = hosts_revision(&cl).await?;
    let sync_writes = revision_after_sync.saturating_sub(revision_before_sync);
    eprintln!("all agents synced in {sync_secs:.1} s; steady state for {} s…", o.steady_secs);

    // Steady state: heartbeats and keepalives only.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu2 = cpu_of(&cluster.members);
    let sim2 = self_cpu();
    let t2 = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.steady_secs)).await;
    let steady = t2.elapsed().as_secs_f64();
    let cpu3 = cpu_of(&cluster.members);
    let sim3 = self_cpu();

    // Changes, one at a time.
    let mut lat: Vec<f64> = Vec::new();
    let mut slowest: Vec<f64> = Vec::new();
    let mut missing = 0usize;
    for c in 0..o.changes {
        let k = (c * 7919) % o.networks;
        let h = topo.first_host(k) % o.agents;
        let name = format!("probe-{c}");
        let req = pb::CreateEndpointRequest {
            name: name.clone(),
            host: format!("h{h}"),
            network: format!("n{k}"),
            ..Default::default()
        };
        let started = Instant::now();
        any_member(&cl, c, |mut cc| {
            let req = req.clone();
            async move { cc.create_endpoint(req).await }
        })
        .await?;
        // Who must see it: every agent (whole or by name).
        let who: Vec<usize> = (0..o.agents).collect();
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let got: Vec<f64> = {
                let seen = shared.probes.lock().unwrap_or_else(|p| p.into_inner());
                who.iter()
                    .filter_map(|i| seen.get(&(*i, name.clone())))
                    .map(|t| t.saturating_duration_since(started).as_secs_f64() * 1000.0)
                    .collect()
            };
            if got.len() == who.len() || Instant::now() > until {
                missing += who.len() - got.len();
                slowest.push(got.iter().cloned().fold(0.0, f64::max));
                lat.extend(got);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lat.sort_by(f64::total_cmp);
    slowest.sort_by(f64::total_cmp);

    // Host-down detection at scale: some agents stop heartbeating (as if their hosts
    // died), then start again.
    let mut silence_row = None;
    if o.silence > 0 {
        let every = (o.agents / o.silence.min(o.agents)).max(1);
        let silent: Vec<usize> = (0..o.agents).step_by(every).take(o.silence).collect();
        let names: std::collections::HashSet<String> =
            silent.iter().map(|i| format!("h{i}")).collect();
        eprintln!("{} agents stop heartbeating…", silent.len());
        let (rev0, _) = hosts_revision(&cl).await?;
        let t = Instant::now();
        for &i in &silent {
            heartbeats[i].abort();
        }
        let down = wait_hosts(&cl, &names, "down", Duration::from_secs(60)).await?;
        let (rev1, _) = hosts_revision(&cl).await?;
        let t2 = Instant::now();
        for &i in &silent {
            let (me, c, s) = &heartbeat_args[i];
            heartbeats[i] = spawn_heartbeat(me, c, s);
        }
        let up = wait_hosts(&cl, &names, "ready", Duration::from_secs(60)).await?;
        let (rev2, _) = hosts_revision(&cl).await?;
        silence_row = Some((
            silent.len(),
            down.then(|| (t2 - t).as_secs_f64()),
            up.then(|| t2.elapsed().as_secs_f64()),
            rev1.saturating_sub(rev0),
            rev2.saturating_sub(rev1),
        ));
    }

    // A restart of the leader with every agent connected.
    let mut restart_row = None;
    if o.restart {
        let leader = wait_leader(&clients, Duration::from_secs(30)).await?;
        let idx = cluster.members.iter().position(|m| m.id == leader).context("leader")?;
        let before: usize = shared.agents.iter().map(|a| a.snapshots.load(Ordering::Relaxed)).sum();
        eprintln!("restarting the leader (member {leader})…");
        let t = Instant::now();
        cluster.members[idx].stop();
        cluster.members[idx].start(bin)?;
        wait_listening(cluster.members[idx].addr, Duration::from_secs(60)).await?;
        let back = t.elapsed().as_secs_f64();
        let marker = pb::CreateEndpointRequest {
            name: "marker-restart".into(),
            host: "h0".into(),
            network: format!("n{}", topo.place(0).0),
            ..Default::default()
        };
        let created = any_member(&cl, 0, |mut c| {
            let req = marker.clone();
            async move { c.create_endpoint(req).await }
        })
        .await?;
        let _ = created;
        let list = any_member(&cl, 0, |mut c| async move {
            c.list_endpoints(pb::ListEndpointsRequest { consistency: 0 }).await
        })
        .await?;
        let target = list.revision;
        let until = Instant::now() + Duration::from_secs(120);
        let caught = |s: &Shared| {
            s.agents.iter().filter(|a| a.revision.load(Ordering::Relaxed) >= target).count()
        };
        while caught(&shared) < o.agents && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let settled = t.elapsed().as_secs_f64();
        for (i, a) in shared.agents.iter().enumerate() {
            let r = a.revision.load(Ordering::Relaxed);
            if r < target {
                eprintln!("  agent h{i} still at revision {r} (target {target})");
            }
        }
        let after: usize = shared.agents.iter().map(|a| a.snapshots.load(Ordering::Relaxed)).sum();
        let hosts = any_member(&cl, 0, |mut c| async move {
            c.list_hosts(pb::ListHostsRequest { consistency: 0 }).await
        })
        .await?;
        let down = hosts.hosts.iter().filter(|h| h.status != "ready").count();
        restart_row = Some((back, settled, caught(&shared), after - before, down));
    }

    let peaks: Vec<(f64, f64)> = cluster
        .members
        .iter()
        .map(|m| m.pid().and_then(proc_stats).map_or((0.0, 0.0), |s| (s.1, s.2)))
        .collect();
    for t in tasks.into_iter().chain(heartbeats) {
        t.abort();
    }
    let load_end = loadavg().unwrap_or_default();

    // The table.
    let pct_core = |a: &[f64], b: &[f64], secs: f64| -> Vec<String> {
        a.iter().zip(b).map(|(x, y)| format!("{:.1} %", (y - x) / secs * 100.0)).collect()
    };
    println!();
    println!(
        "overlay-sim: {} agents, {} endpoints in {} networks (each with endpoints on {} hosts), 3 members, TLS; load {load_start} → {load_end}",
        o.agents, o.endpoints, o.networks, o.span
    );
    println!();
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| setup: {} hosts, {} networks, {} endpoints (admin, 64 concurrent) | {setup_secs:.0} s ({:.0} endpoints/s) |",
        o.agents,
        o.networks,
        o.endpoints,
        o.endpoints as f64 / setup_secs
    );
    println!(
        "| members' RSS after setup, MiB | {} |",
        rss_after_setup.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" / ")
    );
    println!(
        "| all agents synced from scratch ({} endpoints known in total, {:.0} per agent, {:.0} of them whole; {sync_snapshots} snapshots started) | **{sync_secs:.1} s** |",
        received,
        received as f64 / o.agents as f64,
        whole as f64 / o.agents as f64
    );
    println!(
        "| revisions written during the sync (host status changes); hosts not ready after it | {sync_writes}; {not_ready} |"
    );
    println!(
        "| members' CPU during the sync, share of a core | {} (simulator {:.0} %) |",
        pct_core(&cpu0, &cpu1, sync_secs).join(" / "),
        (sim1 - sim0) / sync_secs * 100.0
    );
    println!(
        "| steady state ({} heartbeats/s, keepalives), members' CPU | **{}** (simulator {:.1} %) |",
        o.agents,
        pct_core(&cpu2, &cpu3, steady).join(" / "),
        (sim3 - sim2) / steady * 100.0
    );
    if !lat.is_empty() {
        println!(
            "| change → every agent ({} changes, {} deliveries), p50 / p99 / max | **{:.0} / {:.0} / {:.0} ms** |",
            o.changes,
            lat.len(),
            pct(&lat, 50.0),
            pct(&lat, 99.0),
            lat.last().copied().unwrap_or(0.0)
        );
        println!(
            "| same, slowest agent per change, p50 / max | {:.0} / {:.0} ms |",
            pct(&slowest, 50.0),
            slowest.last().copied().unwrap_or(0.0)
        );
    }
    if missing > 0 {
        println!("| deliveries missing after 30 s | {missing} |");
    }
    if let Some((n, down, up, writes_down, writes_up)) = silence_row {
        let secs =
            |t: Option<f64>| t.map_or("not within 60 s".to_string(), |t| format!("{t:.1} s"));
        println!(
            "| {n} agents stop heartbeating → all shown down / start again → all ready | **{}** / **{}** (revisions written: {writes_down} / {writes_up}; `--host-down-after-ms` 5000) |",
            secs(down),
            secs(up)
        );
    }
    if let Some((back, settled, caught, snapshots, down)) = restart_row {
        println!(
            "| leader restart: back listening / every agent at a revision made after it | {back:.1} s / **{settled:.1} s** ({caught} of {} agents; {snapshots} fresh snapshots; {down} hosts not ready) |",
            o.agents
        );
    }
    println!(
        "| members' RSS at the end / peak (VmHWM), MiB | {} |",
        peaks.iter().map(|(r, h)| format!("{r:.0} / **{h:.0}**")).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

async fn wait_leader(clients: &[OverlayClient<Channel>], within: Duration) -> Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        for c in clients {
            let mut c = c.clone();
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                c.cluster_status(pb::ClusterStatusRequest {}),
            )
            .await;
            if let Ok(Ok(s)) = r {
                if s.get_ref().leader != 0 {
                    return Ok(s.get_ref().leader);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no leader within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_listening(addr: SocketAddr, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{addr} not listening within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
