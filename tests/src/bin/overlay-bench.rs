//! `overlay-bench [--hosts N] [--endpoints N] [--remote N] [--scale-endpoints N]
//! [--rounds N]`: data-plane benchmark on a throwaway lab (see `bench/dataplane.sh`).
//! Needs root, iperf3 and ping. Prints a table:
//!
//! 1. iperf3 TCP throughput endpoint-to-endpoint across hosts (overlay), host-to-host
//!    over the bare underlay, and endpoint-to-endpoint over the kernel's bare VXLAN +
//!    bridge + veth path with no netfilter at all (the baseline: two more "hosts" on the
//!    same underlay switch, set up by hand with `ip`, no agent, no nftables table and
//!    `net.bridge.bridge-nf-call-*` off in their namespaces; same MTU as the overlay),
//!    alternated `--rounds` times (5 s each, default 5) so all see the same machine load;
//!    medians, the ratios of the medians (overlay/underlay, overlay/baseline), and the
//!    same ratios of bits per CPU second of the iperf3 processes (robust to other load).
//!    Where the kernel has br_netfilter (`net.bridge.bridge-nf-call-iptables` exists in
//!    the hosts' namespaces: built in, or loaded by Docker), the overlay is also measured
//!    with it switched off in h1 and h2 for that run (as on a host that never loads it):
//!    the agent keeps bridged frames out of conntrack, but only that switch keeps them
//!    out of the inet hooks altogether.
//! 2. Convergence, for `--endpoints` endpoints (default 100) created one after another
//!    round-robin over the hosts: from `endpoint create --no-wait` returning (the
//!    commit; a plain create now returns once the endpoint is ready) until the new
//!    endpoint answers pings from a probe endpoint on *every other* host (the slowest
//!    host counts). Two kinds of probe per host, both pinging every 10 ms from the
//!    moment create returns:
//!    * "ready": the probe namespace's ARP retransmit time is 10 ms, so an ARP request
//!      sent before the host had the new endpoint's entries is repeated at once: this
//!      measures when the data plane is programmed;
//!    * "client": default kernel settings (ARP retried after 1 s), what a container
//!      that talks to the new endpoint right away sees.
//!
//!    Endpoints slower than 300 ms by either probe are listed on stderr, per host.
//! 3. `--remote` endpoints (default 10,000) on fake hosts (`overlayctl host add`, no
//!    agent) in the same network, created while every agent is stopped. Then on host 1:
//!    * catch-up: its agent restarts and replays the missed changes, until `bridge
//!      fdb` and `ip neigh` on its vxlan device list every remote endpoint;
//!    * programming rate: agent stopped again, its vxlan device deleted (taking every
//!      entry with it), agent started with its persisted catalog (nothing to replay):
//!      one reconcile pass recreates everything; entries/s from that;
//!    * the agent's VmRSS/VmHWM and CPU once all entries are in place.
//! 4. The other agents start with no persisted state (a snapshot from the controller),
//!    and convergence is measured again for `--scale-endpoints` endpoints (default 20)
//!    with the remote endpoints in the network.
//!
//! `--remote 0` skips 3 and 4, `--endpoints 0` skips 2. Not run in CI. Everything lives
//! in the lab's namespaces and is removed on exit.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use overlay_tests::bench::{arg, check_flags, gbit, iperf3_tcp_cpu, loadavg, median, pct, Iperf};
use overlay_tests::lab::{run, run_ok, Lab, UNDERLAY_PREFIX};

const NET: &str = "bench";
const SUBNET: &str = "10.77.0.0/16";
/// Fake hosts carry the remote endpoints (addresses inside the lab's underlay that
/// nobody holds: nothing is ever sent there except VXLAN frames nobody asks for).
const FAKES: usize = 20;
const FAKE_BASE: usize = 100;

struct Opts {
    hosts: usize,
    endpoints: usize,
    remote: usize,
    rounds: usize,
    scale_endpoints: usize,
}

/// `(metric, value)` lines of the table.
type Rows = Vec<(String, String)>;
/// A probe endpoint: `(name, address)`.
type Probe = (String, String);

