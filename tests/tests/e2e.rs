//! End-to-end: three hosts in network namespaces, three controllers, three agents, all
//! real processes; driven through `overlayctl`, checked with real ping/TCP and with the
//! kernel state as JSON. Needs root and `cargo build --workspace --bins`; skipped
//! without root.
//!
//! The cases share one lab (starting one takes seconds) and run in order (later cases
//! use endpoints made by earlier ones); each is isolated by `catch_unwind`, every wait
//! is bounded, and the test fails at the end listing every case that failed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use overlay_agent::desired::{bridge_name, tap_name, veth_name, vxlan_name};
use overlay_tests::lab::{in_netns, run, run_cases, run_ok, wait_for, Case, Lab, OUTSIDE_IP};

const T: Duration = Duration::from_secs(20);

/// Which data plane the networks of one run use: the suite runs once per variant, each
/// in its own lab (and test thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Kernel VXLAN (the default).
    Vxlan,
    /// `--encap udp`: TAP + the user-space UDP data plane.
    Udp,
    /// `--encap udp --encrypted`: frames as QUIC datagrams between authenticated hosts.
    Encrypted,
    /// frontend on UDP, backend encrypted, every other network VXLAN: hosts carry
    /// several kinds at once and the gateway routes between them.
    Mixed,
}

thread_local! {
    static VARIANT: Cell<Variant> = const { Cell::new(Variant::Vxlan) };
}

fn variant() -> Variant {
    VARIANT.with(Cell::get)
}

/// The `network create` flags of `network` in this run.
fn encap_flags(network: &str) -> &'static [&'static str] {
    const UDP: &[&str] = &["--encap", "udp"];
    const ENCRYPTED: &[&str] = &["--encap", "udp", "--encrypted"];
    match (variant(), network) {
        (Variant::Vxlan, _) => &[],
        (Variant::Udp, _) | (Variant::Mixed, "frontend") => UDP,
        (Variant::Encrypted, _) | (Variant::Mixed, "backend") => ENCRYPTED,
        (Variant::Mixed, _) => &[],
    }
}

/// The network's uplink is a TAP device of the user-space data plane.
fn is_tap(network: &str) -> bool {
    !encap_flags(network).is_empty()
}

/// underlay 1500 − 50 (VXLAN or UDP), − 100 encrypted.
fn expected_mtu(network: &str) -> u64 {
    if encap_flags(network).contains(&"--encrypted") {
        1400
    } else {
        1450
    }
}

/// `network create NAME --subnet SUBNET` with this run's encapsulation.
fn create_network(lab: &Lab, name: &str, subnet: &str, extra: &[&str]) -> Result<()> {
    let mut args = vec!["network", "create", name, "--subnet", subnet];
    args.extend_from_slice(extra);
    args.extend_from_slice(encap_flags(name));
    lab.ctl_ok(&args).map(drop)
}

/// The uplink device of `network` on a host.
fn uplink(lab: &Lab, network: &str) -> Result<String> {
    let vni = vni(lab, network)?;
    Ok(if is_tap(network) { tap_name(vni) } else { vxlan_name(vni) })
}

