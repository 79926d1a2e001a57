//! `/metrics` of the controllers and agents in the namespace lab, scraped from the
//! underlay switch (where a monitoring system sits) and parsed: values move as the
//! cluster does (commit index and endpoints per network after creates, reconcile passes
//! over time, data-plane packets after pings, for a kernel VXLAN network and an
//! `--encap udp` one), and no endpoint can reach any metrics port; the agent tells
//! systemd it is ready only after its first reconcile pass, and pings the watchdog
//! (a datagram socket standing in for systemd's). Every lab controller
//! and agent runs with `--metrics-listen HOST_IP:7490` / `:7491` (see `lab.rs`).
//! Needs root and `cargo build --workspace --bins`; skipped without root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use overlay_tests::lab::{
    run_cases, wait_for, Case, Lab, AGENT_METRICS_PORT, CONTROLLER_METRICS_PORT,
};
use overlay_tests::prom::Scrape;

const T: Duration = Duration::from_secs(30);
const VX: &str = "mvx";
const UDP: &str = "mudp";

fn ep(lab: &Lab, short: &str) -> String {
    lab.ep(short)
}

fn setup(lab: &mut Lab) -> Result<()> {
    lab.ctl_ok(&["network", "create", VX, "--subnet", "10.81.0.0/24"])?;
    lab.ctl_ok(&["network", "create", UDP, "--subnet", "10.81.1.0/24", "--encap", "udp"])?;
    Ok(())
}

/// The three controllers' scrapes.
fn controllers(lab: &Lab) -> Result<Vec<Scrape>> {
    (1..=3).map(|i| lab.controller_metrics(i).with_context(|| format!("controller {i}"))).collect()
}

fn controller_metrics_move(lab: &mut Lab) -> Result<()> {
    // One leader that everyone follows, three voters.
    let (leader, commit_before) = wait_for(T, "one agreed leader in the metrics", || {
        let all = controllers(lab).ok()?;
        let leaders: Vec<usize> = (0..3)
            .filter(|&i| all[i].get("overlay_controller_raft_is_leader", &[]) == Some(1.0))
            .collect();
        let ids: Vec<Option<f64>> =
            all.iter().map(|s| s.get("overlay_controller_raft_leader_id", &[])).collect();
        let agreed = ids.iter().all(|id| id.is_some() && *id == ids[0]);
        (leaders.len() == 1 && agreed).then(|| {
            let l = leaders[0];
            (l + 1, all[l].get("overlay_controller_raft_commit_index", &[]).unwrap_or(0.0))
        })
    })?;
    let s = lab.controller_metrics(leader)?;
    ensure!(s.get("overlay_controller_raft_members", &[("kind", "voter")]) == Some(3.0), "{s:?}");
    ensure!(s.get("overlay_controller_raft_has_leader", &[]) == Some(1.0));
    ensure!(s.get("overlay_controller_hosts", &[("status", "ready")]) == Some(3.0), "hosts: {s:?}");
    ensure!(s.get("overlay_controller_network_endpoints", &[("network", VX)]) == Some(0.0));
    // The creates so far went through whichever member overlayctl reached first.
    ensure!(controllers(lab)?.iter().any(|s| {
        s.types.get("overlay_controller_proposals_total").map(String::as_str) == Some("counter")
    }));
    ensure!(
        s.types.get("overlay_controller_raft_commit_index").map(String::as_str) == Some("gauge")
    );
    ensure!(s.has("overlay_controller_tls_cert_expiry_timestamp_seconds"));
    ensure!(s.has("overlay_controller_proposal_duration_seconds_bucket"));
    // Every agent watches one member.
    let watches: f64 =
        controllers(lab)?.iter().map(|s| s.sum("overlay_controller_watch_streams", &[])).sum();
    ensure!(watches >= 3.0, "{watches} watch streams for 3 agents");
    let committed_before: f64 = controllers(lab)?
        .iter()
        .map(|s| s.sum("overlay_controller_proposals_total", &[("outcome", "committed")]))
        .sum();

    lab.endpoint("mvx1", 1, VX, &[])?;
    lab.endpoint("mvx2", 2, VX, &[])?;

    // Every member applies the creates: the same count per network everywhere, and the
    // commit index moved on.
    wait_for(T, "endpoints per network on every member", || {
        let all = controllers(lab).ok()?;
        let ok = all.iter().all(|s| {
            s.get("overlay_controller_network_endpoints", &[("network", VX)]) == Some(2.0)
                && s.get("overlay_controller_network_endpoints", &[("network", UDP)]) == Some(0.0)
                && s.get("overlay_controller_raft_commit_index", &[])
                    .is_some_and(|c| c >= commit_before + 2.0)
        });
        ok.then_some(())
    })?;
    let all = controllers(lab)?;
    let committed: f64 = all
        .iter()
        .map(|s| s.sum("overlay_controller_proposals_total", &[("outcome", "committed")]))
        .sum();
    ensure!(committed >= committed_before + 2.0, "committed {committed_before} -> {committed}");
    let created: f64 = all
        .iter()
        .map(|s| {
            s.sum(
                "overlay_controller_grpc_requests_total",
                &[("method", "overlay.v1.Overlay/CreateEndpoint"), ("code", "Ok")],
            )
        })
        .sum();
    ensure!(created >= 2.0, "{created} CreateEndpoint calls counted");
    Ok(())
}

