//! Shared by the multi-process controller tests and the cluster benchmark: a [`Cluster`]
//! of real `overlay-controller` processes on loopback (start, SIGKILL, restart, wipe),
//! gRPC clients to its members, and bounded polling helpers.
//!
//! Every child process is killed when the `Cluster` is dropped, also while a test
//! panics; a panicking test prints the tail of each member's log.

#![allow(dead_code)] // the tests and the benchmark each use a different subset

use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use overlay_grpc::Dialer;
use overlay_pki::{Ca, Identity, Role, Subject};
use overlay_proto::pb;
use overlay_proto::pb::overlay_client::OverlayClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub const BIN: &str = env!("CARGO_BIN_EXE_overlay-controller");

/// Client-side bound on one RPC. Longer than the controller's own 10 s commit timeout,
/// so the controller's answer (not ours) is what a test sees.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(12);

pub type Client = OverlayClient<Channel>;

/// One controller member: its address, data dir, log file and (while running) process.
pub struct Member {
    pub id: u64,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Flags this member runs with beyond the ones every member gets.
    extra: Vec<String>,
    /// Started with `--join` these URLs instead of the cluster's `--peers`.
    join: Option<String>,
    starts: u32,
    /// The binary it runs (an upgrade changes it); [`BIN`] unless set.
    binary: Option<PathBuf>,
}

impl Member {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct Cluster {
    // Dropped after the processes (see Drop): the members' dirs live in here.
    dir: tempfile::TempDir,
    pub members: Vec<Member>,
    peers: Option<String>,
    /// How clients reach the members: as `admin` over TLS, or plaintext.
    dialer: Dialer,
    /// Flags every member gets for its security mode.
    security_flags: Vec<String>,
}

/// The cluster's PKI in `dir/pki`: a CA, one controller certificate for all members
/// (the role is what counts, not the name), and the admin identity clients use.
fn make_pki(dir: &Path) -> (Vec<String>, Dialer) {
    let pki = dir.join("pki");
    let ca = Ca::generate().expect("CA");
    ca.save(&pki, false).expect("save CA");
    let controller = ca.issue(&Subject::new("controller", Role::Controller)).expect("issue");
    let (cert, key) = controller.save(&pki).expect("save controller cert");
    let admin =
        Identity::from_issued(&ca, &ca.issue(&Subject::new("admin", Role::Admin)).expect("issue"))
            .expect("admin identity");
    let config = overlay_pki::tls::client_config(&admin.ca, Some(&admin)).expect("client TLS");
    let path = |p: &Path| p.display().to_string();
    let flags = vec![
        "--tls-ca".into(),
        path(&pki.join(overlay_pki::CA_CERT_FILE)),
        "--tls-cert".into(),
        path(&cert),
        "--tls-key".into(),
        path(&key),
        "--tls-ca-key".into(),
        path(&pki.join(overlay_pki::CA_KEY_FILE)),
    ];
    (flags, Dialer::tls(config))
}

/// `n` loopback addresses whose ports were free a moment ago (bound to port 0 together,
/// so no two are the same, then released for the controllers to bind).
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local addr")).collect()
}

impl Cluster {
    /// Starts `n` members (ids 1..=n) with `extra` flags, waits until each listens.
    /// A single member is started without `--peers`, as a standalone controller. The
    /// members run with TLS (as in production); see [`Cluster::start_insecure`].
    pub fn start(n: usize, extra: &[&str]) -> Cluster {
        Cluster::start_with(n, extra, true)
    }

    /// [`Cluster::start`] with `--insecure` (plaintext), to compare against.
    pub fn start_insecure(n: usize, extra: &[&str]) -> Cluster {
        Cluster::start_with(n, extra, false)
    }

