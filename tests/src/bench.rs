//! Measuring helpers shared by the benchmark binaries (`overlay-bench`,
//! `overlay-encap-bench`): flag parsing, iperf3 and ping between two namespaces, and the
//! small statistics they report.
//!
//! Like the lab, these only ever send traffic between namespaces on this machine.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::lab::{run, run_ok};

/// The value after flag `name` in `args`, parsed, or `default` when the flag is absent.
pub fn arg<T>(args: &[String], name: &str, default: T) -> Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match args.iter().position(|a| a == name) {
        Some(i) => {
            let v = args.get(i + 1).with_context(|| format!("{name} needs a value"))?;
            v.parse().with_context(|| format!("{name} {v}"))
        }
        None => Ok(default),
    }
}

/// Fails naming the first argument that is neither one of `flags` nor a flag's value
/// (every flag takes one value).
pub fn check_flags(args: &[String], flags: &[&str]) -> Result<()> {
    let mut i = 0;
    while i < args.len() {
        if !flags.contains(&args[i].as_str()) {
            bail!("unknown argument {} (known: {})", args[i], flags.join(", "));
        }
        i += 2;
    }
    Ok(())
}

/// Single-stream iperf3 TCP for `secs` seconds: a one-off server in `server_ns` bound to
/// `ip`, the client in `client_ns`. Returns the received bits/s. The server's pid file
/// goes to `dir`.
pub fn iperf3_tcp(
    dir: &Path,
    server_ns: &str,
    client_ns: &str,
    ip: &str,
    secs: u32,
) -> Result<f64> {
    Ok(iperf3_tcp_cpu(dir, server_ns, client_ns, ip, secs)?.bps)
}

/// One iperf3 run's result.
#[derive(Debug, Clone, Copy)]
pub struct Iperf {
    /// Bits per second received.
    pub bps: f64,
    /// CPU seconds (user + system) used by the client and server processes together.
    /// Between namespaces on one machine most of the kernel's per-packet work (bridges,
    /// encapsulation) runs in their context, so bits per CPU second is what a path costs
    /// whatever else the machine is doing.
    pub cpu_s: f64,
}

/// [`iperf3_tcp`], with the CPU time the two iperf3 processes used.
pub fn iperf3_tcp_cpu(
    dir: &Path,
    server_ns: &str,
    client_ns: &str,
    ip: &str,
    secs: u32,
) -> Result<Iperf> {
    let duration = f64::from(secs);
    let pidfile = dir.join(format!("iperf-{server_ns}.pid"));
    let pid = pidfile.display().to_string();
    run_ok(&["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-D", "-B", ip, "-I", &pid])?;
    std::thread::sleep(Duration::from_millis(500));
    // `timeout` bounds a client whose path dies mid-test.
    let limit = (secs + 15).to_string();
    let secs = secs.to_string();
    let out = run(&[
        "timeout",
        &limit,
        "ip",
        "netns",
        "exec",
        client_ns,
        "iperf3",
        "-c",
        ip,
        "-t",
        &secs,
        "--connect-timeout",
        "3000",
        "-J",
    ]);
    // The one-off server exits after its test; make sure of it either way.
    if let Ok(p) = std::fs::read_to_string(&pidfile) {
        if let Ok(p) = p.trim().trim_end_matches('\0').parse::<i32>() {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: kill(2) on the server this function started (or a no-op if gone).
            unsafe {
                libc::kill(p, libc::SIGTERM);
            }
        }
        let _ = std::fs::remove_file(&pidfile);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 result: {}", v["error"]))?;
    let cpu = &v["end"]["cpu_utilization_percent"];
    let percent = cpu["host_total"].as_f64().unwrap_or(f64::NAN)
        + cpu["remote_total"].as_f64().unwrap_or(f64::NAN);
    Ok(Iperf { bps, cpu_s: percent / 100.0 * duration })
}

/// Round-trip times in ms of `count` pings from namespace `ns` to `ip`, `interval` apart
/// (answered ones only; an unanswered one is an error).
pub fn ping_rtts(ns: &str, ip: &str, count: usize, interval: Duration) -> Result<Vec<f64>> {
    let count_s = count.to_string();
    let interval_s = format!("{:.3}", interval.as_secs_f64());
    let out = run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "ping",
        "-n",
        "-c",
        &count_s,
        "-i",
        &interval_s,
        "-W",
        "1",
        ip,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("time=")))
        .filter_map(|t| t.parse().ok())
        .collect();
    if rtts.len() < count {
        bail!("{ns} -> {ip}: {} of {count} pings answered", rtts.len());
    }
    Ok(rtts)
}

/// The `p`th percentile (nearest rank) of an ascending slice; NaN when empty.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median of `v` (any order); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    pct(&s, 50.0)
}

/// `bps` as "N.NN Gbit/s".
pub fn gbit(bps: f64) -> String {
    format!("{:.2} Gbit/s", bps / 1e9)
}

/// This machine's load averages (1, 5, 15 min), from /proc/loadavg.
pub fn loadavg() -> Result<String> {
    let text = std::fs::read_to_string("/proc/loadavg").context("/proc/loadavg")?;
    let v: Vec<&str> = text.split_whitespace().take(3).collect();
    Ok(v.join(" "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags() {
        let a = s(&["--runs", "3", "--time", "2"]);
        assert_eq!(arg(&a, "--runs", 1usize).unwrap(), 3);
        assert_eq!(arg(&a, "--pings", 50usize).unwrap(), 50);
        assert!(arg::<usize>(&s(&["--runs"]), "--runs", 1).is_err());
        assert!(arg::<usize>(&s(&["--runs", "x"]), "--runs", 1).is_err());
        assert!(check_flags(&a, &["--runs", "--time"]).is_ok());
        let e = check_flags(&s(&["--rusn", "3"]), &["--runs"]).unwrap_err();
        assert!(e.to_string().contains("--rusn"), "{e}");
    }

    #[test]
    fn stats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 99.0), 99.0);
        assert_eq!(pct(&v, 0.0), 1.0);
        assert_eq!(gbit(1.5e9), "1.50 Gbit/s");
    }
}