fn run_variant(v: Variant, cases: &[(&str, Case)]) {
    VARIANT.with(|c| c.set(v));
    eprintln!("=== variant {v:?}");
    run_cases(cases);
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn vni(lab: &Lab, network: &str) -> Result<u32> {
    let vni = lab.ctl_json(&["network", "inspect", network])?["vni"].as_u64().context("vni")?;
    u32::try_from(vni).context("vni out of range")
}

/// The README tutorial spread over three hosts: s1 (h1) and s2 (h2) on frontend, b1 (h2)
/// on backend, gw (h3) on both with routes each way; plus an unrelated network.
fn tutorial(lab: &mut Lab) -> Result<()> {
    create_network(lab, "frontend", "10.0.1.0/24", &[])?;
    create_network(lab, "backend", "10.0.2.0/24", &[])?;
    let s1 = lab.endpoint("s1", 1, "frontend", &[])?;
    let s2 = lab.endpoint("s2", 2, "frontend", &["--alias", "web"])?;
    let b1 = lab.endpoint("b1", 2, "backend", &[])?;
    let gw = lab.endpoint("gw", 3, "frontend", &[])?;
    lab.ctl_ok(&["network", "connect", "backend", &gw])?;
    lab.ctl_ok(&["route", "add", "frontend", "10.0.2.0/24", "--via", &gw])?;
    lab.ctl_ok(&["route", "add", "backend", "10.0.1.0/24", "--via", &gw])?;
    let (s1_ip, _) = lab.attachment(&s1, "frontend")?;
    let (s2_ip, _) = lab.attachment(&s2, "frontend")?;
    let (b1_ip, _) = lab.attachment(&b1, "backend")?;

    // Same network, different hosts, both ways.
    lab.ping_ok(&s1, &s2_ip, T)?;
    lab.ping_ok(&s2, &s1_ip, T)?;
    // The endpoint's MTU and default route.
    let eth0 = lab.ip_json(&s1, &["link", "show", "eth0"])?;
    ensure!(eth0[0]["mtu"] == expected_mtu("frontend"), "s1 eth0 mtu {}", eth0[0]["mtu"]);
    let default = lab.ip_json(&s1, &["route", "show", "default"])?;
    ensure!(default[0]["gateway"] == "10.0.1.1", "s1 default route {default}");

    // Through the gateway endpoint on the third host: one routed hop.
    wait_for(T, "gw to have eth1 and ip_forward", || {
        let f = lab.exec(&gw, &["sysctl", "-n", "net.ipv4.ip_forward"]);
        (stdout(&f).trim() == "1").then_some(())
    })?;
    wait_for(T, "s1 to reach b1 through gw", || {
        let o = lab.exec(&s1, &["ping", "-c", "1", "-W", "1", &b1_ip]);
        (o.status.success() && stdout(&o).contains("ttl=63")).then_some(())
    })?;
    // And the far side sees the request with TTL 63 too (its reply is routed back).
    let o = lab.exec(&b1, &["ping", "-c", "1", "-W", "2", &s1_ip]);
    ensure!(o.status.success() && stdout(&o).contains("ttl=63"), "b1 -> s1: {}", stdout(&o));

    // TCP across hosts.
    tcp_ok(lab, &s2, &s2_ip, &s1)?;

    // DNS at 127.0.0.11: name, alias, NAME.NETWORK; a name in no shared network is NXDOMAIN.
    let resolve = |from: &str, name: &str| {
        let o = lab.exec(from, &["dig", "+short", "+time=1", "+tries=2", "@127.0.0.11", name]);
        stdout(&o).trim().to_string()
    };
    wait_for(T, "s1 to resolve s2", || (resolve(&s1, &s2) == s2_ip).then_some(()))?;
    ensure!(resolve(&s1, "web") == s2_ip, "alias web");
    ensure!(resolve(&s1, &format!("{s2}.frontend")) == s2_ip, "NAME.NETWORK");
    let cat = fs_read(&format!("/etc/netns/{s1}/resolv.conf"))?;
    ensure!(cat.trim() == "nameserver 127.0.0.11", "resolv.conf: {cat}");

    // Isolation: a second network's endpoint can reach neither the same host's nor a
    // remote endpoint of frontend, and vice versa.
    create_network(lab, "other", "10.0.3.0/24", &[])?;
    let o1 = lab.endpoint("o1", 1, "other", &[])?;
    let (o1_ip, _) = lab.attachment(&o1, "other")?;
    ensure!(!lab.ping(&o1, &s1_ip), "other -> frontend on the same host must fail");
    ensure!(!lab.ping(&o1, &s2_ip), "other -> frontend on another host must fail");
    ensure!(!lab.ping(&s1, &o1_ip), "frontend -> other must fail");
    let o = lab.exec(&s1, &["dig", "+time=1", "+tries=2", "@127.0.0.11", &o1]);
    ensure!(stdout(&o).contains("status: NXDOMAIN"), "a name in no shared network: {}", stdout(&o));

    // network connect / disconnect: eth1 comes and goes.
    lab.ctl_ok(&["network", "connect", "other", &s2])?;
    wait_for(T, "s2 to get eth1", || lab.ip_json(&s2, &["addr", "show", "eth1"]).ok())?;
    lab.ping_ok(&s2, &o1_ip, T)?;
    lab.ctl_ok(&["network", "disconnect", "other", &s2])?;
    wait_for(T, "s2 to lose eth1", || {
        let links = lab.ip_json(&s2, &["link", "show"]).ok()?;
        (!links.as_array()?.iter().any(|l| l["ifname"] == "eth1")).then_some(())
    })?;
    lab.ping_ok(&s1, &s2_ip, T)?;
    Ok(())
}

fn fs_read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| path.to_string())
}

