//! UDP data plane benchmark (root; iperf3, ping): a two-host namespace lab, then
//! iperf3 TCP single stream and ping latency endpoint-to-endpoint over the engine,
//! next to the same on the bare veth underlay, printed as a table.
//!
//!     cargo bench -p overlay-udp --bench dataplane            # 5 s per iperf3 run
//!     OVU_BENCH_SECS=10 OVU_BENCH_QUEUES=1 cargo bench -p overlay-udp --bench dataplane

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::{Lab, NetSpec};

const NET: NetSpec = NetSpec { vni: 42, subnet: "10.99.0", encrypted: false };

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs an iperf3 server (one test) in `server_ns` and a client in `client_ns`;
/// returns received Gbit/s and the sender's retransmits.
fn iperf(
    lab: &Lab,
    server_ns: &str,
    client_ns: &str,
    to: Ipv4Addr,
    secs: u64,
) -> Result<(f64, u64)> {
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    let _server = Kill(server);
    std::thread::sleep(Duration::from_millis(300));
    let out =
        lab.exec(client_ns, &["iperf3", "-c", &to.to_string(), "-t", &secs.to_string(), "-J"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let end = &v["end"];
    let Some(bps) = end["sum_received"]["bits_per_second"].as_f64() else {
        bail!("iperf3 gave no result: {}", String::from_utf8_lossy(&out.stdout));
    };
    let retr = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps / 1e9, retr))
}

/// ping RTT (p50, p99, max) in microseconds, from per-packet times.
fn ping(lab: &Lab, ns: &str, to: Ipv4Addr) -> Result<(f64, f64, f64)> {
    let out = lab.exec(ns, &["ping", "-c", "200", "-i", "0.005", &to.to_string()])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.trim_end_matches(" ms").parse().ok())
        .map(|ms: f64| ms * 1e3)
        .collect();
    if rtts.is_empty() {
        bail!("no ping replies: {text}");
    }
    rtts.sort_by(f64::total_cmp);
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize];
    Ok((at(0.5), at(0.99), at(1.0)))
}

fn main() -> Result<()> {
    if !common::can_run() {
        println!("skipped: the data plane bench needs root and iproute2");
        return Ok(());
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; run with `cargo bench` for release numbers");
    }
    let secs = env_or("OVU_BENCH_SECS", 5);
    let queues = env_or("OVU_BENCH_QUEUES", 0) as usize;
    let lab = Lab::start(&[NET], queues)?;
    let u2 = Lab::underlay_ip(2);
    let (e1, e2) = (lab.ep_ns(1, NET.vni), lab.ep_ns(2, NET.vni));
    let (h1, h2) = (lab.host_ns(1), lab.host_ns(2));
    // Warm up ARP and the FDB.
    ping(&lab, &e1, lab.ep_ip(2, NET.vni))?;

    let (under_gbps, under_retr) = iperf(&lab, &h2, &h1, u2, secs)?;
    let (over_gbps, over_retr) = iperf(&lab, &e2, &e1, lab.ep_ip(2, NET.vni), secs)?;
    let under_rtt = ping(&lab, &h1, u2)?;
    let over_rtt = ping(&lab, &e1, lab.ep_ip(2, NET.vni))?;

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split(' ').next().unwrap_or("?").to_string();
    let queues = lab.engines[0].queues();
    println!("UDP data plane: {secs} s iperf3 TCP single stream, 200 pings at 5 ms, {queues} queue(s), load {load}");
    println!(
        "{:<28} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "path", "Gbit/s", "retr", "rtt p50", "rtt p99", "rtt max"
    );
    for (name, (g, r), (mn, avg, mx)) in [
        ("veth underlay (bare)", (under_gbps, under_retr), under_rtt),
        ("overlay-udp endpoint→endpoint", (over_gbps, over_retr), over_rtt),
    ] {
        println!("{name:<28} {g:>10.2} {r:>8} {mn:>8.0}µs {avg:>8.0}µs {mx:>8.0}µs");
    }
    println!("overlay / underlay throughput: {:.1} %", 100.0 * over_gbps / under_gbps.max(1e-9));
    let c = lab.engines[1].counters()[&NET.vni];
    println!("receiver counters: {c:?}");
    Ok(())
}
