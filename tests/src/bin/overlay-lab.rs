//! `overlay-lab up|down|status|ctl ARGS…` (what `scripts/lab.sh` runs): the embedded
//! default — a 3-host overlay cluster (underlay switch, 3 host namespaces, 3 controllers,
//! 3 agents) on this machine, left running for people to try `overlayctl` against.
//!
//! * `up` is idempotent: a running, healthy lab is reported and left alone; a stale one
//!   (a process gone, hosts not ready, or leftovers of an interrupted `up`) is removed
//!   and a fresh one started.
//! * `down` removes every namespace, device and process the lab made, including endpoint
//!   namespaces its agents created and processes still running inside any of them; it
//!   is fine when nothing is up.
//!
//! A process counts as the lab's only if its network namespace is one of the lab's, so
//! a recycled pid is never signalled. Needs root.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlay_tests::lab::{bin_dir, can_run, run, wait_for, Lab, LabOptions, ADMIN, OUTSIDE_IP};
use serde::{Deserialize, Serialize};

const ID: &str = "ovtlab";
const STATE: &str = "/run/overlay-lab.json";
const HOSTS: usize = 3;
const NETNS_DIR: &str = "/run/netns";

#[derive(Serialize, Deserialize)]
struct State {
    id: String,
    hosts: usize,
    dir: PathBuf,
    urls: String,
    pids: Vec<(String, u32)>,
}

fn load() -> Option<State> {
    serde_json::from_str(&std::fs::read_to_string(STATE).ok()?).ok()
}

fn lab_dir() -> PathBuf {
    std::env::temp_dir().join(ID)
}

fn overlayctl() -> PathBuf {
    bin_dir().join("overlayctl")
}

/// The environment that makes `overlayctl` the lab's admin (its TLS files).
fn admin_env(state: &State) -> [(&'static str, PathBuf); 3] {
    let pki = state.dir.join("pki");
    let (cert, key) = overlay_pki::cert_files(&pki, ADMIN);
    [("OVERLAY_TLS_CA", pki.join("ca.pem")), ("OVERLAY_TLS_CERT", cert), ("OVERLAY_TLS_KEY", key)]
}

/// `overlayctl --controller URLS ARGS` run inside host 1's network namespace, as admin.
fn ctl_command(state: &State, args: &[String]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={NETNS_DIR}/{}h1", state.id))
        .arg("--")
        .arg(overlayctl())
        .arg("--controller")
        .arg(&state.urls)
        .args(args)
        .envs(admin_env(state));
    cmd
}

/// Number of hosts `overlayctl host ls` reports `ready` (0 if it cannot tell).
fn ready_hosts(state: &State) -> usize {
    let Ok(out) = ctl_command(state, &["-o".into(), "json".into(), "host".into(), "ls".into()])
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return 0;
    };
    let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    hosts.as_array().map_or(0, |a| a.iter().filter(|h| h["status"] == "ready").count())
}