/// A TCP listener in `server_ns` at `ip`, a client in `client_ns` sending 4 MiB (more
/// than fits in one segment or window) that must all arrive.
fn tcp_ok(_lab: &Lab, server_ns: &str, ip: &str, client_ns: &str) -> Result<()> {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    const LEN: usize = 4 << 20;
    let addr: SocketAddr = format!("{ip}:5201").parse()?;
    let listener = in_netns(server_ns, || TcpListener::bind(addr))??;
    let server = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        loop {
            match conn.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    });
    let sent = in_netns(client_ns, || -> std::io::Result<()> {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        c.set_write_timeout(Some(Duration::from_secs(10)))?;
        c.write_all(&vec![7u8; LEN])?;
        c.shutdown(std::net::Shutdown::Write)
    })?;
    if let Err(e) = sent {
        // Unblock the accept so the server thread ends.
        let _ = in_netns(server_ns, || TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
        bail!("tcp client: {e}");
    }
    let got = server.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    ensure!(got == LEN, "tcp: received {got} of {LEN} bytes");
    Ok(())
}

/// An internal network works across hosts but reaches nothing outside.
fn internal_is_cut_off(lab: &mut Lab) -> Result<()> {
    create_network(lab, "vault", "10.0.4.0/24", &["--internal"])?;
    let v1 = lab.endpoint("v1", 1, "vault", &[])?;
    let v2 = lab.endpoint("v2", 2, "vault", &[])?;
    let (v2_ip, _) = lab.attachment(&v2, "vault")?;
    lab.ping_ok(&v1, &v2_ip, T)?;
    let routes = lab.ip_json(&v1, &["route", "show", "default"])?;
    ensure!(
        routes.as_array().is_some_and(|r| r.is_empty()),
        "internal endpoint has a default route: {routes}"
    );
    ensure!(!lab.ping(&v1, OUTSIDE_IP), "internal endpoint reached the outside");
    // Even with a default route forced by hand, the host forwards nothing out.
    let _ = run(&["ip", "-n", &v1, "route", "replace", "default", "via", "10.0.4.1"]);
    ensure!(!lab.ping(&v1, OUTSIDE_IP), "internal endpoint reached the outside via a manual route");
    // ... and the agent removes that route again.
    wait_for(T, "manual default route to be removed", || {
        let r = lab.ip_json(&v1, &["route", "show", "default"]).ok()?;
        r.as_array()?.is_empty().then_some(())
    })?;
    Ok(())
}

/// A non-internal network reaches the outside address (masqueraded behind its host).
fn egress(lab: &mut Lab) -> Result<()> {
    let s1 = lab.ep("s1");
    lab.ping_ok(&s1, OUTSIDE_IP, T)?;
    let s2 = lab.ep("s2");
    lab.ping_ok(&s2, OUTSIDE_IP, T)?;
    Ok(())
}

/// DF ping exactly at the network MTU passes; one byte more fails at the sender.
fn mtu_edge(lab: &mut Lab) -> Result<()> {
    let mtu = lab.ctl_json(&["network", "inspect", "frontend"])?["mtu"].as_u64().context("mtu")?;
    ensure!(mtu == expected_mtu("frontend"), "frontend mtu {mtu} (underlay 1500 - overhead)");
    let s1 = lab.ep("s1");
    let (s2_ip, _) = lab.attachment(&lab.ep("s2"), "frontend")?;
    let payload = (mtu - 28).to_string();
    let o = lab.exec(&s1, &["ping", "-M", "do", "-c", "1", "-W", "2", "-s", &payload, &s2_ip]);
    ensure!(o.status.success(), "DF ping of {mtu} bytes failed: {}", stdout(&o));
    let over = (mtu - 27).to_string();
    let o = lab.exec(&s1, &["ping", "-M", "do", "-c", "1", "-W", "2", "-s", &over, &s2_ip]);
    let text = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr)).to_lowercase();
    ensure!(
        !o.status.success() && text.contains("message too long"),
        "DF ping of {} bytes: {text}",
        mtu + 1
    );
    Ok(())
}