    fn start_with(n: usize, extra: &[&str], tls: bool) -> Cluster {
        let dir = tempfile::Builder::new().prefix("overlay-cluster-").tempdir().expect("tempdir");
        let (security_flags, dialer) = if tls {
            make_pki(dir.path())
        } else {
            (vec!["--insecure".into()], Dialer::insecure())
        };
        let addrs = free_addrs(n);
        let peers = (n > 1).then(|| {
            addrs
                .iter()
                .enumerate()
                .map(|(i, a)| format!("{}={a}", i + 1))
                .collect::<Vec<_>>()
                .join(",")
        });
        let members = addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                let id = i as u64 + 1;
                Member {
                    id,
                    addr,
                    data_dir: dir.path().join(format!("m{id}")),
                    log: dir.path().join(format!("m{id}.log")),
                    child: None,
                    extra: extra.iter().map(|s| s.to_string()).collect(),
                    join: None,
                    starts: 0,
                    binary: None,
                }
            })
            .collect();
        let mut cluster = Cluster { dir, members, peers, dialer, security_flags };
        for id in 1..=n as u64 {
            cluster.spawn(id);
        }
        for id in 1..=n as u64 {
            cluster.wait_listening(id);
        }
        cluster
    }

    pub fn ids(&self) -> Vec<u64> {
        self.members.iter().map(|m| m.id).collect()
    }

    pub fn running(&self) -> Vec<u64> {
        self.members.iter().filter(|m| m.is_running()).map(|m| m.id).collect()
    }

    pub fn member(&self, id: u64) -> &Member {
        self.members.iter().find(|m| m.id == id).unwrap_or_else(|| panic!("no member {id}"))
    }

    fn member_mut(&mut self, id: u64) -> &mut Member {
        self.members.iter_mut().find(|m| m.id == id).unwrap_or_else(|| panic!("no member {id}"))
    }

    fn spawn(&mut self, id: u64) {
        let peers = self.peers.clone();
        let security = self.security_flags.clone();
        let m = self.member_mut(id);
        assert!(m.child.is_none(), "member {id} is already running");
        m.starts += 1;
        let log = File::options().create(true).append(true).open(&m.log).expect("open member log");
        let mut cmd = Command::new(m.binary.as_deref().unwrap_or(Path::new(BIN)));
        cmd.arg("--id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(m.addr.to_string())
            .arg("--data-dir")
            .arg(&m.data_dir);
        if let Some(join) = &m.join {
            cmd.arg("--join").arg(join);
        } else if let Some(peers) = peers {
            cmd.arg("--peers").arg(peers);
        }
        cmd.args(&security)
            .args(&m.extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        m.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawning {BIN}: {e}")));
    }

    /// Blocks (bounded) until the member accepts TCP connections.
    pub fn wait_listening(&mut self, id: u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr = self.member(id).addr;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            let m = self.member_mut(id);
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                m.child = None;
                panic!("member {id} exited ({status}) while starting:\n{}", self.log_tail(id, 30));
            }
            assert!(
                Instant::now() < deadline,
                "member {id} not listening on {addr} after 15 s:\n{}",
                self.log_tail(id, 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (no chance to flush or say goodbye) and reap.
    pub fn kill(&mut self, id: u64) {
        let m = self.member_mut(id);
        if let Some(mut child) = m.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (as `systemctl stop` or a package upgrade does), then wait (bounded) for
    /// a clean exit.
    pub fn stop(&mut self, id: u64) {
        let m = self.member_mut(id);
        let Some(mut child) = m.child.take() else { return };
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(status.success(), "member {id} exited with {status} on SIGTERM");
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("member {id} did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts stopped member `id` running `binary` from now on (an upgrade).
    pub fn restart_on(&mut self, id: u64, binary: &Path) {
        self.member_mut(id).binary = Some(binary.to_path_buf());
        self.restart(id);
    }

    /// A new member `id` on a free loopback port that joins through every current member
    /// (`--join`); not started yet (see [`Cluster::restart`]). Returns its address.
    pub fn new_joiner(&mut self, id: u64, extra: &[&str]) -> SocketAddr {
        assert!(self.members.iter().all(|m| m.id != id), "member {id} exists");
        let join = self.urls().join(",");
        let addr = free_addrs(1)[0];
        self.members.push(Member {
            id,
            addr,
            data_dir: self.dir.path().join(format!("m{id}")),
            log: self.dir.path().join(format!("m{id}.log")),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            join: Some(join),
            starts: 0,
            binary: None,
        });
        addr
    }

    /// Forgets a stopped member (after it was removed from the raft configuration).
    pub fn forget(&mut self, id: u64) {
        self.kill(id);
        self.members.retain(|m| m.id != id);
    }

    pub fn restart(&mut self, id: u64) {
        self.spawn(id);
        self.wait_listening(id);
    }

    /// Restart with different extra flags (replacing the ones it had).
    pub fn restart_with(&mut self, id: u64, extra: &[&str]) {
        self.member_mut(id).extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart(id);
    }

    /// `rm -rf` of a stopped member's data dir.
    pub fn wipe(&mut self, id: u64) {
        let m = self.member(id);
        assert!(!m.is_running(), "wipe member {id} only while it is stopped");
        if m.data_dir.exists() {
            std::fs::remove_dir_all(&m.data_dir).expect("wipe data dir");
        }
    }

    pub fn url(&self, id: u64) -> String {
        format!("{}://{}", self.dialer.scheme(), self.member(id).addr)
    }

    /// How clients of this cluster dial (as admin, over TLS unless insecure).
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    pub fn urls(&self) -> Vec<String> {
        self.ids().into_iter().map(|id| self.url(id)).collect()
    }

    /// A lazily connected client: creating it never fails, calls to a dead member fail
    /// fast with Unavailable, and it reconnects once the member is back.
    pub fn client(&self, id: u64) -> Client {
        client_for(&self.dialer, &self.url(id))
    }

    pub fn log(&self, id: u64) -> String {
        let bytes = std::fs::read(&self.member(id).log).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let log = self.log(id);
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// ClusterStatus as seen by the first running member that answers.
    pub async fn status(&self) -> Option<pb::ClusterStatusResponse> {
        for id in self.running() {
            let mut c = self.client(id);
            if let Ok(Ok(r)) = tokio::time::timeout(
                Duration::from_secs(3),
                c.cluster_status(pb::ClusterStatusRequest {}),
            )
            .await
            {
                return Some(r.into_inner());
            }
        }
        None
    }

    /// The member every running member agrees leads (bounded).
    pub async fn wait_leader(&self, within: Duration) -> u64 {
        let running = self.running();
        let deadline = Instant::now() + within;
        loop {
            let s = self.status().await;
            if let Some(s) = &s {
                let up: Vec<&pb::Member> =
                    s.members.iter().filter(|m| running.contains(&m.id)).collect();
                if let Some(leader) = up.iter().find(|m| m.role == "leader").map(|m| m.id) {
                    if up.len() == running.len()
                        && up.iter().all(|m| m.reachable && m.leader == leader)
                    {
                        return leader;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader within {within:?}; last {s:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until every running member reports the same revision and state digest and
    /// has applied the same index; returns one member's view.
    pub async fn wait_converged(&self, within: Duration) -> pb::Member {
        let running = self.running();
        let deadline = Instant::now() + within;
        loop {
            let up: Vec<pb::Member> = match self.status().await {
                Some(s) => s.members.into_iter().filter(|m| running.contains(&m.id)).collect(),
                None => Vec::new(),
            };
            if let Some(first) = up.first() {
                let same = up.len() == running.len()
                    && up.iter().all(|m| {
                        m.reachable
                            && m.revision == first.revision
                            && m.digest == first.digest
                            && m.applied_index == first.applied_index
                    });
                if same {
                    return first.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "members did not converge within {within:?}: {up:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Registers host `name` (retrying while a leader is being elected).
    pub async fn register_host(&self, name: &str, ip: &str) {
        let req = pb::RegisterHostRequest {
            name: name.into(),
            underlay_ip: ip.into(),
            ..Default::default()
        };
        self.write_any(|mut c| {
            let req = req.clone();
            async move { c.register_host(req).await.map(|r| r.into_inner()) }
        })
        .await
        .expect("register host");
    }

    pub async fn create_network(&self, name: &str, subnet: &str) {
        let req = pb::CreateNetworkRequest {
            name: name.into(),
            subnet: subnet.into(),
            ..Default::default()
        };
        self.write_any(|mut c| {
            let req = req.clone();
            async move { c.create_network(req).await.map(|r| r.into_inner()) }
        })
        .await
        .expect("create network");
    }

    /// Runs `call` against running members in turn until one answers something other
    /// than Unavailable/DeadlineExceeded (bounded 20 s). AlreadyExists after a failed
    /// attempt is reported as `Ok(None)`: an earlier attempt did it.
    pub async fn write_any<T, F, Fut>(&self, call: F) -> Result<Option<T>, Status>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut retried = false;
        let mut i = 0usize;
        loop {
            let running = self.running();
            let id = running[i % running.len()];
            match timed(call(self.client(id))).await {
                Ok(v) => return Ok(Some(v)),
                Err(s) if retried && s.code() == Code::AlreadyExists => return Ok(None),
                Err(s) if is_retryable(&s) && Instant::now() < deadline => {
                    retried = true;
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// All endpoints, read linearizably from member `id`.
    pub async fn endpoints(&self, id: u64) -> pb::EndpointList {
        let mut c = self.client(id);
        timed(c.list_endpoints(pb::ListEndpointsRequest { consistency: 0 }))
            .await
            .unwrap_or_else(|s| panic!("list endpoints on member {id}: {s:?}"))
            .into_inner()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids = self.ids();
        for id in &ids {
            self.kill(*id);
        }
        if std::thread::panicking() {
            for id in ids {
                eprintln!("---- member {id} log (last 40 lines) ----\n{}", self.log_tail(id, 40));
            }
        }
    }
}

pub fn client_for(dialer: &Dialer, url: &str) -> Client {
    let endpoint = dialer
        .endpoint(url)
        .expect("valid url")
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    OverlayClient::new(dialer.connect_lazy(endpoint)).max_decoding_message_size(512 * 1024 * 1024)
}

/// No member answered for sure; try elsewhere: Unavailable or DeadlineExceeded from a
/// member, or a transport failure mid-call made on this side (tonic reports a member
/// that died under a call as Unknown "transport error" with the I/O error as source).
pub fn is_retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded)
        || (s.code() == Code::Unknown && std::error::Error::source(s).is_some())
}

/// An RPC bounded by [`CALL_TIMEOUT`] on our side too.
pub async fn timed<T>(fut: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded("client-side timeout")),
    }
}

/// Calls `f` every `every` until it returns `Some` or `within` has passed.
pub async fn poll<T, F, Fut>(within: Duration, every: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

pub fn create_endpoint_request(name: &str, host: &str, network: &str) -> pb::CreateEndpointRequest {
    pb::CreateEndpointRequest {
        name: name.into(),
        host: host.into(),
        network: network.into(),
        ip: String::new(),
        aliases: Vec::new(),
        ..Default::default()
    }
}

/// What a [`write_load`] saw: acknowledged names, and every failed attempt.
#[derive(Default)]
pub struct WriteLoad {
    pub acked: Vec<String>,
    pub failures: Vec<String>,
    /// Longest time between two acknowledgements.
    pub longest_gap: std::time::Duration,
}

/// Creates endpoints `PREFIX1`, `PREFIX2`, … on host h1 in network `net`, one after
/// another through the members in `urls` in turn (shared, so a test can change the
/// list), until `stop`. A failed write is recorded and not retried (its outcome may be
/// unknown); the next write goes to the next member.
pub fn write_load(
    dialer: Dialer,
    urls: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    prefix: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    load: std::sync::Arc<std::sync::Mutex<WriteLoad>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u64;
        let mut last_ack = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            n += 1;
            let list = urls.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let url = &list[n as usize % list.len()];
            let name = format!("{prefix}{n}");
            let mut client = client_for(&dialer, url);
            match timed(client.create_endpoint(create_endpoint_request(&name, "h1", "net"))).await {
                Ok(_) => {
                    let mut l = load.lock().unwrap_or_else(|p| p.into_inner());
                    l.acked.push(name);
                    l.longest_gap = l.longest_gap.max(last_ack.elapsed());
                    last_ack = Instant::now();
                }
                Err(s) => {
                    let failure = format!("{name} via {url}: {:?} {}", s.code(), s.message());
                    load.lock().unwrap_or_else(|p| p.into_inner()).failures.push(failure);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}
