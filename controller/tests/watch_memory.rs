//! Regression guard for issue 14 (not a timed test): watch streams share the catalog's
//! encoded form instead of each holding a copy. 200 streams over 10,000 endpoints must
//! keep a member's peak memory (VmHWM) under a fixed bound. When every stream held its
//! own copy, issue 14 measured about 2.5 MiB per watcher at this catalog size, which
//! for 200 streams is about 500 MiB on top of the catalog.
//! Also checks what each stream received: a host's per-host stream carries whole only
//! what its host wants and every other endpoint by name (its DNS answers for every
//! overlay name); a stream without a host carries the whole catalog.

mod common;

use std::time::Duration;

use common::{create_endpoint_request, timed, Cluster};
use overlay_proto::pb;

const ENDPOINTS: usize = 10_000;
const STREAMS: usize = 200;
/// A member's peak resident memory may not exceed this (MiB). Measured 83 MiB with a
/// debug build; the copies this guards against add about 2.5 MiB per stream.
const BOUND_MIB: u64 = 250;

fn vm_hwm_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("kB");
    kib / 1024
}

/// (Whole endpoints, endpoints by name) of a stream's snapshot (it must start with one).
async fn snapshot_counts(stream: &mut tonic::Streaming<pb::WatchResponse>) -> (usize, usize) {
    let (mut whole, mut named) = (0, 0);
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("a snapshot message within 60 s")
            .expect("stream ok")
            .expect("stream open");
        for c in &m.changes {
            match &c.kind {
                Some(pb::change::Kind::PutEndpoint(_)) => whole += 1,
                Some(pb::change::Kind::PutNames(n)) => {
                    named += overlay_proto::convert::unpack_names(n).expect("names").len()
                }
                _ => {}
            }
        }
        if m.snapshot_done {
            return (whole, named);
        }
    }
}

async fn snapshot_endpoints(stream: &mut tonic::Streaming<pb::WatchResponse>) -> usize {
    snapshot_counts(stream).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_share_one_catalog() {
    // Plaintext: the per-certificate watch limit is not what this test is about.
    let cluster = Cluster::start_insecure(1, &["--host-down-after-ms", "600000"]);
    cluster.wait_leader(Duration::from_secs(15)).await;
    cluster.register_host("h1", "192.0.2.1").await;
    cluster.register_host("h2", "192.0.2.2").await;
    cluster.create_network("big", "10.60.0.0/16").await;
    cluster.create_network("small", "10.61.0.0/24").await;
    let client = cluster.client(1);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let c = client.clone();
        tasks.spawn(async move {
            for i in (w..ENDPOINTS).step_by(16) {
                let mut c = c.clone();
                let req = create_endpoint_request(&format!("e{i}"), "h1", "big");
                timed(c.create_endpoint(req)).await.expect("create endpoint");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("creator");
    }
    let mut c = client.clone();
    let req = create_endpoint_request("lone", "h2", "small");
    timed(c.create_endpoint(req)).await.expect("create endpoint");

    // h2 carries only "small": it receives its endpoint whole and every other by name
    // (DNS needs every name); an older agent's request (no per_host) gets everything.
    let mut c = client.clone();
    let per_host = pb::WatchRequest { host: "h2".into(), per_host: true, ..Default::default() };
    let mut h2 = c.watch(per_host).await.expect("watch").into_inner();
    assert_eq!(snapshot_counts(&mut h2).await, (1, ENDPOINTS), "h2: its own whole, names");
    let mut old = c
        .watch(pb::WatchRequest { host: "h2".into(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(snapshot_endpoints(&mut old).await, ENDPOINTS + 1, "without per_host: all");

    // 200 streams of everything, read to the end of their snapshots (all at once: they
    // share one connection's flow-control window) and held open.
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let mut c = client.clone();
        readers.spawn(async move {
            let mut s = c.watch(pb::WatchRequest::default()).await.expect("watch").into_inner();
            let n = snapshot_endpoints(&mut s).await;
            (n, s)
        });
    }
    let mut streams = Vec::new();
    while let Some(r) = readers.join_next().await {
        let (n, s) = r.expect("reader");
        assert_eq!(n, ENDPOINTS + 1);
        streams.push(s);
    }
    let pid = cluster.member(1).pid().expect("member running");
    let peak = vm_hwm_mib(pid);
    eprintln!("member peak RSS with {STREAMS} streams over {ENDPOINTS} endpoints: {peak} MiB");
    assert!(peak <= BOUND_MIB, "peak RSS {peak} MiB > {BOUND_MIB} MiB");
    drop(streams);
}