/// FDB entry (or TAP uplink), route and veth removed by hand come back within seconds.
fn drift_repair(lab: &mut Lab) -> Result<()> {
    let s1 = lab.ep("s1");
    let s2 = lab.ep("s2");
    let (s2_ip, s2_mac) = lab.attachment(&s2, "frontend")?;
    let h1 = lab.host_ns(1);
    if is_tap("frontend") {
        return tap_drift_repair(lab, &s1, &s2_ip);
    }
    let vxlan = uplink(lab, "frontend")?;
    run_ok(&["bridge", "-n", &h1, "fdb", "del", &s2_mac, "dev", &vxlan, "dst", &Lab::host_ip(2)])?;
    run_ok(&["ip", "-n", &s1, "route", "del", "default"])?;
    wait_for(T, "fdb entry and default route to come back", || {
        let fdb = run_ok(&["bridge", "-j", "-n", &h1, "fdb", "show", "dev", &vxlan]).ok()?;
        let fdb: serde_json::Value = serde_json::from_str(&fdb).ok()?;
        let back = fdb
            .as_array()?
            .iter()
            .any(|e| e["mac"] == s2_mac.as_str() && e["dst"] == Lab::host_ip(2).as_str());
        let r = lab.ip_json(&s1, &["route", "show", "default"]).ok()?;
        (back && !r.as_array()?.is_empty()).then_some(())
    })?;
    run_ok(&["ip", "-n", &h1, "link", "del", &veth_name(&s1, "eth0")])?;
    lab.wait_endpoint(&s1)?;
    lab.ping_ok(&s1, &s2_ip, T)?;
    // The bridge shortcut names the new veth; deleted by hand, it comes back.
    let chain = format!("chain {} {{", veth_name(&s1, "eth0"));
    let shortcut = || {
        let table =
            run_ok(&["ip", "netns", "exec", &h1, "nft", "list", "table", "netdev", "overlay"]);
        table.ok().filter(|t| t.contains(&chain) && t.contains(&format!("fwd to \"{vxlan}\"")))
    };
    wait_for(T, "the bridge shortcut to name s1's veth", shortcut)?;
    run_ok(&["ip", "netns", "exec", &h1, "nft", "delete", "table", "netdev", "overlay"])?;
    wait_for(T, "the bridge shortcut to come back", shortcut)?;
    lab.ping_ok(&s1, &s2_ip, T)?;
    Ok(())
}

/// The TAP unplugged from its bridge, then deleted, comes back; so does a route.
fn tap_drift_repair(lab: &mut Lab, s1: &str, s2_ip: &str) -> Result<()> {
    let h1 = lab.host_ns(1);
    let tap = uplink(lab, "frontend")?;
    run_ok(&["ip", "-n", &h1, "link", "set", &tap, "nomaster"])?;
    run_ok(&["ip", "-n", s1, "route", "del", "default"])?;
    wait_for(T, "the TAP back on its bridge and the default route back", || {
        let link = lab.ip_json(&h1, &["link", "show", &tap]).ok()?;
        let r = lab.ip_json(s1, &["route", "show", "default"]).ok()?;
        (link[0]["master"].is_string() && !r.as_array()?.is_empty()).then_some(())
    })?;
    lab.ping_ok(s1, s2_ip, T)?;
    run_ok(&["ip", "-n", &h1, "link", "del", &tap])?;
    wait_for(T, "the TAP recreated", || lab.ip_json(&h1, &["link", "show", &tap]).ok())?;
    lab.ping_ok(s1, s2_ip, T)?;
    Ok(())
}

