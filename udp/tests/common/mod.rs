//! A two-host lab in network namespaces for the UDP data plane (shared by the
//! integration test and the bench).
//!
//! * `<p>sw`: the underlay switch, bridge `br0`;
//! * `<p>h1`, `<p>h2`: hosts, `ul0` at `172.31.0.<i>/24` and `fd00:31::<i>/64`, MTU 1500, an [`Engine`] each
//!   (started from a thread inside the host namespace) and, per network, a bridge
//!   `ovb-<vni>` with the engine's TAP `ovu-<vni>` enslaved (learning off, static FDB
//!   for the remote endpoint's MAC);
//! * `<p>e<i>v<vni>`: one endpoint per host and network, `eth0` at `<subnet>.<i>/24`,
//!   MTU underlay − 50, on the host's bridge;
//! * `<p>x`: an outsider on the underlay at `172.31.0.3`.
//!
//! `<p>` is `ovu<pid><n>`; everything lives in these namespaces and `Drop` stops the
//! engines and deletes them, also when a test panics.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use anyhow::{bail, Context, Result};
use overlay_udp::{Engine, EngineConfig, SecureTransport, UdpNetwork};

/// Underlay MTU.
pub const UNDERLAY_MTU: u32 = 1500;
/// Overlay MTU of the endpoints.
pub const OVERLAY_MTU: u32 = UNDERLAY_MTU - 50;
/// The outsider's underlay address.
pub const OUTSIDER: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 3);

/// One overlay network of the lab.
#[derive(Debug, Clone, Copy)]
pub struct NetSpec {
    pub vni: u32,
    /// First three octets of the /24, e.g. "10.99.0".
    pub subnet: &'static str,
    pub encrypted: bool,
}

/// True when this process may build the lab.
pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip").arg("-V").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Runs a command; its output whatever the exit status.
pub fn run(args: &[&str]) -> Result<Output> {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {args:?}"))
}