/// Inode of a network namespace handle (a file under /run/netns or /proc/PID/ns/net).
fn netns_inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// The lab's namespaces: its own (`<id>…`) and the endpoints its agents recorded.
fn lab_namespaces(id: &str, dir: &Path) -> Vec<String> {
    let mut names = vec![];
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        names.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(id)),
        );
    }
    for i in 1..=HOSTS {
        let record = dir.join(format!("agent{i}")).join("namespaces.json");
        if let Ok(text) = std::fs::read_to_string(record) {
            names.extend(serde_json::from_str::<Vec<String>>(&text).unwrap_or_default());
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Processes whose network namespace is one of `names`: pid -> namespace name.
fn processes_in(names: &[String]) -> BTreeMap<u32, String> {
    let inodes: BTreeMap<u64, &String> = names
        .iter()
        .filter_map(|n| Some((netns_inode(&Path::new(NETNS_DIR).join(n))?, n)))
        .collect();
    let mut found = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Some(name) = netns_inode(&p.path().join("ns/net")).and_then(|i| inodes.get(&i)) {
            found.insert(pid, (*name).clone());
        }
    }
    found
}

/// Why the lab in `state` is not usable, if it is not.
fn unhealthy(state: &State) -> Option<String> {
    let names = lab_namespaces(&state.id, &state.dir);
    let ours = processes_in(&names);
    if let Some((what, pid)) = state.pids.iter().find(|(_, pid)| !ours.contains_key(pid)) {
        return Some(format!("{what} (pid {pid}) is gone"));
    }
    let ready = wait_for(Duration::from_secs(15), "hosts ready", || {
        (ready_hosts(state) == state.hosts).then_some(())
    });
    ready.err().map(|_| format!("only {} of {} hosts are ready", ready_hosts(state), state.hosts))
}

/// Kills every process in the lab's namespaces, deletes the namespaces, their
/// /etc/netns entries, the log dir and the state file. Returns (processes, namespaces).
fn teardown(id: &str, dir: &Path) -> (usize, usize) {
    let names = lab_namespaces(id, dir);
    let procs = processes_in(&names);
    for pid in procs.keys() {
        // SAFETY: kill(2) on a pid that was just seen inside one of the lab's namespaces.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let gone = wait_for(Duration::from_secs(5), "lab processes to exit", || {
        procs.keys().all(|pid| !Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    if let Err(e) = gone {
        eprintln!("warning: {e}");
    }
    let mut removed = 0;
    for n in &names {
        removed += usize::from(Path::new(NETNS_DIR).join(n).exists());
        let _ = run(&["ip", "netns", "del", n]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{n}"));
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(STATE);
    (procs.len(), removed)
}

/// Prints what has started while `Lab::start_with` works, from what appears on disk.
fn show_progress(dir: PathBuf, done: Arc<AtomicBool>) {
    let started = Instant::now();
    let mut steps: Vec<(PathBuf, String)> = vec![(
        Path::new(NETNS_DIR).join(format!("{ID}h{HOSTS}")),
        format!("underlay switch {ID}sw and hosts {ID}h1..{ID}h{HOSTS} (192.168.217.0/24)"),
    )];
    for i in 1..=3 {
        steps.push((dir.join(format!("controller{i}.log")), format!("controller {i} on h{i}")));
    }
    for i in 1..=HOSTS {
        steps.push((dir.join(format!("agent{i}.log")), format!("agent on h{i}")));
    }
    steps.reverse();
    while !done.load(Ordering::SeqCst) {
        while steps.last().is_some_and(|(path, _)| path.exists()) {
            if let Some((_, what)) = steps.pop() {
                println!("    {:5.1}s  started {what}", started.elapsed().as_secs_f64());
                if steps.is_empty() {
                    println!("    waiting for the agents to register with the controllers…");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start() -> Result<State, String> {
    println!("==> starting the lab: {HOSTS} hosts, 3 controllers, {HOSTS} agents");
    let done = Arc::new(AtomicBool::new(false));
    let progress = {
        let (dir, done) = (lab_dir(), done.clone());
        std::thread::spawn(move || show_progress(dir, done))
    };
    let lab = Lab::start_with(LabOptions {
        id: Some(ID.into()),
        detached: true,
        ..LabOptions::hosts(HOSTS)
    });
    done.store(true, Ordering::SeqCst);
    let _ = progress.join();
    let lab = lab.map_err(|e| {
        format!("{e:#} (set OVT_KEEP_LOGS=1 to keep the logs in {})", lab_dir().display())
    })?;
    let state = State {
        id: lab.id.clone(),
        hosts: lab.hosts,
        dir: lab.dir.clone(),
        urls: lab.controller_urls(),
        pids: lab.pids(),
    };
    lab.detach();
    let text = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
    std::fs::write(STATE, text).map_err(|e| format!("{STATE}: {e}"))?;
    Ok(state)
}

fn print_usage(state: &State) {
    let ctl = overlayctl();
    let env = admin_env(state);
    let _ = ctl_command(state, &["host".into(), "ls".into()]).status();
    println!(
        "
{n} hosts h1..h{n} run in network namespaces {id}h1..{id}h{n} (underlay 192.168.217.0/24,
\"outside\" address {OUTSIDE_IP}); controllers {urls}; logs in {dir}.

Try it (the README's walk-through goes further):

    ./scripts/lab.sh ctl network create frontend --subnet 10.0.1.0/24
    ./scripts/lab.sh ctl endpoint create s1 --host h1 --network frontend
    ./scripts/lab.sh ctl endpoint create s2 --host h2 --network frontend
    ip netns exec s1 ping -c 3 s2      # by name, from host h1 to host h2

overlayctl itself runs inside a host's namespace (the controllers listen there), with
the lab's admin certificate (the lab is secure by default: mutual TLS, roles):

    export OVERLAY_CONTROLLER={urls}
    export OVERLAY_TLS_CA={ca} OVERLAY_TLS_CERT={cert} OVERLAY_TLS_KEY={key}
    ip netns exec {id}h1 {ctl} host ls

./scripts/lab.sh status shows the lab; ./scripts/lab.sh down removes it.",
        n = state.hosts,
        id = state.id,
        urls = state.urls,
        dir = state.dir.display(),
        ctl = ctl.display(),
        ca = env[0].1.display(),
        cert = env[1].1.display(),
        key = env[2].1.display(),
    );
}

fn up() -> Result<(), String> {
    match load() {
        Some(state) => match unhealthy(&state) {
            None => {
                println!("==> the lab is already up and healthy");
                print_usage(&state);
                return Ok(());
            }
            Some(why) => {
                println!("==> found a stale lab ({why}): removing it");
                let (procs, names) = teardown(&state.id, &state.dir);
                println!("    stopped {procs} processes, removed {names} namespaces");
            }
        },
        None => {
            let names = lab_namespaces(ID, &lab_dir());
            if !names.is_empty() {
                println!("==> removing leftovers of an interrupted lab ({})", names.join(" "));
                let (procs, names) = teardown(ID, &lab_dir());
                println!("    stopped {procs} processes, removed {names} namespaces");
            }
        }
    }
    let state = start()?;
    println!("==> lab up");
    print_usage(&state);
    Ok(())
}

fn down() -> Result<(), String> {
    let (id, dir) = match load() {
        Some(s) => (s.id, s.dir),
        None => (ID.to_string(), lab_dir()),
    };
    let (procs, names) = teardown(&id, &dir);
    if procs + names == 0 {
        println!("lab down: nothing was up");
    } else {
        println!("lab down: stopped {procs} processes, removed {names} namespaces");
    }
    Ok(())
}

fn status() -> Result<ExitCode, String> {
    let state = load().ok_or("no lab is up (start one with ./scripts/lab.sh up)")?;
    let ours = processes_in(&lab_namespaces(&state.id, &state.dir));
    let mut healthy = true;
    for (what, pid) in &state.pids {
        let alive = ours.contains_key(pid);
        healthy &= alive;
        println!("{what:12} pid {pid:7} {}", if alive { "running" } else { "gone" });
    }
    let out = ctl_command(&state, &["host".into(), "ls".into()])
        .output()
        .map_err(|e| format!("overlayctl: {e}"))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    healthy &= out.status.success();
    Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn ctl(args: &[String]) -> Result<ExitCode, String> {
    let state = load().ok_or("no lab is up (start one with ./scripts/lab.sh up)")?;
    let status = ctl_command(&state, args).status().map_err(|e| format!("overlayctl: {e}"))?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !can_run() {
        eprintln!("error: run as root (the lab creates network namespaces; needs ip and nsenter)");
        return ExitCode::FAILURE;
    }
    let r = match args.first().map(String::as_str) {
        Some("up") => up().map(|_| ExitCode::SUCCESS),
        Some("down") => down().map(|_| ExitCode::SUCCESS),
        Some("status") => status(),
        Some("ctl") => ctl(&args[1..]),
        Some(other) => Err(format!(
            "unknown command {other:?}: usage: overlay-lab up|down|status|ctl OVERLAYCTL-ARGS..."
        )),
        None => Err("usage: overlay-lab up|down|status|ctl OVERLAYCTL-ARGS...".into()),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