/// `endpoint rm` leaves nothing: namespace, resolv.conf, veth, remote FDB/neighbour
/// entries, and the network's bridge/vxlan on a host that no longer carries it.
fn endpoint_rm(lab: &mut Lab) -> Result<()> {
    create_network(lab, "temp", "10.0.5.0/24", &[])?;
    let t1 = lab.endpoint("t1", 1, "temp", &[])?;
    let t3 = lab.endpoint("t3", 3, "temp", &[])?;
    let (t3_ip, t3_mac) = lab.attachment(&t3, "temp")?;
    lab.ping_ok(&t1, &t3_ip, T)?;
    let vni = vni(lab, "temp")?;
    lab.ctl_ok(&["endpoint", "rm", &t3])?;
    let h3 = lab.host_ns(3);
    let h1 = lab.host_ns(1);
    wait_for(T, "t3 to disappear from h3", || {
        let gone_ns = !std::path::Path::new(&format!("/var/run/netns/{t3}")).exists();
        let gone_etc = !std::path::Path::new(&format!("/etc/netns/{t3}")).exists();
        let links = lab.ip_json(&h3, &["link", "show"]).ok()?;
        let names: Vec<String> = links
            .as_array()?
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect();
        let gone_links = !names.iter().any(|n| {
            n == &veth_name(&t3, "eth0")
                || n == &bridge_name(vni)
                || n == &vxlan_name(vni)
                || n == &tap_name(vni)
        });
        (gone_ns && gone_etc && gone_links).then_some(())
    })?;
    // A TAP uplink's forwarding facts live in the user-space data plane, not in the kernel.
    let kernel_fdb = !is_tap("temp");
    wait_for(T, "h1 to forget t3's MAC and address", || {
        if !kernel_fdb {
            return Some(());
        }
        let dev = vxlan_name(vni);
        let fdb = run_ok(&["bridge", "-j", "-n", &h1, "fdb", "show", "dev", &dev]).ok()?;
        let fdb: serde_json::Value = serde_json::from_str(&fdb).ok()?;
        // Entries the bridge learned age out by themselves; ours carry a `dst`.
        let stale_fdb =
            fdb.as_array()?.iter().any(|e| e["mac"] == t3_mac.as_str() && e.get("dst").is_some());
        let neigh = lab.ip_json(&h1, &["neigh", "show", "dev", &dev, "nud", "permanent"]).ok()?;
        let stale_neigh = neigh.as_array()?.iter().any(|n| n["dst"] == t3_ip.as_str());
        (!stale_fdb && !stale_neigh).then_some(())
    })?;
    lab.ctl_ok(&["endpoint", "rm", &t1])?;
    lab.ctl_ok(&["network", "rm", "temp"])?;
    wait_for(T, "h1 to drop network temp", || {
        let links = run_ok(&["ip", "-n", &h1, "link", "show"]).ok()?;
        (!links.contains(&bridge_name(vni))
            && !std::path::Path::new(&format!("/var/run/netns/{t1}")).exists())
        .then_some(())
    })?;
    Ok(())
}