/// Runs a command and fails with its stderr unless it succeeds.
pub fn run_ok(args: &[&str]) -> Result<String> {
    let out = run(args)?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a fresh thread inside namespace `ns`.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns reads the fd, kept open by `file`; it changes the namespace
            // of this scoped thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {ns}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

/// A secure transport that hands datagrams straight to the peer engine's `deliver`
/// (standing in for the QUIC transport), with small datagrams to force fragments.
pub struct Loopback {
    me: IpAddr,
    pub max: usize,
    peers: Mutex<HashMap<IpAddr, Weak<Engine>>>,
}

impl SecureTransport for Loopback {
    fn max_datagram(&self, peer: IpAddr) -> Option<usize> {
        self.peers.lock().ok()?.contains_key(&peer).then_some(self.max)
    }

    fn send(&self, peer: IpAddr, datagram: &[u8]) -> bool {
        let Some(e) = self.peers.lock().ok().and_then(|p| p.get(&peer)?.upgrade()) else {
            return false;
        };
        e.deliver(self.me, datagram);
        true
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The running lab.
pub struct Lab {
    pub prefix: String,
    pub nets: Vec<NetSpec>,
    /// The engines use IPv6 underlay addresses.
    pub v6: bool,
    /// Engines of host 1 and host 2.
    pub engines: Vec<Arc<Engine>>,
    namespaces: Vec<String>,
}

impl Lab {
    pub fn host_ns(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    pub fn ep_ns(&self, i: usize, vni: u32) -> String {
        format!("{}e{i}v{vni}", self.prefix)
    }

    pub fn outsider_ns(&self) -> String {
        format!("{}x", self.prefix)
    }

    /// Host `i`'s underlay address the engines use (IPv6 in an IPv6 lab).
    pub fn underlay_addr(&self, i: usize) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, i as u16))
        } else {
            IpAddr::V4(Self::underlay_ip(i))
        }
    }

    pub fn underlay_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, 0, i as u8)
    }

    pub fn ep_ip(&self, i: usize, vni: u32) -> Ipv4Addr {
        let spec = self.nets.iter().find(|n| n.vni == vni).expect("network of the lab");
        format!("{}.{i}", spec.subnet).parse().expect("endpoint address")
    }

    pub fn ep_mac(i: usize, vni: u32) -> [u8; 6] {
        [0x02, 0, 0, (vni >> 8) as u8, vni as u8, i as u8]
    }

    fn mac_str(m: [u8; 6]) -> String {
        m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
    }

    /// What host `i`'s engine is told: every lab network, the other host as peer.
    pub fn networks(&self, i: usize) -> Vec<UdpNetwork> {
        let peer = self.underlay_addr(3 - i);
        self.nets
            .iter()
            .map(|n| UdpNetwork {
                vni: n.vni,
                tap: format!("ovu-{}", n.vni),
                encrypted: n.encrypted,
                peers: vec![peer],
                remote_macs: vec![(Self::ep_mac(3 - i, n.vni), peer)],
            })
            .collect()
    }

    /// Runs a command inside namespace `ns`.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Builds the lab with `queues` workers per engine.
    pub fn start(nets: &[NetSpec], queues: usize) -> Result<Lab> {
        Self::start_with(nets, queues, false)
    }

    /// Builds the lab; with `v6` the engines talk over IPv6 on the underlay.
    pub fn start_with(nets: &[NetSpec], queues: usize, v6: bool) -> Result<Lab> {
        let prefix = format!("ovu{}{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let nets = nets.to_vec();
        let mut lab = Lab { prefix, nets, v6, engines: Vec::new(), namespaces: Vec::new() };
        lab.build(queues)?;
        Ok(lab)
    }

    fn add_ns(&mut self, ns: String) -> Result<String> {
        run_ok(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        run_ok(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn build(&mut self, queues: usize) -> Result<()> {
        let sw = self.add_ns(format!("{}sw", self.prefix))?;
        run_ok(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run_ok(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        let mtu = UNDERLAY_MTU.to_string();
        let mut underlay = vec![(self.host_ns(1), 1), (self.host_ns(2), 2)];
        underlay.push((self.outsider_ns(), 3));
        for (ns, i) in underlay {
            self.add_ns(ns.clone())?;
            let port = format!("p{i}");
            run_ok(&[
                "ip", "-n", &sw, "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name",
                "ul0", "netns", &ns,
            ])?;
            run_ok(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", Self::underlay_ip(i));
            run_ok(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "ul0"])?;
            let addr6 = format!("fd00:31::{i}/64");
            run_ok(&["ip", "-n", &ns, "addr", "add", &addr6, "dev", "ul0", "nodad"])?;
            run_ok(&["ip", "-n", &ns, "link", "set", "ul0", "mtu", &mtu, "up"])?;
        }
        for i in 1..=2 {
            let networks = self.networks(i);
            let listen = SocketAddr::new(self.underlay_addr(i), overlay_udp::DEFAULT_PORT);
            let config = EngineConfig { listen, underlay_mtu: UNDERLAY_MTU, queues };
            let engine = in_ns(&self.host_ns(i), move || -> Result<Engine> {
                let e = Engine::start(config)?;
                e.set_networks(networks)?;
                Ok(e)
            })??;
            self.engines.push(Arc::new(engine));
            for n in self.nets.clone() {
                self.plumb(i, n)?;
            }
        }
        for i in 0..2 {
            let me = self.underlay_addr(i + 1);
            let other = self.underlay_addr(2 - i);
            let peers = HashMap::from([(other, Arc::downgrade(&self.engines[1 - i]))]);
            let t = Loopback { me, max: 1400, peers: Mutex::new(peers) };
            self.engines[i].set_secure(Arc::new(t));
        }
        Ok(())
    }

    /// Bridge, TAP and endpoint of network `n` on host `i`.
    fn plumb(&mut self, i: usize, n: NetSpec) -> Result<()> {
        let h = self.host_ns(i);
        let (br, tap, mtu) =
            (format!("ovb-{}", n.vni), format!("ovu-{}", n.vni), OVERLAY_MTU.to_string());
        run_ok(&["ip", "-n", &h, "link", "add", &br, "mtu", &mtu, "type", "bridge"])?;
        run_ok(&["ip", "-n", &h, "link", "set", &br, "up"])?;
        run_ok(&["ip", "-n", &h, "link", "set", &tap, "mtu", &mtu, "master", &br])?;
        run_ok(&["bridge", "-n", &h, "link", "set", "dev", &tap, "learning", "off"])?;
        let remote = Self::mac_str(Self::ep_mac(3 - i, n.vni));
        run_ok(&["bridge", "-n", &h, "fdb", "replace", &remote, "dev", &tap, "master", "static"])?;
        run_ok(&["ip", "-n", &h, "link", "set", &tap, "up"])?;
        let ep = self.add_ns(self.ep_ns(i, n.vni))?;
        let port = format!("ve{}", n.vni);
        let mac = Self::mac_str(Self::ep_mac(i, n.vni));
        run_ok(&[
            "ip", "-n", &h, "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name",
            "eth0", "netns", &ep,
        ])?;
        run_ok(&["ip", "-n", &h, "link", "set", &port, "master", &br, "up"])?;
        run_ok(&["ip", "-n", &ep, "link", "set", "eth0", "address", &mac, "mtu", &mtu, "up"])?;
        let addr = format!("{}.{i}/24", n.subnet);
        run_ok(&["ip", "-n", &ep, "addr", "add", &addr, "dev", "eth0"])?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Engines first: their sockets and TAP queues keep the host namespaces alive.
        self.engines.clear();
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}
