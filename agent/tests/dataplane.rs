//! The reconciler against a real kernel, without a controller: two namespaces act as
//! hosts joined by an underlay veth, each reconciled from a catalog built in code, then
//! endpoints ping each other over VXLAN. Needs root; skipped otherwise.
//!
//! Every namespace and device created here is named `ovt<pid>…` and removed by a Drop
//! guard, also when the test fails. The second test checks the neighbour caches of
//! endpoints (first contact, an address whose MAC changed, an endpoint moved between
//! hosts): each wait is bounded far below the kernel's own ARP timers, which the test
//! stretches in the client so that only an announcement can explain a quick answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::process::Command;

use overlay_agent::desired::{desired_for_host, LocalHost};
use overlay_agent::nl::Nl;
use overlay_agent::reconcile::{Pass, Reconciler};
use overlay_agent::store::Store;
use overlay_model::{Attachment, Catalog, Encap, Endpoint, Host, HostStatus, Mac, Network};

struct Lab {
    /// Endpoint namespaces the agent may have made.
    endpoints: Vec<String>,
    namespaces: Vec<String>,
    dirs: Vec<std::path::PathBuf>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Endpoint namespaces the agent made, then the hosts (which takes their devices).
        for ns in &self.endpoints {
            let _ = overlay_agent::netns::delete(ns);
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
/// A cluster id (32 hex digits) for the test that keeps its state in `dir`.
fn test_cluster_id(dir: &std::path::Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    format!("{:032x}", h.finish())
}

fn pass_as(ns: &str, catalog: &Catalog, host: &str, ip: Ipv4Addr, dir: &std::path::Path) -> Pass {
    pass_with(ns, catalog, host, ip, dir, Reconciler::new()).0
}

/// One pass by `reconciler` (which remembers failures across passes) with `ns` as the
/// host namespace; the reconciler comes back for the next pass.
fn pass_with(
    ns: &str,
    catalog: &Catalog,
    host: &str,
    ip: Ipv4Addr,
    dir: &std::path::Path,
    mut reconciler: Reconciler,
) -> (Pass, Reconciler) {
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
            let mut desired = desired_for_host(&catalog, &local);
            // Tests run in parallel with the same host names, and namespaces are global:
            // a cluster id of this test's own keeps each test's marks its own.
            desired.owner.cluster = Some(test_cluster_id(&dir));
            let pass = reconciler.pass(&nl, &store, &desired).await.unwrap();
            (pass, reconciler)
        })
    })
    .join()
    .unwrap()
}