/// An agent stopped with SIGTERM leaves traffic flowing, is shown down, and on restart
/// changes nothing that was right (same veth, same ifindex).
fn agent_restart(lab: &mut Lab) -> Result<()> {
    let s1 = lab.ep("s1");
    let s2 = lab.ep("s2");
    let (s2_ip, _) = lab.attachment(&s2, "frontend")?;
    let h2 = lab.host_ns(2);
    let veth = veth_name(&s2, "eth0");
    let before = lab.ip_json(&h2, &["link", "show", &veth])?[0]["ifindex"].clone();
    lab.stop_agent(2);
    lab.ping_ok(&s1, &s2_ip, T)?;
    wait_for(T, "h2 to be shown down", || {
        (host_status(lab, "h2").as_deref() == Some("down")).then_some(())
    })?;
    lab.ping_ok(&s1, &s2_ip, T)?;
    let log_path = lab.dir.join("agent2.log");
    let log_before = std::fs::metadata(&log_path).map(|m| m.len() as usize).unwrap_or(0);
    lab.start_agent(2)?;
    wait_for(T, "h2 to be ready again", || {
        (host_status(lab, "h2").as_deref() == Some("ready")).then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let after = lab.ip_json(&h2, &["link", "show", &veth])?[0]["ifindex"].clone();
    ensure!(before == after, "veth was recreated on restart ({before} -> {after})");
    let log = fs_read(&log_path.display().to_string())?;
    let log = log.get(log_before..).unwrap_or("");
    if log.contains("plan: CreateVeth") || log.contains("plan: DeleteLink") {
        bail!("restarted agent re-created devices:\n{log}");
    }
    lab.ping_ok(&s1, &s2_ip, T)?;
    Ok(())
}

/// A continuous ping (every 50 ms) from `from` to `ip`, `count` packets long.
fn start_ping(from: &str, ip: &str, count: u32) -> Result<std::process::Child> {
    let count = count.to_string();
    std::process::Command::new("ip")
        .args(["netns", "exec", from, "ping", "-n", "-i", "0.05", "-W", "1", "-c", &count, ip])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("spawning ping")
}

/// Waits for `ping` and returns (transmitted, received) from its summary line.
fn ping_summary(ping: std::process::Child) -> Result<(u64, u64)> {
    let out = ping.wait_with_output()?;
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary in {text:?}"))?;
    // "X packets transmitted, Y received, ..."
    let mut parts = line.split(", ");
    let num = |s: Option<&str>| -> Result<u64> {
        let s = s.context("summary field")?;
        s.split_whitespace().next().context("number")?.parse().context("number")
    };
    let sent = num(parts.next())?;
    let got = num(parts.next())?;
    Ok((sent, got))
}

fn host_status(lab: &Lab, name: &str) -> Option<String> {
    let hosts = lab.ctl_json(&["host", "ls"]).ok()?;
    let h = hosts.as_array()?.iter().find(|h| h["name"] == name)?.clone();
    h["status"].as_str().map(str::to_string)
}

/// An agent SIGKILLed and restarted on the host of one endpoint loses not one packet
/// of a continuous ping from another host to that endpoint.
fn agent_sigkill(lab: &mut Lab) -> Result<()> {
    let s1 = lab.ep("s1");
    let (s2_ip, _) = lab.attachment(&lab.ep("s2"), "frontend")?;
    lab.ping_ok(&s1, &s2_ip, T)?;
    // 160 packets at 50 ms: about 8 s, covering kill, restart and the first reconciles.
    let ping = start_ping(&s1, &s2_ip, 160)?;
    std::thread::sleep(Duration::from_millis(1000));
    lab.kill_agent(2);
    std::thread::sleep(Duration::from_millis(1000));
    let started = lab.start_agent(2);
    let ready = wait_for(T, "h2 to be ready again", || {
        (host_status(lab, "h2").as_deref() == Some("ready")).then_some(())
    });
    let (sent, got) = ping_summary(ping)?;
    started?;
    ready?;
    eprintln!("agent SIGKILL + restart: {sent} sent, {got} received");
    ensure!(sent >= 150 && got == sent, "lost {} of {sent} pings", sent - got);
    lab.ping_ok(&s1, &s2_ip, T)?;
    Ok(())
}

/// The controller leader SIGKILLed: a continuous ping across hosts loses nothing, and
/// writes work again once a new leader is elected. The member is restarted afterwards.
fn leader_sigkill(lab: &mut Lab) -> Result<()> {
    let s1 = lab.ep("s1");
    let (s2_ip, _) = lab.attachment(&lab.ep("s2"), "frontend")?;
    let leader = wait_for(T, "a controller leader", || {
        lab.ctl_json(&["cluster", "status"]).ok()?["leader"].as_u64()
    })? as usize;
    ensure!((1..=3).contains(&leader), "leader id {leader}");
    let ping = start_ping(&s1, &s2_ip, 120)?;
    std::thread::sleep(Duration::from_millis(1000));
    lab.kill_controller(leader);
    let name = lab.ep("postleader");
    let write = wait_for(T, "an endpoint create after the leader died", || {
        let args = ["endpoint", "create", &name, "--host", "h3", "--network", "frontend"];
        // A create whose outcome was unknown may have gone through: inspect settles it.
        (lab.ctl_ok(&args).is_ok() || lab.ctl_json(&["endpoint", "inspect", &name]).is_ok())
            .then_some(())
    });
    let (sent, got) = ping_summary(ping)?;
    let restarted = lab.start_controller(leader);
    write?;
    restarted?;
    eprintln!("leader {leader} SIGKILL: {sent} sent, {got} received");
    ensure!(sent >= 110 && got == sent, "lost {} of {sent} pings", sent - got);
    let ip = lab.wait_endpoint(&name)?;
    lab.ping_ok(&s1, &ip, T)?;
    wait_for(Duration::from_secs(30), "all three members reachable again", || {
        let v = lab.ctl_json(&["cluster", "status"]).ok()?;
        let m = v["members"].as_array()?;
        (v["leader"].as_u64().is_some() && m.len() == 3 && m.iter().all(|m| m["reachable"] == true))
            .then_some(())
    })?;
    Ok(())
}

/// With one controller member down, changes still reach the agents (which fail over).
fn controller_down(lab: &mut Lab) -> Result<()> {
    lab.kill_controller(1);
    let late = wait_for(T, "endpoint create with member 1 down", || {
        lab.endpoint("late", 3, "frontend", &[]).ok()
    })?;
    let (late_ip, _) = lab.attachment(&late, "frontend")?;
    lab.ping_ok(&lab.ep("s1"), &late_ip, T)?;
    lab.start_controller(1)?;
    Ok(())
}

/// With every controller down, an agent restarted on a host whose endpoint namespace was
/// deleted by hand rebuilds it from its persisted desired state.
fn restart_without_controllers(lab: &mut Lab) -> Result<()> {
    let s1 = lab.ep("s1");
    let s2 = lab.ep("s2");
    let (s2_ip, _) = lab.attachment(&s2, "frontend")?;
    for i in 1..=3 {
        lab.kill_controller(i);
    }
    lab.stop_agent(2);
    run_ok(&["ip", "netns", "del", &s2])?;
    // The kernel frees a deleted namespace (and its veth) asynchronously.
    wait_for(T, "s2 to stop answering once its namespace is deleted", || {
        (!lab.ping(&s1, &s2_ip)).then_some(())
    })?;
    lab.start_agent(2)?;
    lab.wait_addr(&s2, &s2_ip)?;
    lab.ping_ok(&s1, &s2_ip, T)?;
    for i in 1..=3 {
        lab.start_controller(i)?;
    }
    wait_for(Duration::from_secs(30), "controllers back", || lab.ctl_json(&["host", "ls"]).ok())?;
    Ok(())
}

#[test]
fn e2e() {
    run_variant(
        Variant::Vxlan,
        &[
            ("tutorial", tutorial),
            ("internal_is_cut_off", internal_is_cut_off),
            ("egress", egress),
            ("mtu_edge", mtu_edge),
            ("drift_repair", drift_repair),
            ("endpoint_rm", endpoint_rm),
            ("agent_restart", agent_restart),
            ("agent_sigkill", agent_sigkill),
            ("leader_sigkill", leader_sigkill),
            ("controller_down", controller_down),
            ("restart_without_controllers", restart_without_controllers),
        ],
    );
}

/// The same suite over the user-space UDP data plane (control-plane failure cases are
/// the same whatever the encapsulation and run once, above).
#[test]
fn e2e_udp() {
    run_variant(
        Variant::Udp,
        &[
            ("tutorial", tutorial),
            ("internal_is_cut_off", internal_is_cut_off),
            ("egress", egress),
            ("mtu_edge", mtu_edge),
            ("drift_repair", drift_repair),
            ("endpoint_rm", endpoint_rm),
            ("agent_restart", agent_restart),
            ("agent_sigkill", agent_sigkill),
            ("restart_without_controllers", restart_without_controllers),
        ],
    );
}

#[test]
fn e2e_encrypted() {
    run_variant(
        Variant::Encrypted,
        &[
            ("tutorial", tutorial),
            ("internal_is_cut_off", internal_is_cut_off),
            ("egress", egress),
            ("mtu_edge", mtu_edge),
            ("drift_repair", drift_repair),
            ("endpoint_rm", endpoint_rm),
            ("agent_restart", agent_restart),
            ("agent_sigkill", agent_sigkill),
        ],
    );
}

#[test]
fn e2e_mixed() {
    run_variant(
        Variant::Mixed,
        &[
            ("tutorial", tutorial),
            ("egress", egress),
            ("mtu_edge", mtu_edge),
            ("agent_sigkill", agent_sigkill),
        ],
    );
}