fn agent_metrics_move(lab: &mut Lab) -> Result<()> {
    let s = lab.agent_metrics(1)?;
    let passes = s.get("overlay_agent_reconcile_passes_total", &[]).context("no passes metric")?;
    ensure!(
        s.types.get("overlay_agent_reconcile_passes_total").map(String::as_str) == Some("counter")
    );
    ensure!(s.has("overlay_agent_reconcile_duration_seconds_bucket"));
    ensure!(s.get("overlay_agent_firewall_failing", &[]) == Some(0.0), "{s:?}");
    // Level-triggered: passes go on every reconcile interval (1 s in the lab).
    wait_for(T, "more reconcile passes", || {
        let now = lab.agent_metrics(1).ok()?.get("overlay_agent_reconcile_passes_total", &[])?;
        (now >= passes + 2.0).then_some(())
    })?;
    let s = lab.agent_metrics(1)?;
    ensure!(s.get("overlay_agent_endpoints", &[]) == Some(1.0), "host 1 carries one endpoint");
    ensure!(s.get("overlay_agent_networks", &[]).is_some_and(|n| n >= 1.0));
    ensure!(s.sum("overlay_agent_reconcile_actions_total", &[("kind", "create_namespace")]) >= 1.0);

    // Kernel VXLAN: the ovx- device's counters, per network, after pings across hosts.
    let (a, b) = (ep(lab, "mvx1"), ep(lab, "mvx2"));
    let b_ip = lab.wait_endpoint(&b)?;
    let vx = [("network", VX)];
    let rx0 = lab.agent_metrics(1)?.sum("overlay_agent_dataplane_rx_packets_total", &vx);
    let tx0 = lab.agent_metrics(1)?.sum("overlay_agent_dataplane_tx_packets_total", &vx);
    lab.ping_ok(&a, &b_ip, T)?;
    for _ in 0..3 {
        lab.ping(&a, &b_ip);
    }
    let s = lab.agent_metrics(1)?;
    let (rx, tx) = (
        s.sum("overlay_agent_dataplane_rx_packets_total", &vx),
        s.sum("overlay_agent_dataplane_tx_packets_total", &vx),
    );
    ensure!(rx >= rx0 + 3.0 && tx >= tx0 + 3.0, "vxlan rx {rx0} -> {rx}, tx {tx0} -> {tx}");
    ensure!(s.sum("overlay_agent_dataplane_rx_bytes_total", &vx) > 0.0);

    // --encap udp: the data-plane daemon's counters (written every couple of seconds).
    let c = lab.endpoint("mudp1", 1, UDP, &[])?;
    let d = lab.endpoint("mudp3", 3, UDP, &[])?;
    let d_ip = lab.wait_endpoint(&d)?;
    lab.ping_ok(&c, &d_ip, T)?;
    for _ in 0..3 {
        lab.ping(&c, &d_ip);
    }
    let udp = [("network", UDP)];
    wait_for(T, "the UDP data plane's counters in /metrics", || {
        let s = lab.agent_metrics(1).ok()?;
        let rx = s.sum("overlay_agent_dataplane_rx_packets_total", &udp);
        let tx = s.sum("overlay_agent_dataplane_tx_packets_total", &udp);
        (rx >= 3.0 && tx >= 3.0 && s.has("overlay_agent_dataplane_drops_total")).then_some(())
    })?;
    Ok(())
}

