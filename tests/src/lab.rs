//! A multi-host overlay cluster inside network namespaces on this machine.
//!
//! * an underlay switch: namespace `<id>sw` with bridge `sw0`, which also holds the
//!   "outside" address [`OUTSIDE_IP`] (a stand-in for the world beyond the hosts);
//! * N hosts: namespaces `<id>h1`… each with `ul0` (a veth into the switch) at
//!   `192.168.217.<i>/24`;
//! * three `overlay-controller` members (on hosts 1–3) and one `overlay-agent` per host,
//!   as real child processes whose network namespace is the host's. They are started
//!   with `nsenter --net=…` rather than `ip netns exec`: the latter also gives the
//!   process a private mount namespace, which would hide the endpoint namespaces the
//!   agent mounts under `/var/run/netns` from everyone else;
//! * secure by default, as a user sets it up: the lab makes a cluster CA, a `controller`
//!   certificate per controller and an `admin` certificate for `overlayctl` (in
//!   [`Lab::pki_dir`]); the controllers hold the CA key, and every agent joins with a
//!   join token, getting (and renewing) its own certificate in its data dir.
//!
//! `<id>` is `ovt<pid><letter>`, and endpoint names made through [`Lab::ep`] start with
//! it too, so every namespace this lab causes is recognisable and removed by `Drop` —
//! also when a test panics. Traffic only ever goes to addresses inside these namespaces.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use overlay_pki::cert_files;

/// Underlay subnet (inside the lab's namespaces only).
pub const UNDERLAY_PREFIX: &str = "192.168.217";
/// The address on the switch standing for "outside the hosts".
pub const OUTSIDE_IP: &str = "192.168.217.254";
/// Underlay MTU of the hosts' interfaces.
pub const UNDERLAY_MTU: u32 = 1500;
const CONTROLLER_PORT: u16 = 7400;
/// Every lab controller serves `/metrics` on its host's address at this port.
pub const CONTROLLER_METRICS_PORT: u16 = 7490;
/// Every lab agent serves `/metrics` on its host's address at this port.
pub const AGENT_METRICS_PORT: u16 = 7491;

static NEXT_LAB: AtomicUsize = AtomicUsize::new(0);

/// True when this process can create network namespaces (root).
pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/proc/self/ns/net").exists() && which("ip") && which("nsenter")
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `target/debug` (or wherever the workspace binaries are), from the test executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first", p.display());
    p
}

