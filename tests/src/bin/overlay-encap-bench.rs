//! `overlay-encap-bench [--time S] [--runs N] [--pings N] [--nebula-mtu N]`: the
//! encapsulation benchmark of issue 5 (see `bench/encap.sh`). Needs root, iperf3, ping
//! and Nebula (`nebula`, `nebula-cert`).
//!
//! On one throwaway 3-host lab it measures, between host 1 and host 2, in one run and
//! back to back:
//!
//! * the bare underlay (host namespace h1 -> h2 over the veth switch);
//! * kernel VXLAN, `--encap udp` and `--encap udp --encrypted`: one network each with an
//!   endpoint on h1 and one on h2, endpoint -> endpoint;
//! * Nebula run in the same two host namespaces (static host map, no lighthouse, a
//!   permissive firewall), tun address -> tun address.
//!
//! For each: single-stream iperf3 TCP throughput (median of `--runs`, modes interleaved
//! so slow drifts in machine load hit all of them alike) and ping RTT on the idle path.
//! It prints one table with the ratios to the underlay and to Nebula, the load average
//! before and after, and whether the aims (UDP mode >= 4 x Nebula, encrypted
//! mode >= 1.5 x Nebula) are met. A mode that cannot be set up or carries no traffic is
//! reported as an error in its row; the others are still measured.
//!
//! Not run in CI. Everything lives in the lab's namespaces; Nebula is killed and the
//! namespaces removed on exit, also on failure.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use overlay_tests::bench::{arg, check_flags, iperf3_tcp, loadavg, median, pct, ping_rtts};
use overlay_tests::lab::{run_ok, spawn_in, Lab};

const FLAGS: &[&str] = &["--time", "--runs", "--pings", "--nebula-mtu"];
/// The aims, as multiples of Nebula's throughput.
const AIMS: &[(&str, f64)] = &[(UDP, 4.0), (ENCRYPTED, 1.5)];
const UNDERLAY: &str = "underlay (veth)";
const VXLAN: &str = "VXLAN (kernel)";
const UDP: &str = "UDP mode";
const ENCRYPTED: &str = "encrypted mode";
const NEBULA: &str = "Nebula";
/// Nebula's overlay addresses: host i is `NEBULA_PREFIX.i`.
const NEBULA_PREFIX: &str = "10.99.0";
const NEBULA_PORT: u16 = 4242;
const REACH_TIMEOUT: Duration = Duration::from_secs(20);

/// Where one mode's traffic goes: from namespace `client` to `ip` in namespace `server`;
/// `dev` is the client's interface on that path (for its MTU).
struct Route {
    client: String,
    server: String,
    ip: String,
    dev: String,
}

/// One row of the table.
struct Mode {
    name: &'static str,
    route: Option<Route>,
    error: Option<String>,
    mtu: Option<u64>,
    bps: Vec<f64>,
    rtts: Vec<f64>,
}

impl Mode {
    fn new(name: &'static str, route: Result<Route>) -> Mode {
        let (route, error) = match route {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        Mode { name, route, error, mtu: None, bps: vec![], rtts: vec![] }
    }

    /// Set up and not failed since.
    fn live(&self) -> Option<&Route> {
        self.route.as_ref().filter(|_| self.error.is_none())
    }

    /// Median throughput, if measured.
    fn gbps(&self) -> Option<f64> {
        (self.error.is_none() && !self.bps.is_empty()).then(|| median(&self.bps) / 1e9)
    }
}

struct Options {
    secs: u32,
    runs: usize,
    pings: usize,
    nebula_mtu: u32,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: overlay-encap-bench [--time S] [--runs N] [--pings N] [--nebula-mtu N]");
        return Ok(());
    }
    check_flags(&args, FLAGS)?;
    let opts = Options {
        secs: arg(&args, "--time", 5)?,
        runs: arg(&args, "--runs", 1)?,
        pings: arg(&args, "--pings", 100)?,
        nebula_mtu: arg(&args, "--nebula-mtu", 1300)?,
    };
    if opts.secs == 0 || opts.runs == 0 || opts.pings == 0 {
        bail!("--time, --runs and --pings must be at least 1");
    }
    if !(576..=1440).contains(&opts.nebula_mtu) {
        bail!(
            "--nebula-mtu {} is out of range (576-1440 on a 1500-byte underlay)",
            opts.nebula_mtu
        );
    }
    if !overlay_tests::lab::can_run() {
        bail!("needs root, ip and nsenter");
    }
    for tool in ["iperf3", "ping", "nebula", "nebula-cert"] {
        run_ok(&["sh", "-c", &format!("command -v {tool}")])
            .with_context(|| format!("{tool} is not installed (bench/encap.sh installs it)"))?;
    }
    let load_before = loadavg()?;