/// Two host namespaces joined by a veth (`PREFIX1`/`PREFIX2`) on 192.168.213.0/24.
fn underlay(h1: &str, h2: &str, prefix: &str) {
    ok(&["ip", "netns", "add", h1]);
    ok(&["ip", "netns", "add", h2]);
    let (u1, u2) = (format!("{prefix}1"), format!("{prefix}2"));
    ok(&["ip", "link", "add", &u1, "netns", h1, "type", "veth", "peer", "name", &u2, "netns", h2]);
    for (ns, dev, ip) in [(h1, &u1, "192.168.213.1/24"), (h2, &u2, "192.168.213.2/24")] {
        ok(&["ip", "-n", ns, "addr", "add", ip, "dev", dev]);
        ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
        ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
}

fn catalog(pid: u32, with_b: bool) -> Catalog {
    let mut eps = vec![(format!("ovt{pid}a"), "h1", "10.213.0.2", Mac::from_counter(1))];
    if with_b {
        eps.push((format!("ovt{pid}b"), "h2", "10.213.0.3", Mac::from_counter(2)));
    }
    catalog_of(&eps)
}

/// Hosts h1 and h2, network `front` (10.213.0.0/24), and `endpoints` as (name, host,
/// IP, MAC) in `front`.
fn catalog_of(endpoints: &[(String, &str, &str, Mac)]) -> Catalog {
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
    for (name, host, ip, mac) in endpoints {
        c.endpoints.insert(
            name.clone(),
            Endpoint {
                name: name.clone(),
                host: host.to_string(),
                attachments: vec![Attachment {
                    network: "front".into(),
                    interface: "eth0".into(),
                    ip: ip.parse().unwrap(),
                    mac: *mac,
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
    let _lab = Lab {
        endpoints: vec![a.clone(), b.clone()],
        namespaces: vec![h1.clone(), h2.clone()],
        dirs: vec![d1.clone(), d2.clone()],
    };
    underlay(&h1, &h2, &format!("ovt{pid}u"));

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

/// The MAC `ns` has cached for `ip` and the entry's state, if it has one.
fn cached(ns: &str, ip: &str) -> Option<(Option<String>, Vec<String>)> {
    let v = json(&["ip", "-j", "-n", ns, "neigh", "show", ip]);
    let e = v.as_array()?.first()?.clone();
    let states = e["state"]
        .as_array()
        .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_string)).collect::<Vec<_>>());
    Some((e["lladdr"].as_str().map(str::to_string), states.unwrap_or_default()))
}

/// Polls (every 50 ms, for at most `secs`) until `f` holds.
fn within(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out after {secs}s: {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn neighbour_caches_follow_endpoints_that_appear_change_or_move() {
    if !is_root() || !std::path::Path::new("/proc/self/ns/net").exists() {
        eprintln!("skipped: needs root and network namespaces");
        return;
    }
    let pid = std::process::id();
    let (h1, h2) = (format!("ovt{pid}nh1"), format!("ovt{pid}nh2"));
    let (a, b, c) = (format!("ovt{pid}na"), format!("ovt{pid}nb"), format!("ovt{pid}nc"));
    let tmp = std::env::temp_dir();
    let (d1, d2) = (tmp.join(format!("ovt{pid}nd1")), tmp.join(format!("ovt{pid}nd2")));
    let _lab = Lab {
        endpoints: vec![a.clone(), b.clone(), c.clone()],
        namespaces: vec![h1.clone(), h2.clone()],
        dirs: vec![d1.clone(), d2.clone()],
    };
    underlay(&h1, &h2, &format!("ovt{pid}nu"));
    let ip1: Ipv4Addr = "192.168.213.1".parse().unwrap();
    let ip2: Ipv4Addr = "192.168.213.2".parse().unwrap();
    let sync = |cat: &Catalog| {
        // h2 first: where endpoints appear; then h1, which learns of them.
        for (ns, host, ip, dir) in [(&h2, "h2", ip2, &d2), (&h1, "h1", ip1, &d1)] {
            let pass = pass_as(ns, cat, host, ip, dir);
            assert!(pass.errors.is_empty(), "{host}: {:?}", pass.errors);
        }
    };
    let a_ep = (a.clone(), "h1", "10.213.0.2", Mac::from_ip("10.213.0.2".parse().unwrap()));
    let b_ep = (b.clone(), "h2", "10.213.0.3", Mac::from_ip("10.213.0.3".parse().unwrap()));
    sync(&catalog_of(std::slice::from_ref(&a_ep)));
    // The client asks again only every 30 s, and gives up after one try: only an
    // announcement can answer it within the waits below.
    ok(&[
        "ip",
        "netns",
        "exec",
        &a,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.neigh.eth0.retrans_time_ms=30000",
    ]);
    ok(&["ip", "netns", "exec", &a, "sysctl", "-q", "-w", "net.ipv4.neigh.eth0.mcast_solicit=1"]);

    // 1. First contact: a pings b before h1 knows b; the ping's ARP gets no answer.
    let ping = Command::new("ip")
        .args(["netns", "exec", &a, "ping", "-c", "1", "-W", "20", "10.213.0.3"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    within(5, "a's ARP request for b to be pending", || {
        cached(&a, "10.213.0.3").is_some_and(|(_, s)| s.contains(&"INCOMPLETE".to_string()))
    });
    sync(&catalog_of(&[a_ep.clone(), b_ep.clone()]));
    let b_mac = b_ep.3.to_string();
    within(5, "a to learn b's MAC from h1's announcement", || {
        cached(&a, "10.213.0.3").is_some_and(|(mac, _)| mac.as_deref() == Some(b_mac.as_str()))
    });
    let status = ping.wait_with_output().unwrap().status;
    assert!(status.success(), "the first ping to b was answered");

    // 2. The address gets another MAC (an attachment from before MACs followed
    // addresses, replaced): a's cached entry is replaced at once.
    let old_mac = Mac::from_counter(77);
    let b_old = (b.clone(), "h2", "10.213.0.3", old_mac);
    sync(&catalog_of(&[a_ep.clone(), b_old]));
    within(5, "a to learn b's old MAC", || {
        cached(&a, "10.213.0.3").is_some_and(|(mac, _)| mac == Some(old_mac.to_string()))
    });
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "1", "-W", "2", "10.213.0.3"]);
    sync(&catalog_of(&[a_ep.clone(), b_ep.clone()]));
    within(5, "a to learn b's new MAC", || {
        cached(&a, "10.213.0.3").is_some_and(|(mac, _)| mac.as_deref() == Some(b_mac.as_str()))
    });
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "1", "-W", "2", "10.213.0.3"]);

    // 3. b removed from h2 and created again on h1 as c, with the same address (so the
    // same MAC): h1's bridge had learned that MAC behind its VXLAN port; c's own
    // announcement moves it to c's port, and a (whose cache is right) reaches c at once.
    let c_ep = (c.clone(), "h1", "10.213.0.3", b_ep.3);
    sync(&catalog_of(&[a_ep.clone(), c_ep]));
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "1", "-W", "2", "10.213.0.3"]);
    ok(&["ip", "netns", "exec", &c, "ping", "-c", "1", "-W", "2", "10.213.0.2"]);
}

#[test]
fn one_broken_namespace_or_route_does_not_hold_up_the_rest() {
    if !is_root() || !std::path::Path::new("/proc/self/ns/net").exists() {
        eprintln!("skipped: needs root and network namespaces");
        return;
    }
    let pid = std::process::id();
    let (h1, h2) = (format!("ovt{pid}rh1"), format!("ovt{pid}rh2"));
    let (a, b) = (format!("ovt{pid}ra"), format!("ovt{pid}rb"));
    let tmp = std::env::temp_dir();
    let d1 = tmp.join(format!("ovt{pid}rd1"));
    // Inside the data dir, so it goes with it.
    let stand_in = d1.join("not-a-namespace");
    let _lab = Lab {
        endpoints: vec![a.clone(), b.clone()],
        namespaces: vec![h1.clone(), h2.clone()],
        dirs: vec![d1.clone()],
    };
    underlay(&h1, &h2, &format!("ovt{pid}ru"));
    let ip1: Ipv4Addr = "192.168.213.1".parse().unwrap();
    let mac = |ip: &str| Mac::from_ip(ip.parse().unwrap());
    let mut cat = catalog_of(&[
        (a.clone(), "h1", "10.213.0.2", mac("10.213.0.2")),
        (b.clone(), "h1", "10.213.0.3", mac("10.213.0.3")),
    ]);
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, Reconciler::new());
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);

    // A route via b for a, but a hand-made route to the same destination is in the way.
    ok(&["ip", "-n", &a, "route", "add", "10.99.0.0/16", "dev", "eth0"]);
    let route = overlay_model::Route {
        network: "front".into(),
        destination: "10.99.0.0/16".parse().unwrap(),
        via: b.clone(),
    };
    cat.routes.insert(route.key(), route);
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    let failed: Vec<String> =
        pass.errors.iter().map(|e| format!("{}: {:#}", e.action, e.error)).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("AddRoute") && failed[0].contains("in the way"), "{failed:?}");
    assert_eq!(r.failing(), 1);
    // Right away again: not retried (backing off), nothing else to do.
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert!(pass.actions.is_empty() && pass.errors.is_empty(), "{:?}", pass.actions);
    assert_eq!(pass.deferred.len(), 1, "{:?}", pass.deferred);

    // a's namespace becomes unreadable (a plain file where the namespace was mounted):
    // left alone, while b's drift is still repaired in the same pass.
    ok(&["umount", &format!("/var/run/netns/{a}")]);
    std::fs::write(&stand_in, b"").unwrap();
    ok(&["mount", "--bind", stand_in.to_str().unwrap(), &format!("/var/run/netns/{a}")]);
    ok(&["ip", "-n", &b, "route", "del", "default"]);
    let (pass, _) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    assert_eq!(pass.actions.len(), 1, "{:?}", pass.actions);
    assert!(pass.actions[0].to_string().contains("AddRoute"), "{:?}", pass.actions);
    assert_eq!(pass.actions[0].netns(), Some(b.as_str()));
    let _ = Command::new("umount").arg(format!("/var/run/netns/{a}")).status();
}