/// `nsenter --net=NS ARGS` (lighter than `ip netns exec`: no mount namespace).
fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{ns}")).arg("--").args(args);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// VNI, endpoint subnet and endpoint MACs of the baseline path.
const BARE_VNI: &str = "99";
const BARE_IPS: [&str; 2] = ["10.99.0.1", "10.99.0.2"];
const BARE_MACS: [&str; 2] = ["02:99:00:00:00:01", "02:99:00:00:00:02"];
/// Underlay addresses of the two baseline hosts (on the lab's switch, unused by it).
const BARE_HOSTS: [usize; 2] = [211, 212];

/// The kernel's bare VXLAN + bridge + veth path between two endpoint namespaces, as
/// the agent builds it (VXLAN with `nolearning` and static FDB entries, a bridge, a veth
/// at the network's MTU) but by hand and without any netfilter: no nftables table, and
/// br_netfilter switched off in the two host namespaces. Returns the (server, client)
/// endpoint probes. Everything is named after the lab, so dropping the lab removes it.
fn bare_path(lab: &Lab, mtu: &str) -> Result<(Probe, Probe)> {
    let sw = lab.switch_ns();
    let ul = |i: usize| format!("{UNDERLAY_PREFIX}.{}", BARE_HOSTS[i]);
    for i in 0..2 {
        let (h, e) = (format!("{}b{}", lab.id, i + 1), format!("{}be{}", lab.id, i + 1));
        let port = format!("pb{}", i + 1);
        let cmds: Vec<Vec<String>> = [
            format!("ip netns add {h}"),
            format!("ip netns add {e}"),
            format!("ip link add ul0 netns {h} type veth peer name {port} netns {sw}"),
            format!("ip -n {sw} link set {port} master sw0 up"),
            format!("ip -n {h} addr add {}/24 dev ul0", ul(i)),
            format!("ip -n {h} link set ul0 up"),
            format!("ip -n {h} link set lo up"),
            format!("ip -n {h} link add br0 mtu {mtu} type bridge"),
            format!("ip -n {h} link set br0 up"),
            format!(
                "ip -n {h} link add vx0 mtu {mtu} type vxlan id {BARE_VNI} local {} dstport 4789 nolearning",
                ul(i)
            ),
            format!("ip -n {h} link set vx0 master br0 up"),
            format!("bridge -n {h} fdb append 00:00:00:00:00:00 dev vx0 dst {}", ul(1 - i)),
            format!("bridge -n {h} fdb append {} dev vx0 dst {}", BARE_MACS[1 - i], ul(1 - i)),
            format!("ip link add ve0 netns {h} mtu {mtu} type veth peer name eth0 netns {e}"),
            format!("ip -n {h} link set ve0 master br0 up"),
            format!("ip -n {e} link set eth0 address {} mtu {mtu} up", BARE_MACS[i]),
            format!("ip -n {e} addr add {}/24 dev eth0", BARE_IPS[i]),
            format!("ip -n {e} link set lo up"),
        ]
        .iter()
        .map(|c| c.split_whitespace().map(str::to_string).collect())
        .collect();
        for c in cmds {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            run_ok(&args)?;
        }
        // No netfilter at all: the namespace-wide switches too (where the kernel has them).
        for table in ["iptables", "ip6tables", "arptables"] {
            let key = format!("net.bridge.bridge-nf-call-{table}=0");
            let _ = in_ns(&h, &["sysctl", "-q", "-w", &key]).status();
        }
    }
    let (server, client) = (
        (format!("{}be2", lab.id), BARE_IPS[1].to_string()),
        (format!("{}be1", lab.id), BARE_IPS[0].to_string()),
    );
    lab.ping_ok(&client.0, &server.1, Duration::from_secs(20))?;
    Ok((server, client))
}