    let lab = Lab::start(3)?;
    eprintln!("lab {} up ({})", lab.id, lab.dir.display());
    let mut modes = vec![Mode::new(
        UNDERLAY,
        Ok(Route {
            client: lab.host_ns(1),
            server: lab.host_ns(2),
            ip: Lab::host_ip(2),
            dev: "ul0".into(),
        }),
    )];
    let overlays: [(&'static str, &str, &str, &[&str]); 3] = [
        (VXLAN, "encv", "10.78.1", &[]),
        (UDP, "encu", "10.78.2", &["--encap", "udp"]),
        (ENCRYPTED, "encq", "10.78.3", &["--encap", "udp", "--encrypted"]),
    ];
    for (name, net, prefix, extra) in overlays {
        eprintln!("setting up {name}");
        modes.push(Mode::new(name, overlay_route(&lab, net, prefix, extra)));
    }
    eprintln!("setting up {NEBULA}");
    // Declared after `lab`, so dropped (Nebula killed) before the namespaces go.
    let mut nebula = Nebula { children: vec![], dir: lab.dir.join("nebula") };
    modes.push(Mode::new(NEBULA, nebula.start(&lab, opts.nebula_mtu)));
    for m in &mut modes {
        if let Some(r) = m.live() {
            let link = lab.ip_json(&r.client, &["link", "show", &r.dev]);
            m.mtu = link.ok().and_then(|v| v[0]["mtu"].as_u64());
        }
    }

    for run in 1..=opts.runs {
        for m in &mut modes {
            let Some(r) = m.live() else { continue };
            eprintln!("run {run}/{}: iperf3 {} ({} s)", opts.runs, m.name, opts.secs);
            match iperf3_tcp(&lab.dir, &r.server, &r.client, &r.ip, opts.secs) {
                Ok(bps) => m.bps.push(bps),
                Err(e) => m.error = Some(format!("iperf3: {e:#}")),
            }
        }
    }
    for m in &mut modes {
        let Some(r) = m.live() else { continue };
        eprintln!("ping {} ({} x 20 ms)", m.name, opts.pings);
        match ping_rtts(&r.client, &r.ip, opts.pings, Duration::from_millis(20)) {
            Ok(mut rtts) => {
                rtts.sort_by(f64::total_cmp);
                m.rtts = rtts;
            }
            Err(e) => m.error = Some(format!("ping: {e:#}")),
        }
    }
    let load_after = loadavg()?;
    drop(nebula);
    drop(lab);

    print!("{}", report(&modes, &opts, &load_before, &load_after));
    Ok(())
}

/// A network with one endpoint on h1 and one on h2 that answer each other's pings.
fn overlay_route(lab: &Lab, net: &str, prefix: &str, extra: &[&str]) -> Result<Route> {
    let subnet = format!("{prefix}.0/24");
    let mut args = vec!["network", "create", net, "--subnet", &subnet];
    args.extend_from_slice(extra);
    lab.ctl_ok(&args)?;
    let (ip1, ip2) = (format!("{prefix}.10"), format!("{prefix}.20"));
    let not_set_up = "the agent did not set up the endpoint";
    let a = lab.endpoint(&format!("{net}1"), 1, net, &["--ip", &ip1]).context(not_set_up)?;
    let b = lab.endpoint(&format!("{net}2"), 2, net, &["--ip", &ip2]).context(not_set_up)?;
    lab.ping_ok(&a, &ip2, REACH_TIMEOUT).context("the network carries no traffic")?;
    Ok(Route { client: a, server: b, ip: ip2, dev: "eth0".into() })
}

/// Nebula daemons in the lab's host namespaces h1 and h2; killed on drop.
struct Nebula {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Nebula {
    /// A CA, a certificate and a config per host, both daemons started, and h1 pinging h2
    /// over Nebula.
    fn start(&mut self, lab: &Lab, mtu: u32) -> Result<Route> {
        let version = run_ok(&["nebula", "-version"]).unwrap_or_default();
        eprintln!("nebula {}", version.trim());
        std::fs::create_dir_all(&self.dir)?;
        let ca_crt = path_str(&self.dir.join("ca.crt"))?;
        let ca_key = path_str(&self.dir.join("ca.key"))?;
        let name = format!("{}-ca", lab.id);
        run_ok(&["nebula-cert", "ca", "-name", &name, "-out-crt", &ca_crt, "-out-key", &ca_key])?;
        for (h, peer) in [(1, 2), (2, 1)] {
            let crt = path_str(&self.dir.join(format!("h{h}.crt")))?;
            let key = path_str(&self.dir.join(format!("h{h}.key")))?;
            let ip = format!("{NEBULA_PREFIX}.{h}/24");
            run_ok(&[
                "nebula-cert",
                "sign",
                "-ca-crt",
                &ca_crt,
                "-ca-key",
                &ca_key,
                "-name",
                &Lab::host_name(h),
                "-ip",
                &ip,
                "-out-crt",
                &crt,
                "-out-key",
                &key,
            ])?;
            // Unique per lab (and at most 14 bytes: `ovt` + pid + letter + `nb` + digit).
            let dev = format!("{}nb{h}", lab.id);
            let config = self.dir.join(format!("h{h}.yml"));
            std::fs::write(&config, nebula_config(&ca_crt, &crt, &key, peer, &dev, mtu))?;
            let log = self.dir.join(format!("h{h}.log"));
            let child = spawn_in(
                &lab.host_ns(h),
                Path::new("nebula"),
                &["-config".into(), path_str(&config)?],
                &log,
                false,
            )?;
            self.children.push(child);
        }
        let ip = format!("{NEBULA_PREFIX}.2");
        let from = lab.host_ns(1);
        let start = Instant::now();
        while !lab.ping(&from, &ip) {
            for (i, c) in self.children.iter_mut().enumerate() {
                if let Some(status) = c.try_wait()? {
                    bail!("nebula on h{} exited ({status}): {}", i + 1, self.log_tail(i + 1));
                }
            }
            if start.elapsed() > REACH_TIMEOUT {
                bail!("h1 cannot ping {ip} over Nebula: {}", self.log_tail(1));
            }
        }
        Ok(Route { client: from, server: lab.host_ns(2), ip, dev: format!("{}nb1", lab.id) })
    }

