//! End to end inside a real network namespace (needs root; skipped otherwise): sockets
//! opened with `bind_in_netns` on 127.0.0.11:53, queried by `dig` and by glibc
//! (`getent`, through `/etc/netns/NAME/resolv.conf` as the agent writes it), with
//! forwarding to a fake upstream on the host namespace's loopback — which proves that
//! forwards leave from the agent's namespace, not the endpoint's.
//!
//! Traffic stays on loopback: the namespace's own and the host's 127.0.0.0/8.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use overlay_dns::testutil::catalog;
use overlay_dns::{bind_in_netns, serve, DnsView, Upstream};
use tokio::process::Command;
use tokio::sync::watch;

/// A namespace `ovdns-…` that is deleted, with its `/etc/netns` directory, on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// `None` when this machine cannot make namespaces (e.g. a container without
    /// CAP_SYS_ADMIN even as uid 0).
    fn create(name: &str) -> Option<Netns> {
        let status =
            std::process::Command::new("ip").args(["netns", "add", name]).status().expect("run ip");
        if !status.success() {
            return None;
        }
        let ns = Netns { name: name.to_string() };
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(status.success(), "lo up in {name}");
        Some(ns)
    }

    /// Gives the namespace an `eth0` with `addr` like an endpoint's (a veth pair with
    /// both ends inside, gone with the namespace): glibc's getaddrinfo (AI_ADDRCONFIG)
    /// returns no IPv4 address on a host without a non-loopback IPv4 address.
    fn add_eth0(&self, addr: &str) {
        for args in [
            &["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer"][..],
            &["ip", "addr", "add", addr, "dev", "eth0"],
            &["ip", "link", "set", "eth0-peer", "up"],
            &["ip", "link", "set", "eth0", "up"],
        ] {
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args)
                .status()
                .expect("run ip");
            assert!(status.success(), "{args:?} in {}", self.name);
        }
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    fn etc(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = std::fs::remove_dir_all(self.etc());
    }
}

