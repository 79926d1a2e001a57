//! The user-space data plane's guarantees against the underlay, in the namespace lab:
//!
//! * `--encap udp`: frames from an address that is not a host of the cluster are
//!   dropped and counted by the receiving host's firewall before the data plane sees
//!   them (a control shows the very same datagram from a real host is delivered); from
//!   a registered host that is not in the network, by the data plane itself;
//! * `--encrypted`: a capture on the underlay switch shows no plaintext of a known
//!   payload (a control shows the same capture of a plain UDP network does), and
//!   frames injected by a host without a valid certificate — one from another CA, or a
//!   real host's certificate used from another address — never reach an endpoint.
//!
//! The injecting "rogue" host is one more namespace on the lab's underlay switch. It is
//! registered as a host (`host add`, no agent) after the first check, so that the
//! data plane's own defences are what the later checks meet, not the host firewall.
//! Needs root; skipped without.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use overlay_tests::lab::{can_run, in_netns, run_ok, wait_for, Lab};

const T: Duration = Duration::from_secs(20);
const ROGUE_IP: &str = "192.168.217.200";
const MARKER: &[u8] = b"OVERLAY-SECRET-PAYLOAD-7f3a";
const UDP_PORT: u16 = 7470;
const QUIC_PORT: u16 = 7471;
/// Where endpoints listen for injected frames.
const SINK_PORT: u16 = 9999;

struct Net {
    vni: u32,
    /// (endpoint on h1, endpoint on h2)
    ends: (String, String),
    /// Address and MAC of the h2 endpoint.
    target: (Ipv4Addr, [u8; 6]),
}

fn setup_net(lab: &Lab, name: &str, subnet: &str, flags: &[&str]) -> Result<Net> {
    let mut args = vec!["network", "create", name, "--subnet", subnet, "--encap", "udp"];
    args.extend_from_slice(flags);
    lab.ctl_ok(&args)?;
    let a = lab.endpoint(&format!("{name}1"), 1, name, &[])?;
    let b = lab.endpoint(&format!("{name}2"), 2, name, &[])?;
    let v = lab.ctl_json(&["endpoint", "inspect", &b])?;
    let att = &v["attachments"][0];
    let ip: Ipv4Addr = att["ip"].as_str().context("ip")?.parse()?;
    let mac = parse_mac(att["mac"].as_str().context("mac")?)?;
    let vni = lab.ctl_json(&["network", "inspect", name])?["vni"].as_u64().context("vni")? as u32;
    lab.ping_ok(&a, &ip.to_string(), T)?;
    Ok(Net { vni, ends: (a, b), target: (ip, mac) })
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| anyhow::anyhow!("bad mac {s}"))
}

/// An Ethernet frame carrying IPv4/UDP to `dst:SINK_PORT` with `payload`, as a rogue
/// would put on the wire.
fn crafted_frame(dst_mac: [u8; 6], dst_ip: Ipv4Addr, src_ip: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    overlay_tests::frames::udp_frame(dst_mac, dst_ip, src_ip, SINK_PORT, payload)
}

/// `header ++ frame`: the plain (unfragmented) datagram of network `vni`.
fn datagram(vni: u32, frame: &[u8]) -> Vec<u8> {
    let mut d = overlay_udp::header::Header::plain(vni).encode().to_vec();
    d.extend_from_slice(frame);
    d
}

/// A UDP socket inside `ns` on `ip:SINK_PORT`, to see whether anything gets through.
fn sink(ns: &str, ip: Ipv4Addr) -> Result<UdpSocket> {
    let s = in_netns(ns, || UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), SINK_PORT)))??;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(s)
}

