//! A rolling upgrade of a 3-member cluster, as an operator does it: one member at a
//! time, `systemctl restart` (SIGTERM, then start) onto a new binary, waiting until the
//! member is back in step before the next, the leader included, while a client writes
//! continuously. The "new" binary is a copy of the built one at another path (what the
//! procedure exercises is the restart, not a format change; the snapshot format's own
//! upgrade path is tested in the raft storage tests).
//!
//! What it holds the cluster to: every acknowledged write is on every member at the
//! end, writes keep being acknowledged while each member restarts, and each member ends
//! up running the new binary.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{write_load, Cluster, WriteLoad, BIN};

const QUIET: [&str; 2] = ["--host-down-after-ms", "600000"];
const ELECTION: Duration = Duration::from_secs(15);
const CONVERGE: Duration = Duration::from_secs(30);

fn acked(load: &Mutex<WriteLoad>) -> usize {
    load.lock().unwrap_or_else(|p| p.into_inner()).acked.len()
}

/// Waits (bounded) until all three members are voters, reachable and caught up.
async fn wait_in_step(cluster: &Cluster) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        if let Some(s) = cluster.status().await {
            let commit = s.members.iter().map(|m| m.commit_index).max().unwrap_or(0);
            let voters: BTreeSet<u64> =
                s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
            let in_step = s.members.iter().all(|m| m.reachable && m.matched + 64 >= commit);
            if voters == BTreeSet::from([1, 2, 3]) && s.leader != 0 && in_step {
                return;
            }
        }
        assert!(Instant::now() < deadline, "members not back in step within {CONVERGE:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_under_write_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, &QUIET);
    cluster.wait_leader(ELECTION).await;
    cluster.register_host("h1", "192.0.2.1").await;
    cluster.create_network("net", "10.9.0.0/16").await;
    let next = cluster.data_dir().join("overlay-controller-next");
    std::fs::copy(BIN, &next).expect("copy the binary");

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(WriteLoad::default()));
    let urls = Arc::new(Mutex::new(cluster.urls()));
    let task = write_load(cluster.dialer().clone(), urls, "w", stop.clone(), load.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Followers first, the leader last (leadership moves once, at the end), as the
    // README's procedure says.
    let leader = cluster.wait_leader(ELECTION).await;
    let mut order: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != leader).collect();
    order.push(leader);
    for id in order {
        let before = acked(&load);
        cluster.stop(id);
        cluster.restart_on(id, &next);
        wait_in_step(&cluster).await;
        // The cluster kept taking writes around this member's restart.
        let deadline = Instant::now() + CONVERGE;
        while acked(&load) < before + 5 {
            assert!(Instant::now() < deadline, "writes stalled after restarting member {id}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = cluster.member(id).pid().expect("running");
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        assert_eq!(exe, next, "member {id} runs the new binary");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    task.await.expect("writer");
    let load = std::mem::take(&mut *load.lock().unwrap_or_else(|p| p.into_inner()));
    eprintln!(
        "{} writes acknowledged, {} failed during the upgrade: {:?}",
        load.acked.len(),
        load.failures.len(),
        load.failures
    );
    assert!(load.acked.len() > 30, "only {} writes acknowledged", load.acked.len());

    cluster.wait_converged(CONVERGE).await;
    for id in cluster.ids() {
        let list = cluster.endpoints(id).await;
        let names: BTreeSet<&str> = list.endpoints.iter().map(|e| e.name.as_str()).collect();
        let missing: Vec<&String> =
            load.acked.iter().filter(|n| !names.contains(n.as_str())).collect();
        assert!(missing.is_empty(), "member {id} lacks acknowledged writes {missing:?}");
    }
    assert!(Path::new(&next).exists());
}