fn have(cmd: &str, arg: &str) -> bool {
    std::process::Command::new(cmd)
        .arg(arg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

async fn in_ns(ns: &Netns, args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).args(args).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("command finished")
        .expect("ran")
}

async fn stdout(ns: &Netns, args: &[&str]) -> String {
    let out = in_ns(ns, args).await;
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start_server(
    ns: &Netns,
    addr: SocketAddr,
    view: watch::Receiver<Arc<DnsView>>,
    upstream: Upstream,
) {
    let (udp, tcp) = bind_in_netns(&ns.path(), addr).expect("bind inside the namespace");
    let udp = tokio::net::UdpSocket::from_std(udp).expect("tokio udp");
    let tcp = tokio::net::TcpListener::from_std(tcp).expect("tokio tcp");
    tokio::spawn(serve(
        udp,
        tcp,
        "client".into(),
        view,
        Arc::new(upstream),
        std::future::pending::<()>(),
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_and_getent_inside_a_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root to create network namespaces");
        return;
    }
    if !have("ip", "-V") {
        eprintln!("skipping: `ip` (iproute2) is not installed");
        return;
    }
    let name = format!("ovdns-{}", std::process::id());
    let Some(ns) = Netns::create(&name) else {
        eprintln!("skipping: `ip netns add {name}` failed: no network namespaces here");
        return;
    };
    ns.add_eth0("10.0.1.10/24");

    // what the agent writes for every endpoint
    std::fs::create_dir_all(ns.etc()).unwrap();
    std::fs::write(ns.etc().join("resolv.conf"), "nameserver 127.0.0.11\n").unwrap();

    let view = DnsView::build(&catalog(
        &[
            ("front", "10.0.1.0/24", false),
            ("back", "10.0.2.0/24", false),
            ("dmz", "10.0.3.0/24", false),
        ],
        &[
            ("client", &[("front", "10.0.1.10", &[])]),
            ("web", &[("front", "10.0.1.2", &["www"])]),
            ("db", &[("back", "10.0.2.2", &[])]),
            ("gw", &[("front", "10.0.1.254", &[]), ("dmz", "10.0.3.254", &[])]),
            ("proxy", &[("dmz", "10.0.3.2", &[])]),
        ],
        &[("front", "10.0.3.0/24", "gw")],
    ));
    let (_views, rx) = watch::channel(Arc::new(view));

    // fake upstream in the host namespace; our server in the endpoint namespace
    let up = FakeUpstream::start(Ipv4Addr::new(127, 0, 0, 53)).await;
    start_server(&ns, "127.0.0.11:53".parse().unwrap(), rx.clone(), Upstream::new(vec![up.addr]));
    // a second server whose upstream never answers
    let (_silent_sock, silent) = silent_upstream(Ipv4Addr::new(127, 0, 0, 57)).await;
    start_server(&ns, "127.0.0.12:53".parse().unwrap(), rx, Upstream::new(vec![silent]));

    // glibc, through the resolv.conf bind-mounted by `ip netns exec`
    let hosts = stdout(&ns, &["getent", "hosts", "web"]).await;
    assert!(hosts.starts_with("10.0.1.2") && hosts.contains("web"), "getent hosts web: {hosts:?}");
    let hosts = stdout(&ns, &["getent", "ahostsv4", "proxy.dmz"]).await;
    assert!(hosts.starts_with("10.0.3.2"), "getent ahostsv4 proxy.dmz: {hosts:?}");
    let reverse = stdout(&ns, &["getent", "hosts", "10.0.1.2"]).await;
    assert!(reverse.contains("web.front"), "getent hosts 10.0.1.2: {reverse:?}");
    let missing = in_ns(&ns, &["getent", "hosts", "db"]).await;
    assert_eq!(missing.status.code(), Some(2), "db is in an isolated network");

    if !have("dig", "-v") {
        eprintln!(
            "skipping the dig checks: `dig` is not installed (apt-get install bind9-dnsutils)"
        );
        return;
    }
    let dig = |args: &[&str]| {
        let mut full = vec!["dig", "+time=5", "+tries=1"];
        full.extend_from_slice(args);
        full.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let ns = &ns;
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            stdout(ns, &refs).await
        }
    };
    assert_eq!(run(dig(&["+short", "@127.0.0.11", "web"])).await, "10.0.1.2");
    assert_eq!(run(dig(&["+short", "+tcp", "@127.0.0.11", "WWW.front."])).await, "10.0.1.2");
    assert_eq!(
        run(dig(&["+short", "@127.0.0.11", "proxy.dmz"])).await,
        "10.0.3.2",
        "across the route"
    );
    assert_eq!(run(dig(&["+short", "@127.0.0.11", "-x", "10.0.1.2"])).await, "web.front.");
    let nx = run(dig(&["+noall", "+comments", "@127.0.0.11", "db"])).await;
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let nodata = run(dig(&["+noall", "+comments", "@127.0.0.11", "AAAA", "web"])).await;
    assert!(nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"), "{nodata}");
    assert_eq!(
        run(dig(&["+short", "@127.0.0.11", "example.test"])).await,
        UPSTREAM_ANSWER.to_string()
    );
    assert_eq!(
        run(dig(&["+short", "+tcp", "@127.0.0.11", "example.test"])).await,
        UPSTREAM_ANSWER.to_string()
    );
    let tc = run(dig(&["+short", "@127.0.0.11", "tc.test"])).await;
    assert_eq!(tc.lines().count(), 3, "upstream TC retried over TCP: {tc}");

    let started = Instant::now();
    let fail = run(dig(&["+noall", "+comments", "@127.0.0.12", "example.test"])).await;
    let took = started.elapsed();
    assert!(fail.contains("status: SERVFAIL"), "{fail}");
    assert!(took < Duration::from_millis(2500), "SERVFAIL took {took:?}");
}