/// `f` on a thread in namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: the fd is valid; only this thread changes namespace.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}

/// A [`Reconciler`] whose forwarding entries come from notifications of namespace `ns`
/// (as the agent's do), not from a dump every pass.
fn watching_reconciler(ns: &str) -> Reconciler {
    in_ns(ns, || Reconciler::with_entries(overlay_agent::entries::EntryWatch::open().unwrap()))
}

#[test]
fn entries_kept_from_notifications_see_drift_and_their_own_changes() {
    if !is_root() || !std::path::Path::new("/proc/self/ns/net").exists() {
        eprintln!("skipped: needs root and network namespaces");
        return;
    }
    let pid = std::process::id();
    let (h1, h2) = (format!("ovt{pid}wh1"), format!("ovt{pid}wh2"));
    let (a, b) = (format!("ovt{pid}wa"), format!("ovt{pid}wb"));
    let tmp = std::env::temp_dir();
    let (d1, d2) = (tmp.join(format!("ovt{pid}wd1")), tmp.join(format!("ovt{pid}wd2")));
    let _lab = Lab {
        endpoints: vec![a.clone(), b.clone()],
        namespaces: vec![h1.clone(), h2.clone()],
        dirs: vec![d1.clone(), d2.clone()],
    };
    underlay(&h1, &h2, &format!("ovt{pid}wu"));
    let ip1: Ipv4Addr = "192.168.213.1".parse().unwrap();
    let ip2: Ipv4Addr = "192.168.213.2".parse().unwrap();
    let cat = catalog_of(&[
        (a.clone(), "h1", "10.213.0.2", Mac::from_counter(1)),
        (b.clone(), "h2", "10.213.0.3", Mac::from_counter(2)),
    ]);
    let pass = pass_as(&h2, &cat, "h2", ip2, &d2);
    assert!(pass.errors.is_empty(), "h2: {:?}", pass.errors);
    let r = watching_reconciler(&h1);
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    // Its own changes, learnt from their notifications: nothing left to do.
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert_eq!((pass.actions, pass.applied), (vec![], 0));
    let dumps = r.entry_dumps();
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "1", "-W", "2", "10.213.0.3"]);

    // Drift: b's FDB entry and neighbour removed by hand come back on the next pass.
    let dev = "ovx-4213";
    let b_mac = "02:00:00:00:00:02";
    ok(&["bridge", "-n", &h1, "fdb", "del", b_mac, "dev", dev, "dst", "192.168.213.2"]);
    ok(&["ip", "-n", &h1, "neigh", "del", "10.213.0.3", "dev", dev]);
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    let fdb = overlay_agent::desired::Fdb { mac: Mac::from_counter(2), dst: ip2 };
    let neigh = overlay_agent::plan::Action::AddNeigh {
        dev: dev.into(),
        ip: "10.213.0.3".parse().unwrap(),
        mac: Mac::from_counter(2),
    };
    let add_fdb = overlay_agent::plan::Action::AddFdb { dev: dev.into(), entry: fdb };
    assert!(pass.actions.contains(&add_fdb) && pass.actions.contains(&neigh), "{:?}", pass.actions);
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert_eq!(pass.actions, vec![]);
    // All from notifications: not dumped again.
    assert_eq!(r.entry_dumps(), dumps);
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "1", "-W", "2", "10.213.0.3"]);

    // The ruleset's generation moves with any commit.
    let generation = || in_ns(&h1, overlay_agent::firewall::generation);
    let before = generation();
    assert!(before.is_some());
    assert_eq!(generation(), before);
    ok(&["ip", "netns", "exec", &h1, "nft", "add", "table", "inet", &format!("ovt{pid}")]);
    assert_ne!(generation(), before);

    // The firewall table deleted by hand: installed again (its generation changed),
    // and then left alone.
    ok(&["ip", "netns", "exec", &h1, "nft", "delete", "table", "inet", "overlay"]);
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert_eq!(pass.applied, 1, "{:?}", pass.actions);
    assert!(pass.firewall.is_ok(), "{:?}", pass.firewall);
    ok(&["ip", "netns", "exec", &h1, "nft", "list", "table", "inet", "overlay"]);
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert_eq!(pass.applied, 0, "{:?}", pass.actions);

    // The vxlan device deleted (its entries go with it): recreated with every entry.
    ok(&["ip", "-n", &h1, "link", "del", dev]);
    let (pass, r) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert!(pass.errors.is_empty(), "{:?}", pass.errors);
    assert!(pass.actions.contains(&add_fdb) && pass.actions.contains(&neigh), "{:?}", pass.actions);
    let (pass, _) = pass_with(&h1, &cat, "h1", ip1, &d1, r);
    assert_eq!(pass.actions, vec![]);
    // A plain pass (every entry dumped) agrees.
    assert_eq!(pass_as(&h1, &cat, "h1", ip1, &d1).actions, vec![]);
    ok(&["ip", "netns", "exec", &a, "ping", "-c", "1", "-W", "2", "10.213.0.3"]);
}
