//! `overlay-bench [--hosts N] [--endpoints N] [--remote N]`: data-plane benchmark on a
//! throwaway lab (see `bench/dataplane.sh`). Needs root, iperf3 and ping. Prints a table:
//!
//! * iperf3 TCP throughput endpoint-to-endpoint across hosts (overlay) vs host-to-host
//!   over the bare underlay, and their ratio (5 s each);
//! * time from `endpoint create` returning until the new endpoint answers pings from an
//!   endpoint on every other host, p50/p99 over `--endpoints` endpoints spread over the
//!   hosts;
//! * FDB programming rate and agent RSS with `--remote` endpoints on fake hosts
//!   (`overlayctl host add`, no agent) in one network: created while host 1's agent is
//!   stopped, then the time from its start until `bridge fdb` on h1 lists them all.
//!
//! Not run in CI. Everything lives in the lab's namespaces and is removed on exit.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use overlay_tests::bench::{arg, gbit, iperf3_tcp, pct};
use overlay_tests::lab::{run_ok, wait_for, Lab};

const NET: &str = "bench";
const SUBNET: &str = "10.77.0.0/16";

fn ping1(ns: &str, ip: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "0.2", ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn fdb_remote_count(lab: &Lab, dev: &str, fake_prefix: &str) -> usize {
    let Ok(text) = run_ok(&["bridge", "-j", "-n", &lab.host_ns(1), "fdb", "show", "dev", dev])
    else {
        return 0;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return 0 };
    v.as_array().map_or(0, |a| {
        a.iter()
            .filter(|e| {
                e["dst"].as_str().is_some_and(|d| d.starts_with(fake_prefix))
                    && e["mac"] != "00:00:00:00:00:00"
            })
            .count()
    })
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hosts: usize = arg(&args, "--hosts", 3)?;
    let n_eps: usize = arg(&args, "--endpoints", 100)?;
    let n_remote: usize = arg(&args, "--remote", 10_000)?;
    if !overlay_tests::lab::can_run() {
        bail!("needs root, ip and nsenter");
    }
    let mut rows: Vec<(String, String)> = vec![];
    let mut lab = Lab::start(hosts)?;
    eprintln!("lab {} up with {hosts} hosts ({})", lab.id, lab.dir.display());
    lab.ctl_ok(&["network", "create", NET, "--subnet", SUBNET])?;
    // One probe endpoint per host, at 10.77.1.<host>.
    let mut probes = vec![];
    for h in 1..=hosts {
        let ip = format!("10.77.1.{h}");
        let name = lab.endpoint(&format!("p{h}"), h, NET, &["--ip", &ip])?;
        probes.push((name, ip));
    }
    for (name, _) in &probes[1..] {
        lab.ping_ok(&probes[0].0, &probes[1].1, Duration::from_secs(20))?;
        lab.ping_ok(name, &probes[0].1, Duration::from_secs(20))?;
    }

    // 1. Throughput.
    let overlay = iperf3_tcp(&lab.dir, &probes[1].0, &probes[0].0, &probes[1].1, 5)?;
    let underlay = iperf3_tcp(&lab.dir, &lab.host_ns(2), &lab.host_ns(1), &Lab::host_ip(2), 5)?;
    rows.push(("iperf3 TCP, endpoint h1 -> endpoint h2 (overlay)".into(), gbit(overlay)));
    rows.push(("iperf3 TCP, host h1 -> host h2 (underlay)".into(), gbit(underlay)));
    rows.push(("overlay / underlay".into(), format!("{:.2}", overlay / underlay)));

    // 2. Time to reachable from every other host.
    let mut times = vec![];
    for k in 0..n_eps {
        let h = k % hosts + 1;
        let ip = format!("10.77.{}.{}", 2 + k / 250, 1 + k % 250);
        let name = lab.ep(&format!("e{k}"));
        lab.ctl_ok(&[
            "endpoint",
            "create",
            &name,
            "--host",
            &Lab::host_name(h),
            "--network",
            NET,
            "--ip",
            &ip,
        ])?;
        let t0 = Instant::now();
        let others: Vec<&(String, String)> =
            probes.iter().enumerate().filter(|(i, _)| i + 1 != h).map(|(_, p)| p).collect();
        let worst = std::thread::scope(|s| {
            let handles: Vec<_> = others
                .iter()
                .map(|(probe, _)| {
                    let ip = ip.clone();
                    s.spawn(move || {
                        while t0.elapsed() < Duration::from_secs(30) {
                            if ping1(probe, &ip) {
                                return Some(t0.elapsed());
                            }
                        }
                        None
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().ok().flatten()).collect::<Option<Vec<_>>>()
        })
        .with_context(|| format!("{name} on h{h} not reachable from every host in 30 s"))?;
        let max = worst.into_iter().max().unwrap_or_default();
        times.push(max.as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    rows.push((
        format!("create -> pingable from all other hosts, {n_eps} eps / {hosts} hosts, p50"),
        format!("{:.0} ms", pct(&times, 50.0)),
    ));
    rows.push((format!("  ... p99 (max {:.0} ms)", times.last().copied().unwrap_or(0.0)), {
        format!("{:.0} ms", pct(&times, 99.0))
    }));

    // 3. Remote endpoints on fake hosts: FDB rate and agent RSS on h1.
    let vni = lab.ctl_json(&["network", "inspect", NET])?["vni"].as_u64().context("vni")?;
    let dev = format!("ovx-{vni}");
    let rss_before = lab.agent_pid(1).and_then(vm_rss_kib).unwrap_or(0);
    let fakes = 20usize;
    let fake_prefix = "192.168.217.1"; // 192.168.217.100..=119: nobody, inside the lab
    for f in 0..fakes {
        lab.ctl_ok(&[
            "host",
            "add",
            &format!("fake{f}"),
            "--underlay-ip",
            &format!("192.168.217.{}", 100 + f),
        ])?;
    }
    lab.stop_agent(1);
    let t_create = Instant::now();
    let next = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= n_remote {
                    return;
                }
                let ip = format!("10.77.{}.{}", 100 + k / 250, 1 + k % 250);
                let name = lab.ep(&format!("r{k}"));
                let host = format!("fake{}", k % fakes);
                let args =
                    ["endpoint", "create", &name, "--host", &host, "--network", NET, "--ip", &ip];
                if let Err(e) = lab.ctl_ok(&args) {
                    if errors.fetch_add(1, Ordering::SeqCst) < 5 {
                        eprintln!("{e:#}");
                    }
                }
            });
        }
    });
    let create_s = t_create.elapsed().as_secs_f64();
    let errors = errors.load(Ordering::SeqCst);
    if errors > 0 {
        bail!("{errors} of {n_remote} endpoint creates failed");
    }
    eprintln!("created {n_remote} remote endpoints in {create_s:.1} s; starting agent h1");
    let t0 = Instant::now();
    lab.start_agent(1)?;
    let mut last = 0;
    let full = wait_for(Duration::from_secs(600), "fdb entries for every remote endpoint", || {
        let n = fdb_remote_count(&lab, &dev, fake_prefix);
        if n / 1000 != last / 1000 {
            eprintln!("  {n} fdb entries after {:.1} s", t0.elapsed().as_secs_f64());
        }
        last = n;
        (n >= n_remote).then(|| t0.elapsed())
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let rss_after = lab.agent_pid(1).and_then(vm_rss_kib).unwrap_or(0);
    rows.push((
        format!("controller writes: {n_remote} endpoint creates, 16 clients"),
        format!("{:.0} /s", n_remote as f64 / create_s),
    ));
    rows.push((
        format!("agent start -> {n_remote} remote FDB entries on h1"),
        format!(
            "{:.1} s ({:.0} entries/s)",
            full.as_secs_f64(),
            n_remote as f64 / full.as_secs_f64()
        ),
    ));
    rows.push((
        "agent h1 VmRSS before remote endpoints".into(),
        format!("{:.1} MiB", rss_before as f64 / 1024.0),
    ));
    rows.push((
        format!("agent h1 VmRSS with {n_remote} remote endpoints"),
        format!("{:.1} MiB", rss_after as f64 / 1024.0),
    ));

    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{:w$}  value", "metric");
    println!("{}  {}", "-".repeat(w), "-".repeat(24));
    for (k, v) in &rows {
        println!("{k:w$}  {v}");
    }
    drop(lab);
    Ok(())
}