    fn log_tail(&self, h: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("h{h}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for Nebula {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Host `peer`'s Nebula address statically mapped to its underlay address; no
/// lighthouse, no hole punching, every packet allowed both ways.
fn nebula_config(ca: &str, crt: &str, key: &str, peer: usize, dev: &str, mtu: u32) -> String {
    let peer_vpn = format!("{NEBULA_PREFIX}.{peer}");
    let peer_underlay = Lab::host_ip(peer);
    format!(
        "pki:
  ca: {ca}
  cert: {crt}
  key: {key}
static_host_map:
  \"{peer_vpn}\": [\"{peer_underlay}:{NEBULA_PORT}\"]
lighthouse:
  am_lighthouse: false
  hosts: []
listen:
  host: 0.0.0.0
  port: {NEBULA_PORT}
punchy:
  punch: false
tun:
  disabled: false
  dev: {dev}
  mtu: {mtu}
logging:
  level: info
  format: text
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
"
    )
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The table, the errors, and the aims.
fn report(modes: &[Mode], opts: &Options, load_before: &str, load_after: &str) -> String {
    let gbps = |name: &str| modes.iter().find(|m| m.name == name).and_then(Mode::gbps);
    let underlay = gbps(UNDERLAY);
    let nebula = gbps(NEBULA);
    let ratio = |v: Option<f64>, base: Option<f64>| match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.3}", v / b),
        _ => "-".into(),
    };
    let ms = |v: f64| format!("{v:.3}");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "iperf3 single-stream TCP, {} s, median of {} run(s); ping {} x 20 ms on the idle \
         path; h1 -> h2 of a 3-host namespace lab, {} CPUs",
        opts.secs,
        opts.runs,
        opts.pings,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(out, "load average (1/5/15 min) before: {load_before}   after: {load_after}");
    let _ = writeln!(out);
    let head = [
        "mode",
        "MTU",
        "Gbit/s",
        "min-max",
        "x underlay",
        "x Nebula",
        "ping avg ms",
        "p99 ms",
        "max ms",
    ];
    let mut rows = vec![head.map(str::to_string).to_vec()];
    for m in modes {
        let g = m.gbps();
        let spread = if m.bps.is_empty() || g.is_none() {
            "-".into()
        } else {
            let lo = m.bps.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = m.bps.iter().copied().fold(0.0, f64::max);
            format!("{:.2}-{:.2}", lo / 1e9, hi / 1e9)
        };
        let rtt = |f: &dyn Fn(&[f64]) -> f64| {
            if m.rtts.is_empty() || m.error.is_some() {
                "-".into()
            } else {
                ms(f(&m.rtts))
            }
        };
        rows.push(vec![
            m.name.to_string(),
            m.mtu.map_or("-".into(), |v| v.to_string()),
            g.map_or("error".into(), |v| format!("{v:.2}")),
            spread,
            ratio(g, underlay),
            ratio(g, nebula),
            rtt(&|r| r.iter().sum::<f64>() / r.len() as f64),
            rtt(&|r| pct(r, 99.0)),
            rtt(&|r| pct(r, 100.0)),
        ]);
    }
    let widths: Vec<usize> =
        (0..head.len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for (i, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, w))| if c == 0 { format!("{v:w$}") } else { format!("{v:>w$}") })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            let _ = writeln!(out, "{}", rule.join("  "));
        }
    }
    let failed: Vec<&Mode> = modes.iter().filter(|m| m.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(out);
        for m in failed {
            let _ = writeln!(out, "error: {}: {}", m.name, m.error.as_deref().unwrap_or(""));
        }
    }
    let _ = writeln!(out);
    for (name, want) in AIMS {
        let verdict = match (gbps(name), nebula) {
            (Some(v), Some(n)) if n > 0.0 => {
                let x = v / n;
                let met = if x >= *want { "met" } else { "NOT met" };
                format!("{met} ({x:.2} x)")
            }
            (None, _) => format!("not measured ({name} failed)"),
            _ => "not measured (Nebula failed)".into(),
        };
        let _ = writeln!(out, "aim: {name} >= {want} x Nebula: {verdict}");
    }
    out
}