fn metrics_unreachable_from_endpoints(lab: &mut Lab) -> Result<()> {
    let (a, b) = (ep(lab, "mvx1"), ep(lab, "mvx2"));
    let b_ip = lab.wait_endpoint(&b)?;
    // Positive controls: the endpoint has a working network, the ports serve the switch.
    lab.ping_ok(&a, &b_ip, T)?;
    let t = Duration::from_secs(2);
    for i in 1..=3 {
        for port in [CONTROLLER_METRICS_PORT, AGENT_METRICS_PORT] {
            ensure!(
                lab.tcp_connects(&lab.switch_ns(), &Lab::host_ip(i), port, t)?,
                "{}:{port} does not serve the switch",
                Lab::host_ip(i)
            );
        }
    }
    // From an endpoint: neither its own host nor any other, nor its gateway address.
    let gateway = lab.ctl_json(&["network", "inspect", VX])?["gateway"]
        .as_str()
        .context("gateway")?
        .to_string();
    let mut targets: Vec<String> = (1..=3).map(Lab::host_ip).collect();
    targets.push(gateway);
    for ip in &targets {
        for port in [CONTROLLER_METRICS_PORT, AGENT_METRICS_PORT] {
            ensure!(!lab.tcp_connects(&a, ip, port, t)?, "endpoint {a} reaches {ip}:{port}");
        }
    }
    Ok(())
}

/// Agent 3 restarted under a fake systemd: `READY=1` arrives once a pass has run (its
/// metrics already count one), then `WATCHDOG=1` keeps coming from the reconcile loop.
fn agent_notifies_ready_and_watchdog(lab: &mut Lab) -> Result<()> {
    let path = lab.dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let socket = std::os::unix::net::UnixDatagram::bind(&path)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    lab.stop_agent(3);
    let notify = path.to_str().context("utf-8 path")?;
    lab.start_agent_with_env(3, &[("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "2000000")])?;
    let start = std::time::Instant::now();
    let mut seen: Vec<String> = Vec::new();
    let mut passes_at_ready = None;
    let mut buf = [0u8; 512];
    while start.elapsed() < T {
        let Ok(n) = socket.recv(&mut buf) else { continue };
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        if msg.lines().any(|l| l == "READY=1") && passes_at_ready.is_none() {
            let s = lab.agent_metrics(3)?;
            passes_at_ready = s.get("overlay_agent_reconcile_passes_total", &[]);
        }
        seen.push(msg);
        let watchdogs = seen.iter().filter(|m| m.as_str() == "WATCHDOG=1").count();
        if passes_at_ready.is_some() && watchdogs >= 3 {
            break;
        }
    }
    lab.stop_agent(3);
    lab.start_agent(3)?;
    let passes = passes_at_ready.with_context(|| format!("no READY=1 from agent 3: {seen:?}"))?;
    ensure!(passes >= 1.0, "READY=1 before the first pass ended ({passes} passes)");
    let watchdogs = seen.iter().filter(|m| m.as_str() == "WATCHDOG=1").count();
    ensure!(watchdogs >= 3, "{watchdogs} WATCHDOG=1 in {:?}: {seen:?}", start.elapsed());
    let first_ready = seen.iter().position(|m| m.contains("READY=1")).unwrap_or(usize::MAX);
    ensure!(
        seen.iter().position(|m| m == "STOPPING=1").is_none_or(|i| i > first_ready),
        "{seen:?}"
    );
    Ok(())
}

#[test]
fn metrics_in_the_lab() {
    let cases: &[(&str, Case)] = &[
        ("setup", setup),
        ("controller metrics move with the cluster", controller_metrics_move),
        ("agent metrics move with reconciles and traffic", agent_metrics_move),
        ("endpoints cannot reach metrics ports", metrics_unreachable_from_endpoints),
        ("agent notifies systemd: ready after a pass, watchdog", agent_notifies_ready_and_watchdog),
    ];
    run_cases(cases);
}