/// `net.bridge.bridge-nf-call-iptables` of namespace `ns` (`None`: no br_netfilter).
fn brnf(ns: &str) -> Option<String> {
    let out =
        run(&["ip", "netns", "exec", ns, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables"]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Sets the three `net.bridge.bridge-nf-call-*` switches of `ns` to `value`.
fn set_brnf(ns: &str, value: &str) -> Result<()> {
    for table in ["iptables", "ip6tables", "arptables"] {
        let key = format!("net.bridge.bridge-nf-call-{table}={value}");
        run_ok(&["ip", "netns", "exec", ns, "sysctl", "-q", "-w", &key])?;
    }
    Ok(())
}

/// The overlay run again with br_netfilter off in h1 and h2, restored afterwards.
fn overlay_without_brnf(lab: &Lab, clients: &[Probe], was: &str) -> Result<Iperf> {
    let hosts = [lab.host_ns(1), lab.host_ns(2)];
    for h in &hosts {
        set_brnf(h, "0")?;
    }
    let r = iperf3_tcp_cpu(&lab.dir, &clients[1].0, &clients[0].0, &clients[1].1, 5);
    for h in &hosts {
        set_brnf(h, was)?;
    }
    r
}

/// Medians and ratios of `rounds` alternated runs of the paths.
fn throughput(lab: &Lab, clients: &[Probe], rounds: usize, rows: &mut Rows) -> Result<()> {
    let mtu = lab.ctl_json(&["network", "inspect", NET])?["mtu"].to_string();
    let (bare_server, bare_client) = bare_path(lab, &mtu)?;
    let brnf_was = brnf(&lab.host_ns(1));
    let (mut over, mut under, mut bare, mut off) = (vec![], vec![], vec![], vec![]);
    let (mut ratios, mut per_cpu, mut bare_ratios, mut bare_per_cpu) =
        (vec![], vec![], vec![], vec![]);
    let (mut off_ratios, mut off_per_cpu) = (vec![], vec![]);
    for r in 0..rounds {
        let o = iperf3_tcp_cpu(&lab.dir, &clients[1].0, &clients[0].0, &clients[1].1, 5)?;
        let u = iperf3_tcp_cpu(&lab.dir, &lab.host_ns(2), &lab.host_ns(1), &Lab::host_ip(2), 5)?;
        let k = iperf3_tcp_cpu(&lab.dir, &bare_server.0, &bare_client.0, &bare_server.1, 5)?;
        let per = |x: &Iperf| x.bps / x.cpu_s;
        eprintln!(
            "  round {}: overlay {} ({:.1} CPU s), underlay {} ({:.1} CPU s), baseline {} ({:.1} CPU s): overlay/underlay {:.2} (per CPU s {:.2}), overlay/baseline {:.2} (per CPU s {:.2})",
            r + 1,
            gbit(o.bps),
            o.cpu_s,
            gbit(u.bps),
            u.cpu_s,
            gbit(k.bps),
            k.cpu_s,
            o.bps / u.bps,
            per(&o) / per(&u),
            o.bps / k.bps,
            per(&o) / per(&k),
        );
        over.push(o.bps);
        under.push(u.bps);
        bare.push(k.bps);
        ratios.push(o.bps / u.bps);
        per_cpu.push(per(&o) / per(&u));
        bare_ratios.push(o.bps / k.bps);
        bare_per_cpu.push(per(&o) / per(&k));
        if let Some(was) = &brnf_was {
            let n = overlay_without_brnf(lab, clients, was)?;
            eprintln!(
                "  round {}: overlay with br_netfilter off {} ({:.1} CPU s): / baseline {:.2} (per CPU s {:.2})",
                r + 1,
                gbit(n.bps),
                n.cpu_s,
                n.bps / k.bps,
                per(&n) / per(&k),
            );
            off.push(n.bps);
            off_ratios.push(n.bps / k.bps);
            off_per_cpu.push(per(&n) / per(&k));
        }
    }
    let (o, u, k) = (median(&over), median(&under), median(&bare));
    ratios.sort_by(f64::total_cmp);
    bare_ratios.sort_by(f64::total_cmp);
    let span = |v: &[f64]| format!("{:.2}..{:.2}", v[0], v[v.len() - 1]);
    rows.push((
        format!("iperf3 TCP endpoint h1 -> endpoint h2 (overlay), median of {rounds}"),
        gbit(o),
    ));
    rows.push((format!("iperf3 TCP host h1 -> host h2 (underlay), median of {rounds}"), gbit(u)));
    rows.push((
        format!("iperf3 TCP kernel VXLAN+bridge+veth, no netfilter (baseline), median of {rounds}"),
        gbit(k),
    ));
    rows.push((
        "overlay / underlay (ratio of medians; per-round min..max)".into(),
        format!("{:.2} ({})", o / u, span(&ratios)),
    ));
    rows.push((
        "overlay / underlay, bits per CPU second of iperf3 (median)".into(),
        format!("{:.2}", median(&per_cpu)),
    ));
    rows.push((
        "overlay / baseline (ratio of medians; per-round min..max)".into(),
        format!("{:.2} ({})", o / k, span(&bare_ratios)),
    ));
    rows.push((
        "overlay / baseline, bits per CPU second of iperf3 (median)".into(),
        format!("{:.2}", median(&bare_per_cpu)),
    ));
    if !off.is_empty() {
        off_ratios.sort_by(f64::total_cmp);
        rows.push((
            format!("iperf3 TCP overlay, br_netfilter off in h1/h2, median of {rounds}"),
            gbit(median(&off)),
        ));
        rows.push((
            "  ... / baseline (ratio of medians; per-round min..max)".into(),
            format!("{:.2} ({})", median(&off) / k, span(&off_ratios)),
        ));
        rows.push((
            "  ... / baseline, bits per CPU second of iperf3 (median)".into(),
            format!("{:.2}", median(&off_per_cpu)),
        ));
    }
    Ok(())
}

/// Pings `ip` from `ns` every 10 ms until one answer (at most 30 s from `t0`); when it
/// came, measured from `t0`. ping gives up early when the kernel reports the neighbour
/// unreachable (ARP failed); it is started again then.
fn ping_until_answered(ns: &str, ip: &str, t0: Instant) -> Option<Duration> {
    let limit = Duration::from_secs(30);
    while t0.elapsed() < limit {
        let left = (limit - t0.elapsed()).as_secs().max(1).to_string();
        let ok = in_ns(ns, &["ping", "-n", "-q", "-c", "1", "-i", "0.01", "-w", &left, ip])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(t0.elapsed());
        }
    }
    None
}

/// When each of `probes` got an answer from `ip`, in order.
fn answered(probes: &[&String], ip: &str, t0: Instant) -> Option<Vec<Duration>> {
    std::thread::scope(|s| {
        let handles: Vec<_> =
            probes.iter().map(|p| s.spawn(move || ping_until_answered(p, ip, t0))).collect();
        handles.into_iter().map(|h| h.join().ok().flatten()).collect::<Option<Vec<_>>>()
    })
}

/// Wall-clock time of day (UTC) `ago` before now, `HH:MM:SS.mmm`, to find an event in
/// the agents' logs.
fn utc_time_of_day(ago: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(ago);
    let ms = now.as_millis() % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
}

/// Creates endpoints `e<first>`… (`n` of them), each timed as described at the top.
/// Endpoints that took more than 300 ms to be ready are listed on stderr, with when
/// each host could reach them.
fn convergence(
    lab: &Lab,
    (clients, readies): (&[Probe], &[Probe]),
    (first, n): (usize, usize),
    context: &str,
    rows: &mut Rows,
) -> Result<()> {
    let hosts = lab.hosts;
    let (mut ready, mut client) = (vec![], vec![]);
    let fulls = arp_table_fulls();
    for k in first..first + n {
        let h = k % hosts + 1;
        let ip = format!("10.77.{}.{}", 2 + k / 250, 1 + k % 250);
        let name = lab.ep(&format!("e{k}"));
        // Probes on the other hosts, with their host numbers.
        let others = |v: &'_ [Probe]| -> Vec<(usize, String)> {
            (1..=hosts).filter(|&i| i != h).map(|i| (i, v[i - 1].0.clone())).collect()
        };
        let (cs, rs) = (others(clients), others(readies));
        let host = Lab::host_name(h);
        // From the commit (`--no-wait`), as before create waited for `ready`: the figure
        // is the data plane's, and compares with earlier runs.
        let args = ["endpoint", "create", &name, "--host", &host, "--network", NET, "--ip", &ip];
        lab.ctl_ok(&[&args[..], &["--no-wait"]].concat())?;
        let t0 = Instant::now();
        let names =
            |v: &[(usize, String)]| -> Vec<String> { v.iter().map(|(_, n)| n.clone()).collect() };
        let (rn, cn) = (names(&rs), names(&cs));
        let (r, c) = std::thread::scope(|s| {
            let r = s.spawn(|| answered(&rn.iter().collect::<Vec<_>>(), &ip, t0));
            let c = s.spawn(|| answered(&cn.iter().collect::<Vec<_>>(), &ip, t0));
            (r.join().ok().flatten(), c.join().ok().flatten())
        });
        let (Some(r), Some(c)) = (r, c) else {
            bail!("{name} on h{h} not answering every other host within 30 s");
        };
        let (r_max, c_max) = (
            r.iter().max().copied().unwrap_or_default(),
            c.iter().max().copied().unwrap_or_default(),
        );
        if r_max.max(c_max) > Duration::from_millis(300) {
            let per_host = |v: &[(usize, String)], d: &[Duration]| -> String {
                let each = v.iter().zip(d).map(|((i, _), d)| format!("h{i} {}", d.as_millis()));
                each.collect::<Vec<_>>().join(", ")
            };
            eprintln!(
                "  slow: {name} on h{h}, created {} UTC: ready after {r_max:?} (ms: {}), client after {c_max:?} (ms: {})",
                utc_time_of_day(t0.elapsed()),
                per_host(&rs, &r),
                per_host(&cs, &c)
            );
        }
        // Forget the learned neighbours the pings made: the kernel's ARP table is one
        // for all namespaces (gc_thresh3 = 1024 by default), and a full one stalls every
        // new resolution for seconds, which would be measured as slow convergence.
        for ns in rn.iter().chain(&cn).chain([&name]) {
            let _ = in_ns(ns, &["ip", "neigh", "flush", "dev", "eth0"]).status();
        }
        ready.push(r_max.as_secs_f64() * 1000.0);
        client.push(c_max.as_secs_f64() * 1000.0);
        if (k + 1 - first) % 10 == 0 {
            eprintln!("  {} endpoints; last: ready {r_max:?}, client {c_max:?}", k + 1 - first);
        }
    }
    for (label, v) in [("ready", &mut ready), ("client", &mut client)] {
        v.sort_by(f64::total_cmp);
        rows.push((
            format!("create -> pingable from all other hosts ({label}), {n} eps / {hosts} hosts{context}"),
            format!(
                "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                pct(v, 50.0),
                pct(v, 99.0),
                v.last().copied().unwrap_or(f64::NAN)
            ),
        ));
    }
    rows.push((
        "  ... ARP table overflows meanwhile (machine-wide, /proc/net/stat/arp_cache)".into(),
        arp_table_fulls().saturating_sub(fulls).to_string(),
    ));
    Ok(())
}

/// How often, since boot, a neighbour could not be created because the kernel's ARP
/// table (shared by every namespace) was full.
fn arp_table_fulls() -> u64 {
    let text = std::fs::read_to_string("/proc/net/stat/arp_cache").unwrap_or_default();
    let mut lines = text.lines();
    let col = lines.next().and_then(|h| h.split_whitespace().position(|c| c == "table_fulls"));
    let Some(col) = col else { return 0 };
    lines.filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(col)?, 16).ok()).sum()
}