/// Everything `sink` receives within `window`.
fn drain(sink: &UdpSocket, window: Duration) -> Vec<Vec<u8>> {
    let deadline = std::time::Instant::now() + window;
    let mut got = vec![];
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < deadline {
        if let Ok(n) = sink.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

/// h2's data-plane counters as the daemon last wrote them.
fn counters(lab: &Lab) -> Result<serde_json::Value> {
    let path = lab.agent_data_dir(2).join("dataplane-counters.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn counter(lab: &Lab, pointer: &str) -> u64 {
    counters(lab).ok().and_then(|c| c.pointer(pointer).and_then(|v| v.as_u64())).unwrap_or(0)
}

/// Who stops the rogue's datagrams.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stopper {
    /// h2's host firewall: the rogue is no host of the cluster.
    Firewall,
    /// h2's UDP data plane: the rogue is a registered host, but none of the network.
    Dataplane,
}

fn plain_injection(lab: &Lab, plain: &Net, rogue: &str, stopper: Stopper) -> Result<()> {
    let (ip, mac) = plain.target;
    let s = sink(&plain.ends.1, ip)?;
    let h2: SocketAddr = format!("{}:{UDP_PORT}", Lab::host_ip(2)).parse()?;
    let frame = crafted_frame(mac, ip, Ipv4Addr::new(10, 0, 21, 250), MARKER);
    let d = datagram(plain.vni, &frame);
    // Control: the same datagram from host h1's address is delivered.
    let from_h1 = d.clone();
    in_netns(&lab.host_ns(1), move || -> std::io::Result<()> {
        let u = UdpSocket::bind((Lab::host_ip(1).as_str(), 0))?;
        u.send_to(&from_h1, h2).map(drop)
    })??;
    let got = drain(&s, Duration::from_secs(1));
    ensure!(got.iter().any(|p| p == MARKER), "control: a real host's datagram was not delivered");
    // From the rogue: dropped and counted.
    let counted = || match stopper {
        Stopper::Firewall => lab.nft_rule_packets(2, "input", &["@hosts", "saddr"]).unwrap_or(0),
        Stopper::Dataplane => counter(lab, &format!("/udp/{}/dropped_unknown_source", plain.vni)),
    };
    let before = counted();
    in_netns(rogue, move || -> std::io::Result<()> {
        let u = UdpSocket::bind((ROGUE_IP, 0))?;
        for _ in 0..20 {
            u.send_to(&d, h2)?;
        }
        Ok(())
    })??;
    let got = drain(&s, Duration::from_secs(1));
    ensure!(got.is_empty(), "a frame from an unknown host reached the endpoint: {got:?}");
    wait_for(T, "h2 to count the rogue's datagrams", || (counted() >= before + 20).then_some(()))?;
    Ok(())
}

/// Registers the rogue as a host (no agent) and waits until h2's firewall lets its
/// packets through to the data plane.
fn register_rogue(lab: &Lab) -> Result<()> {
    lab.ctl_ok(&["host", "add", "rogue", "--underlay-ip", ROGUE_IP])?;
    let ns = lab.host_ns(2);
    wait_for(T, "h2's firewall to know the rogue", || {
        let set = run_ok(&[
            "ip", "netns", "exec", &ns, "nft", "-j", "list", "set", "inet", "overlay", "hosts",
        ])
        .ok()?;
        set.contains(ROGUE_IP).then_some(())
    })
}

/// tcpdump on the underlay switch for `port`, while `traffic` runs: the capture's bytes.
fn capture(lab: &Lab, port: u16, traffic: impl FnOnce() -> Result<()>) -> Result<Vec<u8>> {
    let file = lab.dir.join(format!("capture-{port}.pcap"));
    let mut tcpdump: Child = Command::new("ip")
        .args(["netns", "exec", &lab.switch_ns(), "tcpdump", "-i", "sw0", "-U", "-s", "0", "-w"])
        .arg(&file)
        .args(["udp", "port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tcpdump")?;
    std::thread::sleep(Duration::from_millis(1500));
    let r = traffic();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: SIGINT to the tcpdump we started, so it flushes and exits.
    unsafe {
        libc::kill(tcpdump.id() as libc::pid_t, libc::SIGINT);
    }
    let _ = tcpdump.wait();
    r?;
    std::fs::read(&file).with_context(|| file.display().to_string())
}

/// Sends MARKER-filled UDP datagrams from the h1 endpoint to the h2 endpoint's sink.
fn send_marker(net: &Net) -> Result<()> {
    let (ip, _) = net.target;
    let s = sink(&net.ends.1, ip)?;
    let dst = SocketAddr::new(IpAddr::V4(ip), SINK_PORT);
    let payload = MARKER.repeat(20);
    let p = payload.clone();
    in_netns(&net.ends.0, move || -> std::io::Result<()> {
        let u = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..50 {
            u.send_to(&p, dst)?;
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })??;
    let got = drain(&s, Duration::from_millis(800));
    ensure!(
        got.iter().any(|g| g == &payload),
        "the marker did not arrive ({} datagrams)",
        got.len()
    );
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn no_plaintext(lab: &Lab, plain: &Net, secret: &Net) -> Result<()> {
    let seen = capture(lab, UDP_PORT, || send_marker(plain))?;
    ensure!(contains(&seen, MARKER), "control: the plain UDP capture should show the payload");
    let seen = capture(lab, QUIC_PORT, || send_marker(secret))?;
    ensure!(seen.len() > 20 * 1000, "the encrypted capture holds only {} bytes", seen.len());
    ensure!(!contains(&seen, MARKER), "plaintext of the payload on the underlay");
    ensure!(!contains(&seen, &MARKER[..12]), "part of the payload on the underlay");
    Ok(())
}

/// A QUIC plane in the rogue namespace with `identity`, sending crafted frames to h2.
fn inject_quic(rogue: &str, identity: overlay_quic::Identity, datagram: Vec<u8>) -> Result<()> {
    in_netns(rogue, move || -> Result<()> {
        // Peers are dialed on the plane's own port: bind the real one.
        let listen: SocketAddr = format!("{ROGUE_IP}:{QUIC_PORT}").parse()?;
        let plane = overlay_quic::QuicPlane::start(
            overlay_quic::QuicConfig::new(listen, identity, 1500),
            Arc::new(|_| Some("h2".to_string())),
            Arc::new(|_, _| {}),
        )?;
        let h2: IpAddr = Lab::host_ip(2).parse()?;
        for _ in 0..30 {
            plane.send(h2, &datagram);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })?
}

fn encrypted_injection(lab: &Lab, secret: &Net, rogue: &str) -> Result<()> {
    let (ip, mac) = secret.target;
    let s = sink(&secret.ends.1, ip)?;
    let frame = crafted_frame(mac, ip, Ipv4Addr::new(10, 0, 22, 250), MARKER);
    let d = datagram(secret.vni, &frame);
    let before = counter(lab, "/quic/rejected_peers");
    // A certificate for "h1" from a CA the cluster never heard of.
    let ca = overlay_quic::pki::Ca::generate()?;
    let subject = overlay_quic::pki::Subject::new("h1", overlay_quic::pki::Role::Agent);
    let issued = ca.issue(&subject.with_ips(vec![ROGUE_IP.parse()?]))?;
    inject_quic(rogue, overlay_quic::Identity::from_issued(&ca, &issued)?, d.clone())?;
    // h1's real certificate and key (it joined with them), used from another address.
    let (cert, key) = lab.agent_cert_files(1);
    let stolen = overlay_quic::Identity::load(&lab.pki_dir().join("ca.pem"), &cert, &key)?;
    inject_quic(rogue, stolen, d.clone())?;
    // And the encrypted network's datagram on the plain socket, from a real host.
    let h2: SocketAddr = format!("{}:{UDP_PORT}", Lab::host_ip(2)).parse()?;
    in_netns(&lab.host_ns(1), move || -> std::io::Result<()> {
        let u = UdpSocket::bind((Lab::host_ip(1).as_str(), 0))?;
        u.send_to(&d, h2).map(drop)
    })??;
    let got = drain(&s, Duration::from_secs(1));
    ensure!(got.is_empty(), "an injected frame reached the endpoint: {got:?}");
    let rejected = wait_for(T, "h2 to count the rejected connections", || {
        let n = counter(lab, "/quic/rejected_peers");
        (n > before).then_some(n)
    });
    eprintln!("h2 counters: {}", counters(lab).unwrap_or_default());
    rejected?;
    let wrong = format!("/udp/{}/dropped_wrong_transport", secret.vni);
    wait_for(T, "h2 to count the plain datagram of an encrypted network", || {
        (counter(lab, &wrong) >= 1).then_some(())
    })?;
    // The legitimate path still works.
    drop(s);
    send_marker(secret)
}

#[test]
fn encap_security() {
    if !can_run() || Command::new("tcpdump").arg("--version").output().is_err() {
        eprintln!("skipped: needs root, ip, nsenter and tcpdump");
        return;
    }
    let lab = Lab::start(3).expect("lab start");
    let result = (|| -> Result<()> {
        let plain = setup_net(&lab, "plain", "10.0.21.0/24", &[])?;
        let secret = setup_net(&lab, "secret", "10.0.22.0/24", &["--encrypted"])?;
        let rogue = lab.add_underlay_ns("rogue", ROGUE_IP)?;
        plain_injection(&lab, &plain, &rogue, Stopper::Firewall).context("plain injection")?;
        register_rogue(&lab).context("registering the rogue")?;
        plain_injection(&lab, &plain, &rogue, Stopper::Dataplane)
            .context("plain injection from a registered host")?;
        no_plaintext(&lab, &plain, &secret).context("no plaintext")?;
        encrypted_injection(&lab, &secret, &rogue).context("encrypted injection")?;
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("{}", lab.logs());
        panic!("{e:#}");
    }
}
