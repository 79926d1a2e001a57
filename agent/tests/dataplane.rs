//! The reconciler against a real kernel, without a controller: two namespaces act as
//! hosts joined by an underlay veth, each reconciled from a catalog built in code, then
//! endpoints ping each other over VXLAN. Needs root; skipped otherwise.
//!
//! Every namespace and device created here is named `ovt<pid>…` and removed by a Drop
//! guard, also when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::process::Command;

use overlay_agent::desired::{desired_for_host, LocalHost};
use overlay_agent::nl::Nl;
use overlay_agent::reconcile::{reconcile, Pass};
use overlay_agent::store::Store;
use overlay_model::{Attachment, Catalog, Encap, Endpoint, Host, HostStatus, Mac, Network};

struct Lab {
    pid: u32,
    namespaces: Vec<String>,
    dirs: Vec<std::path::PathBuf>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Endpoint namespaces the agent made, then the hosts (which takes their devices).
        for ns in [format!("ovt{}a", self.pid), format!("ovt{}b", self.pid)] {
            let _ = overlay_agent::netns::delete(&ns);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().expect("run command")
}

fn ok(args: &[&str]) {
    let out = sh(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs one reconcile pass with `ns` as the host namespace.
fn pass_as(ns: &str, catalog: &Catalog, host: &str, ip: Ipv4Addr, dir: &std::path::Path) -> Pass {
    let ns = ns.to_string();
    let catalog = catalog.clone();
    let local = LocalHost { name: host.to_string(), underlay_ip: ip, can_encrypt: false };
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: the fd is valid; only this thread changes namespace.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) },
            0
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = Store::open(&dir).unwrap();
            let nl = Nl::current().unwrap();
            let desired = desired_for_host(&catalog, &local);
            reconcile(&nl, &store, &desired).await.unwrap()
        })
    })
    .join()
    .unwrap()
}

