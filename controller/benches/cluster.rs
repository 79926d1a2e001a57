//! Controller throughput benchmark: committed endpoint creates per second and latency
//! at 1, 16 and 64 concurrent clients on a 3-member loopback cluster (plus a
//! single-member baseline), then the members' resident memory holding 100,000 endpoints.
//!
//! `cargo bench -p overlay-controller --bench cluster` (release build). Prints a table.
//! Every create is acknowledged only after commit + apply on the leader, so a row's
//! rate is committed writes. Environment knobs: `BENCH_SECS` (seconds per row, default
//! 5) and `BENCH_ENDPOINTS` (the memory run's endpoint count, default 100000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client_for, create_endpoint_request, timed, Cluster};

/// Where a run's clients send their calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Client k talks to member k mod n: followers forward to the leader.
    Spread,
    /// Every client talks to the leader.
    Leader,
}

struct Row {
    setup: String,
    target: &'static str,
    clients: usize,
    ok: usize,
    errors: usize,
    secs: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Row {
    /// Acknowledged writes per second.
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    fn print(&self) {
        println!(
            "| {:<22} | {:<7} | {:>7} | {:>8} | {:>9.0} | {:>8.2} | {:>8.2} | {:>8.2} | {:>6} |",
            self.setup,
            self.target,
            self.clients,
            self.ok,
            self.rate(),
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.errors,
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn header() {
    println!(
        "| {:<22} | {:<7} | {:>7} | {:>8} | {:>9} | {:>8} | {:>8} | {:>8} | {:>6} |",
        "cluster",
        "target",
        "clients",
        "creates",
        "creates/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors"
    );
    println!("|{}|", [24, 9, 9, 10, 11, 10, 10, 10, 8].map(|w| "-".repeat(w)).join("|"));
}

/// `clients` concurrent clients creating endpoints named `{prefix}{n}` until `limit`
/// creates were handed out or `secs` passed, whichever comes first.
async fn load(
    cluster: &Cluster,
    setup: &str,
    target: Target,
    clients: usize,
    secs: f64,
    limit: usize,
    prefix: &str,
) -> Row {
    let leader = cluster.wait_leader(Duration::from_secs(15)).await;
    let urls: Vec<String> = match target {
        Target::Spread => cluster.urls(),
        Target::Leader => vec![cluster.url(leader)],
    };
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|k| {
            let mut client = client_for(cluster.dialer(), &urls[k % urls.len()]);
            let next = next.clone();
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0usize;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= limit || Instant::now() >= end {
                        break;
                    }
                    let req = create_endpoint_request(&format!("{prefix}{n}"), "h1", "net");
                    let t = Instant::now();
                    match timed(client.create_endpoint(req)).await {
                        Ok(_) => latencies.push(t.elapsed()),
                        Err(e) => {
                            errors += 1;
                            if errors <= 3 {
                                eprintln!("create {prefix}{n}: {e:?}");
                            }
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Row {
        setup: setup.to_string(),
        target: match target {
            Target::Spread => "spread",
            Target::Leader => "leader",
        },
        clients,
        ok: latencies.len(),
        errors,
        secs: elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        max: latencies.last().copied().unwrap_or_default(),
    }
}

async fn prepare(cluster: &Cluster, subnet: &str) {
    cluster.wait_leader(Duration::from_secs(15)).await;
    cluster.register_host("h1", "192.0.2.1").await;
    cluster.create_network("net", subnet).await;
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn run() {
    let secs: f64 = env_or("BENCH_SECS", 5.0);
    let fill: usize = env_or("BENCH_ENDPOINTS", 100_000);
    // Liveness transitions would be writes too; keep them out.
    let quiet = ["--host-down-after-ms", "3600000"];
    let mut rows = Vec::new();

    println!("overlay-controller {} on loopback, {secs} s per row", common::BIN);
    // TLS (the default) and --insecure side by side, in the same run.
    let mut at_64 = Vec::new();
    for (setup, tls) in [("3 members", true), ("3 members --insecure", false)] {
        let three =
            if tls { Cluster::start(3, &quiet) } else { Cluster::start_insecure(3, &quiet) };
        // A /14: room for the rows above plus the memory run.
        prepare(&three, "10.64.0.0/14").await;
        for (clients, target) in
            [(1, Target::Spread), (16, Target::Spread), (64, Target::Spread), (64, Target::Leader)]
        {
            let prefix = format!("r{clients}{}-", rows.len());
            let row = load(&three, setup, target, clients, secs, usize::MAX, &prefix).await;
            if clients == 64 && target == Target::Spread {
                at_64.push(row.rate());
            }
            rows.push(row);
        }
        drop(three);
    }

    // A fresh cluster filled to `fill` endpoints as fast as 64 clients go; then memory.
    let three = Cluster::start(3, &quiet);
    prepare(&three, "10.64.0.0/14").await;
    let setup = format!("3 members, 0→{}k", fill / 1000);
    let fill_row = load(&three, &setup, Target::Leader, 64, 3600.0, fill, "fill-").await;
    let view = three.wait_converged(Duration::from_secs(60)).await;
    let leader = three.wait_leader(Duration::from_secs(15)).await;
    let follower = three.ids().into_iter().find(|&id| id != leader).expect("a follower");
    let held = three.endpoints(leader).await.endpoints.len();
    let memory: Vec<(String, u64, u64)> = [(leader, "leader"), (follower, "follower")]
        .iter()
        .map(|&(id, role)| {
            let pid = three.member(id).pid().expect("running");
            let kib = |key| proc_status_kib(pid, key).unwrap_or(0);
            (format!("{role} (member {id})"), kib("VmRSS:"), kib("VmHWM:"))
        })
        .collect();
    let data_dir_bytes = dir_size(three.data_dir());
    drop(three);

    let one = Cluster::start(1, &quiet);
    prepare(&one, "10.64.0.0/14").await;
    for clients in [1, 64] {
        let prefix = format!("s{clients}-");
        rows.push(
            load(&one, "1 member (baseline)", Target::Leader, clients, secs, usize::MAX, &prefix)
                .await,
        );
    }
    drop(one);

    println!();
    header();
    for row in &rows {
        row.print();
    }
    fill_row.print();
    if let [tls, plain] = at_64[..] {
        println!();
        println!("TLS / --insecure, 64 clients spread: {:.2}", tls / plain.max(f64::MIN_POSITIVE));
    }
    println!();
    println!(
        "memory holding {held} endpoints (revision {}, snapshot index {}):",
        view.revision, view.snapshot_index
    );
    for (who, rss, hwm) in memory {
        println!(
            "  {who:<20} VmRSS {:>7.1} MiB   VmHWM {:>7.1} MiB",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
    println!("  data dirs of all 3 members: {:.1} MiB on disk", data_dir_bytes as f64 / 1048576.0);
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`).
fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    line.split_whitespace().next()?.parse().ok()
}

fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(run());
}