/// Entries on host `h`'s `dev` for remote endpoints: (unicast FDB entries towards a
/// fake host, permanent neighbours in the remote endpoints' range 10.77.100.0–139.255).
fn remote_entries(lab: &Lab, h: usize, dev: &str) -> (usize, usize) {
    let fakes: Vec<String> =
        (0..FAKES).map(|f| format!("{UNDERLAY_PREFIX}.{}", FAKE_BASE + f)).collect();
    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        run_ok(args)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    };
    let ns = lab.host_ns(h);
    let fdb = json(&["bridge", "-j", "-n", &ns, "fdb", "show", "dev", dev])
        .iter()
        .filter(|e| {
            e["dst"].as_str().is_some_and(|d| fakes.iter().any(|f| f == d))
                && e["mac"] != "00:00:00:00:00:00"
        })
        .count();
    let neigh = json(&["ip", "-j", "-n", &ns, "neigh", "show", "dev", dev, "nud", "permanent"])
        .iter()
        .filter(|e| {
            e["dst"].as_str().and_then(|d| d.parse::<std::net::Ipv4Addr>().ok()).is_some_and(|ip| {
                let o = ip.octets();
                o[0] == 10 && o[1] == 77 && (100..140).contains(&o[2])
            })
        })
        .count();
    (fdb, neigh)
}