fn catalog(pid: u32, with_b: bool) -> Catalog {
    let mut c = Catalog { revision: 1, ..Catalog::default() };
    for (name, ip) in [("h1", "192.168.213.1"), ("h2", "192.168.213.2")] {
        c.hosts.insert(
            name.into(),
            Host {
                name: name.into(),
                underlay_ip: ip.parse().unwrap(),
                underlay_mtu: 1500,
                status: HostStatus::Ready,
                status_changed_ms: 0,
                underlay_prefix: 24,
            },
        );
    }
    c.networks.insert(
        "front".into(),
        Network {
            name: "front".into(),
            subnet: "10.213.0.0/24".parse().unwrap(),
            gateway: "10.213.0.1".parse().unwrap(),
            vni: 4213,
            mtu: 1450,
            encap: Encap::Vxlan,
            encrypted: false,
            internal: false,
        },
    );
    let mut eps = vec![(format!("ovt{pid}a"), "h1", "10.213.0.2", 1)];
    if with_b {
        eps.push((format!("ovt{pid}b"), "h2", "10.213.0.3", 2));
    }
    for (name, host, ip, mac) in eps {
        c.endpoints.insert(
            name.clone(),
            Endpoint {
                name,
                host: host.into(),
                attachments: vec![Attachment {
                    network: "front".into(),
                    interface: "eth0".into(),
                    ip: ip.parse().unwrap(),
                    mac: Mac::from_counter(mac),
                    aliases: vec![],
                }],
            },
        );
    }
    c
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = sh(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn two_hosts_reach_each_other_over_vxlan_and_converge() {
    if !is_root() || !std::path::Path::new("/proc/self/ns/net").exists() {
        eprintln!("skipped: needs root and network namespaces");
        return;
    }
    let pid = std::process::id();
    let (h1, h2) = (format!("ovt{pid}h1"), format!("ovt{pid}h2"));
    let (a, b) = (format!("ovt{pid}a"), format!("ovt{pid}b"));
    let tmp = std::env::temp_dir();
    let (d1, d2) = (tmp.join(format!("ovt{pid}d1")), tmp.join(format!("ovt{pid}d2")));
    let _lab =
        Lab { pid, namespaces: vec![h1.clone(), h2.clone()], dirs: vec![d1.clone(), d2.clone()] };

    ok(&["ip", "netns", "add", &h1]);
    ok(&["ip", "netns", "add", &h2]);
    let (u1, u2) = (format!("ovt{pid}u1"), format!("ovt{pid}u2"));
    ok(&[
        "ip", "link", "add", &u1, "netns", &h1, "type", "veth", "peer", "name", &u2, "netns", &h2,
    ]);
    for (ns, dev, ip) in [(&h1, &u1, "192.168.213.1/24"), (&h2, &u2, "192.168.213.2/24")] {
        ok(&["ip", "-n", ns, "addr", "add", ip, "dev", dev]);
        ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
        ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    let ip1: Ipv4Addr = "192.168.213.1".parse().unwrap();
    let ip2: Ipv4Addr = "192.168.213.2".parse().unwrap();
    let cat = catalog(pid, true);
    for (ns, host, ip, dir) in [(&h1, "h1", ip1, &d1), (&h2, "h2", ip2, &d2)] {
        let pass = pass_as(ns, &cat, host, ip, dir);
        assert!(pass.errors.is_empty(), "{host}: {:?}", pass.errors);
        assert!(!pass.actions.is_empty());
    }

    // Kernel state, as JSON.
    let link = json(&["ip", "-j", "-d", "-n", &h1, "link", "show", "ovx-4213"]);
    let info = &link[0]["linkinfo"];
    assert_eq!(info["info_kind"], "vxlan");
    assert_eq!(info["info_data"]["id"], 4213);
    assert_eq!(info["info_data"]["local"], "192.168.213.1");
    assert_eq!(info["info_data"]["port"], 4789);
    assert_eq!(info["info_data"]["learning"], false);
    assert_eq!(info["info_data"]["proxy"], true);
    assert_eq!(link[0]["mtu"], 1450);
    assert_eq!(link[0]["master"], "ovb-4213");
    let eth0 = json(&["ip", "-j", "-n", &a, "addr", "show", "eth0"]);
    assert_eq!(eth0[0]["mtu"], 1450);
    assert_eq!(eth0[0]["address"], "02:00:00:00:00:01");
    assert_eq!(eth0[0]["addr_info"][0]["local"], "10.213.0.2");
    let routes = json(&["ip", "-j", "-n", &a, "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "10.213.0.1");
    assert_eq!(
        std::fs::read_to_string(format!("/etc/netns/{a}/resolv.conf")).unwrap(),
        "nameserver 127.0.0.11\n"
    );

    // Both ways, by IP, across the underlay.
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.213.0.3"]);
    ok(&["ip", "netns", "exec", &b, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.213.0.2"]);
    // The gateway answers locally.
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "1", "-W", "2", "10.213.0.1"]);

    // Applying again changes nothing on the real kernel either.
    for (ns, host, ip, dir) in [(&h1, "h1", ip1, &d1), (&h2, "h2", ip2, &d2)] {
        let pass = pass_as(ns, &cat, host, ip, dir);
        assert_eq!(pass.actions, vec![], "{host} second pass");
    }

    // Drift: an FDB entry, the default route and the host-side veth removed by hand.
    ok(&[
        "bridge",
        "-n",
        &h1,
        "fdb",
        "del",
        "02:00:00:00:00:02",
        "dev",
        "ovx-4213",
        "dst",
        "192.168.213.2",
    ]);
    ok(&["ip", "-n", &a, "route", "del", "default"]);
    let pass = pass_as(&h1, &cat, "h1", ip1, &d1);
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    assert_eq!(pass.actions.len(), 2, "{:?}", pass.actions);
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "1", "-W", "2", "10.213.0.3"]);
    let veth = overlay_agent::desired::veth_name(&a, "eth0");
    ok(&["ip", "-n", &h1, "link", "del", &veth]);
    let pass = pass_as(&h1, &cat, "h1", ip1, &d1);
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "1", "-W", "2", "10.213.0.3"]);
    assert_eq!(pass_as(&h1, &cat, "h1", ip1, &d1).actions, vec![]);

    // Removing endpoint b leaves nothing of it on h2, and h1 forgets it.
    let cat = catalog(pid, false);
    let pass = pass_as(&h2, &cat, "h2", ip2, &d2);
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    assert!(!std::path::Path::new(&format!("/var/run/netns/{b}")).exists());
    assert!(!std::path::Path::new(&format!("/etc/netns/{b}")).exists());
    let links = json(&["ip", "-j", "-n", &h2, "link", "show"]);
    let names: Vec<&str> =
        links.as_array().unwrap().iter().filter_map(|l| l["ifname"].as_str()).collect();
    assert!(
        names.iter().all(|n| !["ovb", "ovx", "ovv", "ovp"].iter().any(|p| n.starts_with(p))),
        "{names:?}"
    );
    let pass = pass_as(&h1, &cat, "h1", ip1, &d1);
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    let fdb = json(&["bridge", "-j", "-n", &h1, "fdb", "show", "dev", "ovx-4213"]);
    assert!(fdb.as_array().unwrap().iter().all(|e| e.get("dst").is_none()), "{fdb}");
}