/// Runs `cmd`, returns its output (never panics on a non-zero exit).
pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// Runs `cmd` and fails with its stderr unless it succeeds.
pub fn run_ok(args: &[&str]) -> Result<String> {
    let out = run(args);
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` on a short-lived thread inside namespace `ns` (sockets it creates stay there).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = fs::File::open(format!("/var/run/netns/{ns}"))
        .with_context(|| format!("namespace {ns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: the fd is open for the call; only this thread changes namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {ns}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

/// Removes namespaces left by labs whose test process died without cleaning up.
fn sweep_stale() {
    let Ok(dir) = fs::read_dir("/var/run/netns") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("ovt") else { continue };
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(pid) = digits.parse::<u32>() else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_dataplane_daemons(&std::env::temp_dir().join(&name));
            let _ = run(&["ip", "netns", "del", &name]);
            let _ = fs::remove_dir_all(format!("/etc/netns/{name}"));
        }
    }
}

/// Kills the data-plane daemons the agents of the lab in `dir` started: they run in
/// their own session (so they outlive agent restarts) and leave their pid behind.
fn kill_dataplane_daemons(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let pid_file = e.path().join("dataplane.pid");
        let Ok(text) = fs::read_to_string(&pid_file) else { continue };
        let Ok(pid) = text.trim().parse::<libc::pid_t>() else { continue };
        // Only if it is still an overlay-agent (the pid may have been reused).
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "overlay-agent" {
            // SAFETY: kill(2) on a pid checked just above to be one of ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = fs::remove_file(&pid_file);
    }
}

/// A child process in namespace `ns`. Unless `detached`, it dies with the thread that
/// started it (SIGKILL if the test goes away without dropping the lab).
pub fn spawn_in(
    ns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
    detached: bool,
) -> Result<Child> {
    spawn_in_env(ns, program, args, log, detached, &[])
}

/// [`spawn_in`] with extra environment variables (e.g. a `PATH` that hides a tool).
pub fn spawn_in_env(
    ns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
    detached: bool,
    env: &[(&str, &str)],
) -> Result<Child> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{ns}")).arg("--").arg(program).args(args);
    cmd.envs(env.iter().copied());
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    if detached {
        cmd.process_group(0);
    } else {
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    cmd.spawn().with_context(|| format!("spawning {} in {ns}", program.display()))
}

/// `overlayctl --controller URLS FLAGS ARGS` run inside namespace `ns` (usable from
/// threads that do not hold the [`Lab`]; `FLAGS` are usually [`Lab::admin_args`]).
pub fn ctl_in(ns: &str, urls: &str, flags: &[String], args: &[&str]) -> Output {
    let ns = format!("--net=/var/run/netns/{ns}");
    let ctl = bin("overlayctl");
    let mut all: Vec<&str> =
        vec!["nsenter", &ns, "--", ctl.to_str().unwrap_or("overlayctl"), "--controller", urls];
    all.extend(flags.iter().map(String::as_str));
    all.extend_from_slice(args);
    run(&all)
}

/// One end-to-end case: runs against a shared lab, later cases may use what earlier
/// ones made.
pub type Case = fn(&mut Lab) -> Result<()>;

/// Starts a 3-host lab and runs `cases` in order, each isolated by `catch_unwind`;
/// fails at the end listing every case that failed (with the lab's logs). When the
/// first case (the set-up the others build on) fails, the rest are not run. Skipped
/// without root.
pub fn run_cases(cases: &[(&str, Case)]) {
    run_cases_with(LabOptions::hosts(3), cases)
}

/// [`run_cases`] on a lab of `hosts` hosts (controllers still on the first three).
pub fn run_cases_on(hosts: usize, cases: &[(&str, Case)]) {
    run_cases_with(LabOptions::hosts(hosts), cases)
}

/// [`run_cases`] on a lab built with `opts`.
pub fn run_cases_with(opts: LabOptions, cases: &[(&str, Case)]) {
    if !can_run() {
        eprintln!("skipped: needs root, ip and nsenter");
        return;
    }
    let start = Instant::now();
    let mut lab = Lab::start_with(opts).expect("lab start");
    let mut failed = vec![];
    for (i, (name, case)) in cases.iter().enumerate() {
        eprintln!("=== case {name}");
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut lab))) {
            Ok(Ok(())) => eprintln!("=== case {name}: ok"),
            Ok(Err(e)) => {
                eprintln!("=== case {name}: FAILED: {e:#}");
                failed.push(*name);
            }
            Err(_) => {
                eprintln!("=== case {name}: PANICKED");
                failed.push(*name);
            }
        }
        if i == 0 && !failed.is_empty() {
            break;
        }
    }
    eprintln!("cases took {:?}", start.elapsed());
    if !failed.is_empty() {
        eprintln!("{}", lab.logs());
        drop(lab);
        panic!("failed cases: {failed:?}");
    }
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub hosts: usize,
    /// Namespace prefix; default `ovt<pid><letter>`.
    pub id: Option<String>,
    /// Processes outlive this process (for `overlay-lab up`).
    pub detached: bool,
    /// Extra flags for every controller (e.g. `--agent-cert-lifetime 40s`).
    pub controller_args: Vec<String>,
    /// Hosts whose agent starts with the lab (the first ones); the rest wait for a test
    /// to start theirs. Default: all.
    pub agents: Option<usize>,
}

impl LabOptions {
    pub fn hosts(hosts: usize) -> LabOptions {
        LabOptions { hosts, id: None, detached: false, controller_args: vec![], agents: None }
    }
}

/// The admin identity's file name stem in [`Lab::pki_dir`].
pub const ADMIN: &str = "admin";

pub struct Lab {
    /// `ovt<pid><letter>`: prefix of every namespace of this lab.
    pub id: String,
    pub hosts: usize,
    pub dir: PathBuf,
    detached: bool,
    controller_args: Vec<String>,
    /// What agents join with (from `overlayctl cluster join-token`).
    join_token: Option<String>,
    controllers: Vec<Option<Child>>,
    agents: Vec<Option<Child>>,
    namespaces: Vec<String>,
    /// File systems mounted for a test (e.g. a small tmpfs as a data dir), unmounted by
    /// `Drop`.
    mounts: Vec<PathBuf>,
}

impl Lab {
    /// Builds the underlay and starts 3 controllers and `hosts` agents (hosts >= 3).
    pub fn start(hosts: usize) -> Result<Lab> {
        Lab::start_with(LabOptions::hosts(hosts))
    }

    pub fn start_with(opts: LabOptions) -> Result<Lab> {
        let hosts = opts.hosts;
        assert!(hosts >= 3, "the lab runs a controller on each of the first 3 hosts");
        sweep_stale();
        let id = opts.id.unwrap_or_else(|| {
            let n = NEXT_LAB.fetch_add(1, Ordering::SeqCst);
            let letter = char::from(b'a' + (n % 26) as u8);
            format!("ovt{}{letter}", std::process::id())
        });
        let dir = std::env::temp_dir().join(&id);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut lab = Lab {
            id,
            hosts,
            dir,
            detached: opts.detached,
            controller_args: opts.controller_args,
            join_token: None,
            controllers: vec![],
            agents: vec![],
            namespaces: vec![],
            mounts: vec![],
        };
        lab.underlay()?;
        lab.issue_certificates()?;
        for i in 1..=3 {
            lab.controllers.push(None);
            lab.start_controller(i)?;
        }
        lab.join_token = Some(lab.fetch_join_token()?);
        let started = opts.agents.unwrap_or(hosts).min(hosts);
        for i in 1..=hosts {
            lab.agents.push(None);
            if i <= started {
                lab.start_agent(i)?;
            }
        }
        lab.wait_ready(started)?;
        Ok(lab)
    }

    pub fn switch_ns(&self) -> String {
        format!("{}sw", self.id)
    }

    /// One more namespace `<lab>SUFFIX` on the underlay switch, at `ip`/24 (a stranger
    /// on the hosts' network; removed with the lab, whose namespaces share its prefix).
    pub fn add_underlay_ns(&self, suffix: &str, ip: &str) -> Result<String> {
        let ns = format!("{}{suffix}", self.id);
        let sw = self.switch_ns();
        let peer = format!("p{suffix}");
        run_ok(&["ip", "netns", "add", &ns])?;
        run_ok(&[
            "ip", "link", "add", "ul0", "netns", &ns, "type", "veth", "peer", "name", &peer,
            "netns", &sw,
        ])?;
        run_ok(&["ip", "-n", &sw, "link", "set", &peer, "master", "sw0", "up"])?;
        run_ok(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "ul0"])?;
        run_ok(&["ip", "-n", &ns, "link", "set", "ul0", "up"])?;
        run_ok(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn host_ns(&self, i: usize) -> String {
        format!("{}h{i}", self.id)
    }

    pub fn host_name(i: usize) -> String {
        format!("h{i}")
    }

    pub fn host_ip(i: usize) -> String {
        format!("{UNDERLAY_PREFIX}.{i}")
    }

    /// An endpoint name unique to this lab (endpoint names are machine-wide namespaces).
    pub fn ep(&self, short: &str) -> String {
        format!("{}-{short}", self.id)
    }

    pub fn controller_urls(&self) -> String {
        (1..=3)
            .map(|i| format!("https://{}:{CONTROLLER_PORT}", Lab::host_ip(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The flags that make `overlayctl` an admin of this lab.
    pub fn admin_args(&self) -> Vec<String> {
        let pki = self.pki_dir();
        let (cert, key) = cert_files(&pki, ADMIN);
        vec![
            "--tls-ca".into(),
            pki.join("ca.pem").display().to_string(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]
    }

    /// The current join token, asked from the controllers (waits for a leader).
    fn fetch_join_token(&self) -> Result<String> {
        wait_for(Duration::from_secs(30), "a join token from the controllers", || {
            let out = self.ctl(&["cluster", "join-token"]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if !out.status.success() {
                return None;
            }
            text.split_whitespace().last().map(str::to_string)
        })
    }

    /// Agent `i`'s certificate and key (it got them by joining): one file holds both.
    pub fn agent_cert_files(&self, i: usize) -> (PathBuf, PathBuf) {
        let both = self.agent_data_dir(i).join("tls").join("agent.pem");
        (both.clone(), both)
    }

    fn underlay(&mut self) -> Result<()> {
        let sw = self.switch_ns();
        run_ok(&["ip", "netns", "add", &sw])?;
        self.namespaces.push(sw.clone());
        run_ok(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        run_ok(&["ip", "-n", &sw, "link", "add", "sw0", "type", "bridge"])?;
        run_ok(&["ip", "-n", &sw, "addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "sw0"])?;
        run_ok(&["ip", "-n", &sw, "link", "set", "sw0", "up"])?;
        for i in 1..=self.hosts {
            let h = self.host_ns(i);
            run_ok(&["ip", "netns", "add", &h])?;
            self.namespaces.push(h.clone());
            let port = format!("p{i}");
            run_ok(&[
                "ip",
                "link",
                "add",
                "ul0",
                "netns",
                &h,
                "mtu",
                &UNDERLAY_MTU.to_string(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &sw,
            ])?;
            run_ok(&["ip", "-n", &sw, "link", "set", &port, "master", "sw0", "up"])?;
            run_ok(&[
                "ip",
                "-n",
                &h,
                "addr",
                "add",
                &format!("{}/24", Lab::host_ip(i)),
                "dev",
                "ul0",
            ])?;
            run_ok(&["ip", "-n", &h, "link", "set", "ul0", "up"])?;
            run_ok(&["ip", "-n", &h, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// The lab's PKI, made with `overlayctl cert` as a user would: the cluster CA, a
    /// `controller` certificate `c<i>` per controller and the `admin` certificate.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    fn issue_certificates(&self) -> Result<()> {
        let pki = self.pki_dir();
        let pki = pki.to_str().context("lab dir is not UTF-8")?;
        let ctl = bin("overlayctl");
        let ctl = ctl.to_str().context("binary path is not UTF-8")?;
        run_ok(&[ctl, "cert", "ca", "--out", pki])?;
        // Every host may run a controller (members added later run on hosts 4, 5, …).
        for i in 1..=self.hosts {
            let (name, ip) = (format!("c{i}"), Lab::host_ip(i));
            run_ok(&[
                ctl,
                "cert",
                "issue",
                &name,
                "--role",
                "controller",
                "--ip",
                &ip,
                "--ca-dir",
                pki,
                "--out",
                pki,
            ])?;
        }
        run_ok(&[ctl, "cert", "issue", ADMIN, "--role", "admin", "--ca-dir", pki, "--out", pki])?;
        Ok(())
    }

    pub fn start_controller(&mut self, i: usize) -> Result<()> {
        let data = self.dir.join(format!("controller{i}"));
        let peers = (1..=3)
            .map(|j| format!("{j}={}:{CONTROLLER_PORT}", Lab::host_ip(j)))
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "--id".into(),
            i.to_string(),
            "--listen".into(),
            format!("{}:{CONTROLLER_PORT}", Lab::host_ip(i)),
            "--data-dir".into(),
            data.display().to_string(),
            "--peers".into(),
            peers,
        ];
        args.extend(self.controller_security_args(i));
        let log = self.dir.join(format!("controller{i}.log"));
        let child =
            spawn_in(&self.host_ns(i), &bin("overlay-controller"), &args, &log, self.detached)?;
        self.controllers[i - 1] = Some(child);
        Ok(())
    }

    /// The TLS and metrics flags (and the lab's extra flags) of the controller on host `i`.
    fn controller_security_args(&self, i: usize) -> Vec<String> {
        let pki = self.pki_dir();
        let (cert, key) = cert_files(&pki, &format!("c{i}"));
        let mut args = Vec::new();
        for (flag, path) in [
            ("--tls-ca", pki.join("ca.pem")),
            ("--tls-cert", cert),
            ("--tls-key", key),
            ("--tls-ca-key", pki.join("ca-key.pem")),
        ] {
            args.extend([flag.to_string(), path.display().to_string()]);
        }
        args.extend([
            "--metrics-listen".to_string(),
            format!("{}:{CONTROLLER_METRICS_PORT}", Lab::host_ip(i)),
        ]);
        args.extend(self.controller_args.iter().cloned());
        args
    }

    /// `/metrics` of the controller on host `i`, scraped from the switch (where a
    /// monitoring system would be), parsed.
    pub fn controller_metrics(&self, i: usize) -> Result<crate::prom::Scrape> {
        self.scrape_from(&self.switch_ns(), &Lab::host_ip(i), CONTROLLER_METRICS_PORT)
    }

    /// `/metrics` of the agent on host `i`, scraped from the switch, parsed.
    pub fn agent_metrics(&self, i: usize) -> Result<crate::prom::Scrape> {
        self.scrape_from(&self.switch_ns(), &Lab::host_ip(i), AGENT_METRICS_PORT)
    }

    /// `GET http://IP:PORT/metrics` from inside namespace `ns`, parsed.
    pub fn scrape_from(&self, ns: &str, ip: &str, port: u16) -> Result<crate::prom::Scrape> {
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
        let text = in_netns(ns, || crate::prom::get_metrics(addr, Duration::from_secs(5)))??;
        crate::prom::Scrape::parse(&text)
    }

    /// Whether a TCP connection from namespace `ns` to `ip:port` is accepted within
    /// `timeout` (a refusal or a drop both count as not).
    pub fn tcp_connects(&self, ns: &str, ip: &str, port: u16, timeout: Duration) -> Result<bool> {
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
        in_netns(ns, || std::net::TcpStream::connect_timeout(&addr, timeout).is_ok())
    }

    /// `https://IP:PORT` of the controller on host `i`.
    pub fn controller_url(i: usize) -> String {
        format!("https://{}:{CONTROLLER_PORT}", Lab::host_ip(i))
    }

    /// `IP:PORT` the controller on host `i` listens on (its member address).
    pub fn controller_address(i: usize) -> String {
        format!("{}:{CONTROLLER_PORT}", Lab::host_ip(i))
    }

    /// Starts a controller on host `i` as a new member `id` with `--join` through the
    /// controllers on hosts `via`, on an empty data dir. It starts from their snapshot
    /// and takes part once `overlayctl cluster member add` has added it.
    pub fn start_controller_join(&mut self, i: usize, id: u64, via: &[usize]) -> Result<()> {
        let data = self.dir.join(format!("controller{i}"));
        let join = via.iter().map(|&j| Lab::controller_url(j)).collect::<Vec<_>>().join(",");
        // The same flags as `start_controller`, with --join instead of --peers.
        let mut args = vec![
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            Lab::controller_address(i),
            "--data-dir".into(),
            data.display().to_string(),
            "--join".into(),
            join,
        ];
        args.extend(self.controller_security_args(i));
        let log = self.dir.join(format!("controller{i}.log"));
        let child =
            spawn_in(&self.host_ns(i), &bin("overlay-controller"), &args, &log, self.detached)?;
        if self.controllers.len() < i {
            self.controllers.resize_with(i, || None);
        }
        self.controllers[i - 1] = Some(child);
        Ok(())
    }

    /// Cuts host `i` off the underlay: its `ul0` goes down (processes keep running).
    pub fn partition_host(&self, i: usize) -> Result<()> {
        run_ok(&["ip", "-n", &self.host_ns(i), "link", "set", "ul0", "down"]).map(drop)
    }

    /// Undoes [`partition_host`](Self::partition_host).
    pub fn heal_host(&self, i: usize) -> Result<()> {
        run_ok(&["ip", "-n", &self.host_ns(i), "link", "set", "ul0", "up"]).map(drop)
    }

    /// `overlayctl --controller URLS ARGS` as admin, inside host `from`'s namespace.
    pub fn ctl_via(&self, from: usize, urls: &str, args: &[&str]) -> Output {
        ctl_in(&self.host_ns(from), urls, &self.admin_args(), args)
    }

    /// The data dir of the controller on host `i`.
    pub fn controller_data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("controller{i}"))
    }

    /// Moves the data dir of the controller on host `i` onto a tmpfs of `size_mib` MiB
    /// (to run it out of space): SIGKILLs it, copies its files over, starts it again.
    pub fn controller_on_tmpfs(&mut self, i: usize, size_mib: u32) -> Result<()> {
        let data = self.controller_data_dir(i);
        self.kill_controller(i);
        let aside = self.dir.join(format!("controller{i}.before-tmpfs"));
        fs::rename(&data, &aside)?;
        fs::create_dir_all(&data)?;
        let size = format!("size={size_mib}m");
        run_ok(&["mount", "-t", "tmpfs", "-o", &size, "tmpfs", &data.display().to_string()])?;
        self.mounts.push(data.clone());
        run_ok(&["cp", "-a", &format!("{}/.", aside.display()), &data.display().to_string()])?;
        fs::remove_dir_all(&aside)?;
        self.start_controller(i)
    }

    pub fn kill_controller(&mut self, i: usize) {
        let Some(slot) = self.controllers.get_mut(i - 1) else { return };
        if let Some(mut c) = slot.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn agent_data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("agent{i}"))
    }

    /// The resolv.conf every agent forwards DNS with: it names [`OUTSIDE_IP`] only, so
    /// forwarded names stay inside the lab (nothing answers there unless a test does).
    ///
    /// Written whole under a temporary name and renamed into place, once: agents read it
    /// as they start, and rewriting it in place (truncate, then write) while an earlier
    /// agent starts could let that agent read an empty file — no upstream at all, so
    /// every forwarded name would get SERVFAIL from that host's endpoints.
    pub fn resolv_conf(&self) -> Result<PathBuf> {
        let path = self.dir.join("resolv.conf");
        let content = format!("nameserver {OUTSIDE_IP}\n");
        if fs::read_to_string(&path).ok().as_deref() != Some(content.as_str()) {
            let tmp = self.dir.join(".resolv.conf.tmp");
            fs::write(&tmp, &content)?;
            fs::rename(&tmp, &path)?;
        }
        Ok(path)
    }

    /// The flags agent `i` runs with.
    pub fn agent_args(&self, i: usize) -> Result<Vec<String>> {
        Ok(vec![
            "--name".into(),
            Lab::host_name(i),
            "--underlay-ip".into(),
            Lab::host_ip(i),
            "--controller".into(),
            self.controller_urls(),
            "--data-dir".into(),
            self.agent_data_dir(i).display().to_string(),
            "--reconcile-interval".into(),
            "1".into(),
            "--resolv-conf".into(),
            self.resolv_conf()?.display().to_string(),
            "--metrics-listen".into(),
            format!("{}:{AGENT_METRICS_PORT}", Lab::host_ip(i)),
            "--tls-ca".into(),
            self.pki_dir().join("ca.pem").display().to_string(),
            "--join-token".into(),
            self.join_token.clone().context("the lab has no join token yet")?,
            "--socket".into(),
            self.agent_socket(i).display().to_string(),
        ])
    }

    /// The unix socket agent `i` serves `overlay-cni` on (one per host: they share the
    /// machine's file system).
    pub fn agent_socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("agent{i}.sock"))
    }

    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let args = self.agent_args(i)?;
        // Logs are appended across restarts, so a failing test shows the whole story.
        let log = self.dir.join(format!("agent{i}.log"));
        let child = spawn_in(&self.host_ns(i), &bin("overlay-agent"), &args, &log, self.detached)?;
        self.agents[i - 1] = Some(child);
        Ok(())
    }

    /// Starts agent `i` with extra environment variables (e.g. a `PATH` whose first
    /// directory holds a failing `nft`).
    pub fn start_agent_with_env(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        let args = self.agent_args(i)?;
        let log = self.dir.join(format!("agent{i}.log"));
        let child =
            spawn_in_env(&self.host_ns(i), &bin("overlay-agent"), &args, &log, self.detached, env)?;
        self.agents[i - 1] = Some(child);
        Ok(())
    }

    /// Packets counted so far by the rule of the agent's `inet overlay` table, chain
    /// `chain`, in host `i`'s namespace whose JSON form contains every one of `needles`
    /// (e.g. `["@hosts", "saddr"]`); `None` without such a rule or without nft.
    pub fn nft_rule_packets(&self, i: usize, chain: &str, needles: &[&str]) -> Option<u64> {
        let ns = self.host_ns(i);
        let text = run_ok(&[
            "ip", "netns", "exec", &ns, "nft", "-j", "list", "chain", "inet", "overlay", chain,
        ])
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["nftables"].as_array()?.iter().filter_map(|item| item.get("rule")).find_map(|rule| {
            let expr = rule["expr"].to_string();
            if !needles.iter().all(|n| expr.contains(n)) {
                return None;
            }
            rule["expr"].as_array()?.iter().find_map(|e| e["counter"]["packets"].as_u64())
        })
    }

    /// SIGTERM (graceful: the agent leaves the data plane in place) and wait.
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i - 1].take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL (no chance to clean up or persist anything more) and reap.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pid of agent `i`, if running (for measuring it).
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents.get(i - 1)?.as_ref().map(Child::id)
    }

    /// `n` agents registered and ready.
    fn wait_ready(&self, n: usize) -> Result<()> {
        wait_for(Duration::from_secs(60), "all hosts ready", || {
            let v = self.ctl_json(&["host", "ls"]).ok()?;
            let ready = v.as_array()?.iter().filter(|h| h["status"] == "ready").count();
            (ready == n).then_some(())
        })
    }

    /// The join token the lab's agents were started with.
    pub fn join_token(&self) -> Option<&str> {
        self.join_token.as_deref()
    }

    /// Sets the join token later agents start with (after a rotation).
    pub fn set_join_token(&mut self, token: &str) {
        self.join_token = Some(token.to_string());
    }

    /// The log of agent `i` so far.
    pub fn agent_log(&self, i: usize) -> String {
        fs::read_to_string(self.dir.join(format!("agent{i}.log"))).unwrap_or_default()
    }

    /// The log of controller `i` so far.
    pub fn controller_log(&self, i: usize) -> String {
        fs::read_to_string(self.dir.join(format!("controller{i}.log"))).unwrap_or_default()
    }

    /// Waits (bounded) for agent `i`'s process to exit; its exit status.
    pub fn wait_agent_exit(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let child = self.agents[i - 1].as_mut().context("agent is not running")?;
        let status =
            wait_for(timeout, &format!("agent {i} to exit"), || child.try_wait().ok().flatten())?;
        self.agents[i - 1] = None;
        Ok(status)
    }

    /// `overlayctl ARGS` from host 1, against every controller.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let ns = format!("--net=/var/run/netns/{}", self.host_ns(1));
        let ctl = bin("overlayctl");
        let urls = self.controller_urls();
        let admin = self.admin_args();
        let mut all: Vec<&str> =
            vec!["nsenter", &ns, "--", ctl.to_str().unwrap_or("overlayctl"), "--controller", &urls];
        all.extend(admin.iter().map(String::as_str));
        all.extend_from_slice(args);
        run(&all)
    }

    /// `overlayctl ARGS`, stdout, error with stderr on failure.
    ///
    /// A write answered with "… not found" is retried, and a retry answered "already …"
    /// counts as success: a controller member may answer a forwarded write by reading
    /// back from its own state before it has applied the entry (a controller bug this
    /// works around, loudly, so the suite tests the data plane rather than that race).
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let write = matches!(
            args,
            ["network", "create" | "connect" | "disconnect", ..]
                | ["endpoint", "create", ..]
                | ["route", "add", ..]
        );
        let mut out = self.ctl(args);
        let mut retried = false;
        for _ in 0..20 {
            if out.status.success() || !write {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            if retried && err.contains("already") {
                eprintln!("overlayctl {args:?}: write had succeeded ({})", err.trim());
                return Ok(String::new());
            }
            if !err.contains("not found") {
                break;
            }
            eprintln!(
                "overlayctl {args:?}: {} (read-after-write race in the controller); retrying",
                err.trim()
            );
            retried = true;
            std::thread::sleep(Duration::from_millis(200));
            out = self.ctl(args);
        }
        if !out.status.success() {
            bail!("overlayctl {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `overlayctl -o json ARGS`, parsed.
    /// Endpoint `name`'s (ip, mac) in `network`, from `endpoint inspect`.
    pub fn attachment(&self, name: &str, network: &str) -> Result<(String, String)> {
        let v = self.ctl_json(&["endpoint", "inspect", name])?;
        let a = v["attachments"]
            .as_array()
            .context("attachments")?
            .iter()
            .find(|a| a["network"] == network)
            .with_context(|| format!("{name} not in {network}"))?;
        Ok((a["ip"].as_str().context("ip")?.into(), a["mac"].as_str().context("mac")?.into()))
    }

    pub fn ctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let text = self.ctl_ok(&all)?;
        serde_json::from_str(&text).with_context(|| format!("overlayctl {args:?} printed {text}"))
    }

    /// `ip netns exec NS ARGS` (endpoint namespaces: /etc/netns/NS is bind-mounted).
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        run(&all)
    }

    /// `ip -j ARGS` inside namespace `ns`, parsed.
    pub fn ip_json(&self, ns: &str, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["ip", "-j", "-n", ns];
        all.extend_from_slice(args);
        let text = run_ok(&all)?;
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Array(vec![]));
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// Creates an endpoint and waits until its namespace has its address.
    pub fn endpoint(
        &self,
        short: &str,
        host: usize,
        network: &str,
        extra: &[&str],
    ) -> Result<String> {
        let name = self.ep(short);
        let h = Lab::host_name(host);
        let mut args = vec!["endpoint", "create", &name, "--host", &h, "--network", network];
        args.extend_from_slice(extra);
        self.ctl_ok(&args)?;
        self.wait_endpoint(&name)?;
        Ok(name)
    }

    /// The endpoint's IP in its first attachment, once its eth0 carries it.
    pub fn wait_endpoint(&self, name: &str) -> Result<String> {
        let v = self.ctl_json(&["endpoint", "inspect", name])?;
        let ip = v["attachments"][0]["ip"].as_str().context("endpoint has no ip")?.to_string();
        self.wait_addr(name, &ip)?;
        Ok(ip)
    }

    /// Waits until `eth0` in namespace `name` carries `ip` (no controller needed).
    pub fn wait_addr(&self, name: &str, ip: &str) -> Result<()> {
        wait_for(Duration::from_secs(20), &format!("{name} to get {ip}"), || {
            let a = self.ip_json(name, &["addr", "show", "eth0"]).ok()?;
            let has = a[0]["addr_info"].as_array()?.iter().any(|x| x["local"] == ip);
            has.then_some(())
        })
    }

    /// One ping; true if answered.
    pub fn ping(&self, from: &str, to: &str) -> bool {
        self.exec(from, &["ping", "-c", "1", "-W", "1", to]).status.success()
    }

    /// Pings until one is answered, for up to `timeout`.
    pub fn ping_ok(&self, from: &str, to: &str, timeout: Duration) -> Result<()> {
        wait_for(timeout, &format!("{from} to reach {to}"), || self.ping(from, to).then_some(()))
    }

    /// Tail of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(dir) = fs::read_dir(&self.dir) else { return out };
        let mut files: Vec<_> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        for f in files {
            let text = fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            out.push_str(&format!("--- {} ---\n{tail}\n", f.display()));
        }
        out
    }

    /// Process ids of the running controllers and agents (for `overlay-lab`).
    pub fn pids(&self) -> Vec<(String, u32)> {
        let c = self
            .controllers
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((format!("controller{}", i + 1), c.as_ref()?.id())));
        let a = self
            .agents
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((format!("agent{}", i + 1), c.as_ref()?.id())));
        c.chain(a).collect()
    }

    /// Leaves everything running and forgets it (for `overlay-lab up`).
    pub fn detach(mut self) {
        self.mounts.clear();
        self.controllers.clear();
        self.agents.clear();
        self.namespaces.clear();
        self.detached = true;
        std::mem::forget(self);
    }

    /// Namespaces the agents recorded as created.
    fn agent_namespaces(&self) -> Vec<String> {
        let mut out = vec![];
        for i in 1..=self.hosts {
            if let Ok(text) = fs::read_to_string(self.agent_data_dir(i).join("namespaces.json")) {
                if let Ok(v) = serde_json::from_str::<Vec<String>>(&text) {
                    out.extend(v);
                }
            }
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 1..=self.agents.len() {
            if let Some(mut c) = self.agents[i - 1].take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for i in 1..=self.controllers.len() {
            self.kill_controller(i);
        }
        kill_dataplane_daemons(&self.dir);
        for m in &self.mounts {
            let _ = run(&["umount", "-l", &m.display().to_string()]);
        }
        let mut names = self.agent_namespaces();
        if let Ok(dir) = fs::read_dir("/var/run/netns") {
            names.extend(
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.id)),
            );
        }
        names.extend(self.namespaces.iter().cloned());
        for name in names {
            if name.starts_with(&self.id) {
                let _ = run(&["ip", "netns", "del", &name]);
                let _ = fs::remove_dir_all(format!("/etc/netns/{name}"));
            }
        }
        if std::env::var_os("OVT_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