/// Polls until host `h` has `n` remote FDB entries and neighbours: (time to all FDB
/// entries, time to everything), from `t0`; `None` for what did not complete within
/// `limit`. Polls every 200 ms, or every 2 % of the time so far when that is longer
/// (a dump of 20,000 entries is not free).
fn wait_entries(
    lab: &Lab,
    h: usize,
    dev: &str,
    n: usize,
    t0: Instant,
    limit: Duration,
) -> (Option<Duration>, Option<Duration>) {
    let mut fdb_done = None;
    let mut last_report = Instant::now();
    while t0.elapsed() < limit {
        let (fdb, neigh) = remote_entries(lab, h, dev);
        if fdb >= n && fdb_done.is_none() {
            fdb_done = Some(t0.elapsed());
        }
        if fdb >= n && neigh >= n {
            return (fdb_done, Some(t0.elapsed()));
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("  h{h} {:.0} s: {fdb} fdb, {neigh} neighbours", t0.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200).max(t0.elapsed() / 50));
    }
    (fdb_done, None)
}

/// `(VmRSS, VmHWM)` in KiB of `pid`, which must be an `overlay-agent`.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
    if comm.trim() != "overlay-agent" {
        bail!("pid {pid} is {comm:?}, not the agent");
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        s.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
    };
    Ok((field("VmRSS:").context("VmRSS")?, field("VmHWM:").context("VmHWM")?))
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn secs(d: Option<Duration>, limit: Duration) -> String {
    d.map_or(format!("not done in {:.0} s", limit.as_secs_f64()), |d| {
        format!("{:.1} s", d.as_secs_f64())
    })
}

fn rate(n: usize, d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.0}/s", n as f64 / d.as_secs_f64()))
}

/// Part 3; returns the vxlan device's name.
fn remote(lab: &mut Lab, n: usize, rows: &mut Rows) -> Result<String> {
    let vni = lab.ctl_json(&["network", "inspect", NET])?["vni"].as_u64().context("vni")?;
    let dev = format!("ovx-{vni}");
    let rss_before = memory_kib(lab.agent_pid(1).context("agent 1 is not running")?)?.0;
    for f in 0..FAKES {
        let ip = format!("{UNDERLAY_PREFIX}.{}", FAKE_BASE + f);
        lab.ctl_ok(&["host", "add", &format!("fake{f}"), "--underlay-ip", &ip])?;
    }
    // Every agent stopped: the creates and host 1's catch-up compete with no agent.
    for h in 1..=lab.hosts {
        lab.stop_agent(h);
    }
    let t_create = Instant::now();
    let next = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= n {
                    return;
                }
                let ip = format!("10.77.{}.{}", 100 + k / 250, 1 + k % 250);
                let name = lab.ep(&format!("r{k}"));
                let host = format!("fake{}", k % FAKES);
                // Fake hosts run no agent: nothing would ever report these ready.
                let args = [
                    "endpoint",
                    "create",
                    &name,
                    "--host",
                    &host,
                    "--network",
                    NET,
                    "--ip",
                    &ip,
                    "--no-wait",
                ];
                if let Err(e) = lab.ctl_ok(&args) {
                    if errors.fetch_add(1, Ordering::SeqCst) < 5 {
                        eprintln!("{e:#}");
                    }
                }
            });
        }
    });
    let create = t_create.elapsed();
    let errors = errors.load(Ordering::SeqCst);
    if errors > 0 {
        bail!("{errors} of {n} endpoint creates failed");
    }
    rows.push((
        format!("controller: {n} endpoint creates, 16 overlayctl clients, no agent running"),
        format!("{:.0}/s", n as f64 / create.as_secs_f64()),
    ));
    let limit = Duration::from_secs(1200);

    eprintln!("created {n} remote endpoints in {create:?}; agent h1 catches up (replay)");
    let t0 = Instant::now();
    lab.start_agent(1)?;
    let (fdb, all) = wait_entries(lab, 1, &dev, n, t0, limit);
    let replay_hwm = memory_kib(lab.agent_pid(1).context("agent 1 is not running")?)?.1;
    rows.push((
        format!("h1 agent restart -> {n} remote FDB entries (replaying {n} changes)"),
        format!("{} ({})", secs(fdb, limit), rate(n, fdb)),
    ));
    rows.push((
        "  ... and their neighbour entries too".into(),
        format!("{} ({})", secs(all, limit), rate(n, all)),
    ));
    rows.push(("  ... agent VmHWM (peak RSS) during that catch-up".into(), mib(replay_hwm)));
    if all.is_none() {
        bail!("h1 never caught up; stopping here");
    }

    eprintln!("agent h1: vxlan device deleted; one pass reprograms everything");
    lab.stop_agent(1);
    run_ok(&["ip", "-n", &lab.host_ns(1), "link", "del", &dev])?;
    let t0 = Instant::now();
    lab.start_agent(1)?;
    let (fdb, all) = wait_entries(lab, 1, &dev, n, t0, limit);
    rows.push((
        format!("h1 agent start, persisted catalog, no vxlan -> {n} FDB entries"),
        format!("{} ({})", secs(fdb, limit), rate(n, fdb)),
    ));
    rows.push((
        format!("  ... and {n} neighbours (FDB + neighbour entries/s)"),
        format!("{} ({})", secs(all, limit), rate(2 * n, all)),
    ));

    std::thread::sleep(Duration::from_secs(3));
    let pid = lab.agent_pid(1).context("agent 1 is not running")?;
    let cpu0 = cpu_seconds(pid);
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let cpu = cpu_seconds(pid).zip(cpu0).map(|(b, a)| (b - a) / window.as_secs_f64());
    let (rss, hwm) = memory_kib(pid)?;
    let (fdb, neigh) = remote_entries(lab, 1, &dev);
    rows.push(("agent h1 VmRSS before remote endpoints".into(), mib(rss_before)));
    rows.push((
        format!("agent h1 VmRSS with {n} remote endpoints ({fdb} fdb, {neigh} neigh present)"),
        mib(rss),
    ));
    rows.push(("agent h1 VmHWM (peak RSS since this start)".into(), mib(hwm)));
    rows.push((
        "agent h1 CPU, steady state (1 s reconcile interval)".into(),
        cpu.map_or("-".into(), |c| format!("{:.0} % of a core", c * 100.0)),
    ));
    Ok(dev)
}

/// Part 4: the other agents start without persisted state (a snapshot from the
/// controller, not a replay), then new endpoints are timed with the remote ones present.
fn at_scale(
    lab: &mut Lab,
    dev: &str,
    probes: (&[Probe], &[Probe]),
    (first, n): (usize, usize),
    remote: usize,
    rows: &mut Rows,
) -> Result<()> {
    let t0 = Instant::now();
    for h in 2..=lab.hosts {
        let _ = std::fs::remove_file(lab.agent_data_dir(h).join("desired.json"));
        lab.start_agent(h)?;
    }
    let limit = Duration::from_secs(1200);
    let mut slowest = Some(Duration::ZERO);
    for h in 2..=lab.hosts {
        let (_, all) = wait_entries(lab, h, dev, remote, t0, limit);
        slowest = slowest.zip(all).map(|(a, b)| a.max(b));
    }
    rows.push((
        format!("h2..h{} agents start with no state (snapshot) -> all entries", lab.hosts),
        format!("{} (slowest host)", secs(slowest, limit)),
    ));
    if slowest.is_none() {
        bail!("the other hosts never got every entry; stopping here");
    }
    let context = format!(", {remote} remote eps in the network");
    convergence(lab, probes, (first, n), &context, rows)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Probe endpoints on every host: `client` ones at 10.77.1.H (default settings) and
/// `ready` ones at 10.77.1.(100+H) with a 10 ms ARP retransmit time.
fn probes(lab: &Lab) -> Result<(Vec<Probe>, Vec<Probe>)> {
    let (mut clients, mut readies) = (vec![], vec![]);
    for h in 1..=lab.hosts {
        for (short, ip, list) in [
            (format!("p{h}"), format!("10.77.1.{h}"), &mut clients),
            (format!("q{h}"), format!("10.77.1.{}", 100 + h), &mut readies),
        ] {
            let name = lab.endpoint(&short, h, NET, &["--ip", &ip])?;
            list.push((name, ip));
        }
    }
    for (name, _) in &readies {
        let st = in_ns(name, &["sysctl", "-q", "-w", "net.ipv4.neigh.eth0.retrans_time_ms=10"])
            .status()?;
        if !st.success() {
            bail!("cannot set the ARP retransmit time in {name}");
        }
    }
    for (name, ip) in clients.iter().chain(&readies) {
        lab.ping_ok(name, &clients[0].1, Duration::from_secs(20))?;
        lab.ping_ok(&clients[0].0, ip, Duration::from_secs(20))?;
    }
    Ok((clients, readies))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    check_flags(&args, &["--hosts", "--endpoints", "--remote", "--scale-endpoints", "--rounds"])?;
    let o = Opts {
        hosts: arg(&args, "--hosts", 3)?,
        endpoints: arg(&args, "--endpoints", 100)?,
        remote: arg(&args, "--remote", 10_000)?,
        rounds: arg(&args, "--rounds", 5)?.max(1),
        scale_endpoints: arg(&args, "--scale-endpoints", 20)?,
    };
    if !overlay_tests::lab::can_run() {
        bail!("needs root, ip and nsenter");
    }
    let load_start = loadavg()?;
    let mut rows: Rows = vec![];
    let mut lab = Lab::start(o.hosts)?;
    eprintln!("lab {} up with {} hosts ({})", lab.id, o.hosts, lab.dir.display());
    lab.ctl_ok(&["network", "create", NET, "--subnet", SUBNET])?;
    let (clients, readies) = probes(&lab)?;

    let probes = (&clients[..], &readies[..]);
    eprintln!("1. throughput");
    throughput(&lab, &clients, o.rounds, &mut rows)?;
    if o.endpoints > 0 {
        eprintln!("2. convergence");
        convergence(&lab, probes, (0, o.endpoints), "", &mut rows)?;
    }
    if o.remote > 0 {
        eprintln!("3. {} remote endpoints", o.remote);
        let dev = remote(&mut lab, o.remote, &mut rows)?;
        if o.scale_endpoints > 0 {
            eprintln!("4. convergence with {} remote endpoints", o.remote);
            let eps = (o.endpoints, o.scale_endpoints);
            at_scale(&mut lab, &dev, probes, eps, o.remote, &mut rows)?;
        }
    }

    println!("overlay-bench {}", args.join(" "));
    println!(
        "{} cores; load average (1/5/15 min) at start {load_start}, at end {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()?
    );
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{:w$}  value", "metric");
    println!("{}  {}", "-".repeat(w), "-".repeat(30));
    for (k, v) in &rows {
        println!("{k:w$}  {v}");
    }
    drop(lab);
    Ok(())
}
