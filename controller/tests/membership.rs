//! Multi-process tests of membership changes: real `overlay-controller` processes on
//! loopback, a member started with `--join` and added, members removed (the leader
//! too), a SIGKILLed member replaced, all under a continuous write load.
//!
//! What they hold the cluster to: every acknowledged write is on every member
//! afterwards and members converge; replacing a dead member of three fails no write;
//! changes that would lose quorum are refused with an error naming the members; a
//! member restarted later knows every member's address from its own data dir.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create_endpoint_request, timed, write_load, Cluster, WriteLoad};
use overlay_proto::pb;
use tonic::Code;

const QUIET: [&str; 2] = ["--host-down-after-ms", "600000"];
const ELECTION: Duration = Duration::from_secs(15);
const CONVERGE: Duration = Duration::from_secs(30);

async fn setup(cluster: &Cluster) {
    cluster.wait_leader(ELECTION).await;
    cluster.register_host("h1", "192.0.2.1").await;
    cluster.create_network("net", "10.8.0.0/16").await;
}

/// `cluster member add` through member `via`.
async fn add_member(
    cluster: &Cluster,
    via: u64,
    id: u64,
    address: &str,
) -> Result<pb::MemberChangeResponse, tonic::Status> {
    let mut c = cluster.client(via);
    timed(c.add_member(pb::AddMemberRequest { id, address: address.into() }))
        .await
        .map(|r| r.into_inner())
}

async fn remove_member(
    cluster: &Cluster,
    via: u64,
    id: u64,
) -> Result<pb::MemberChangeResponse, tonic::Status> {
    let mut c = cluster.client(via);
    timed(c.remove_member(pb::RemoveMemberRequest { id })).await.map(|r| r.into_inner())
}

/// Waits (bounded) until the cluster status lists exactly `voters` as voters, all
/// reachable, with a leader whose progress shows each caught up.
async fn wait_voters(cluster: &Cluster, voters: &[u64]) -> pb::ClusterStatusResponse {
    let want: BTreeSet<u64> = voters.iter().copied().collect();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let s = cluster.status().await;
        if let Some(s) = &s {
            let got: BTreeSet<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
            let commit = s.members.iter().map(|m| m.commit_index).max().unwrap_or(0);
            let caught_up = s.members.iter().all(|m| m.reachable && m.matched + 64 >= commit);
            if got == want && s.members.len() == want.len() && s.leader != 0 && caught_up {
                return s.clone();
            }
        }
        assert!(Instant::now() < deadline, "voters never became {want:?}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every acknowledged write is on member `id`, read linearizably there.
async fn check_acked(cluster: &Cluster, id: u64, acked: &[String]) {
    let list = cluster.endpoints(id).await;
    let names: BTreeSet<&str> = list.endpoints.iter().map(|e| e.name.as_str()).collect();
    let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "member {id} lacks acknowledged writes {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_and_members_leave_under_write_load() {
    let mut cluster = Cluster::start(3, &QUIET);
    setup(&cluster).await;
    let urls = Arc::new(Mutex::new(cluster.urls()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(WriteLoad::default()));
    let task =
        write_load(cluster.dialer().clone(), urls.clone(), "load", stop.clone(), load.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Member 4 starts first and waits quietly to be added; then it is added.
    let addr4 = cluster.new_joiner(4, &QUIET);
    cluster.restart(4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let added = add_member(&cluster, 1, 4, &addr4.to_string()).await.expect("add member 4");
    assert_eq!(added.address, addr4.to_string());
    assert!(added.members.iter().any(|m| m.id == 4), "{added:?}");
    let status = wait_voters(&cluster, &[1, 2, 3, 4]).await;
    assert!(status.members.iter().any(|m| m.id == 4 && m.address == addr4.to_string()));
    urls.lock().unwrap_or_else(|p| p.into_inner()).push(cluster.url(4));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The leader leaves (leadership moves first), through a member that is not it.
    let leader = cluster.wait_leader(ELECTION).await;
    let via = cluster.ids().into_iter().find(|&id| id != leader).expect("another member");
    let removed = remove_member(&cluster, via, leader).await.expect("remove the leader");
    assert!(removed.members.iter().all(|m| m.id != leader), "{removed:?}");
    urls.lock().unwrap_or_else(|p| p.into_inner()).retain(|u| *u != cluster.url(leader));
    cluster.forget(leader);
    let remaining: Vec<u64> = cluster.ids();
    wait_voters(&cluster, &remaining).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::SeqCst);
    task.await.expect("writer");
    let load = std::mem::take(&mut *load.lock().unwrap_or_else(|p| p.into_inner()));
    assert!(load.acked.len() > 20, "only {} writes acknowledged", load.acked.len());
    eprintln!(
        "{} writes acknowledged, {} failed: {:?}",
        load.acked.len(),
        load.failures.len(),
        load.failures
    );
    cluster.wait_converged(CONVERGE).await;
    for id in cluster.ids() {
        check_acked(&cluster, id, &load.acked).await;
    }

    // The joined member, restarted, knows every member from its own data dir.
    cluster.kill(4);
    cluster.restart(4);
    let status = wait_voters(&cluster, &remaining).await;
    let mut c = cluster.client(4);
    let own =
        timed(c.cluster_status(pb::ClusterStatusRequest {})).await.expect("status").into_inner();
    let addresses: BTreeMap<u64, String> =
        own.members.iter().map(|m| (m.id, m.address.clone())).collect();
    let expected: BTreeMap<u64, String> =
        status.members.iter().map(|m| (m.id, m.address.clone())).collect();
    assert_eq!(addresses, expected);
    cluster.wait_converged(CONVERGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_sigkilled_member_fails_no_write() {
    let mut cluster = Cluster::start(3, &QUIET);
    setup(&cluster).await;
    let leader = cluster.wait_leader(ELECTION).await;
    let dead = cluster.ids().into_iter().find(|&id| id != leader).expect("a follower");
    let alive: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != dead).collect();
    let urls = Arc::new(Mutex::new(alive.iter().map(|&id| cluster.url(id)).collect::<Vec<_>>()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(WriteLoad::default()));
    let task =
        write_load(cluster.dialer().clone(), urls.clone(), "load", stop.clone(), load.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    cluster.kill(dead);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Growing while one of three is dead would need 3 of 4 reachable: refused, naming it.
    let addr4 = cluster.new_joiner(4, &QUIET);
    let refused = add_member(&cluster, alive[0], 4, &addr4.to_string()).await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains(&format!("unreachable: {dead}, 4")),
        "unclear refusal: {}",
        refused.message()
    );
    // Nor may the live follower go: one of the two left would be unreachable.
    let other = *alive.iter().find(|&&id| id != leader).expect("live follower");
    let refused = remove_member(&cluster, leader, other).await.expect_err("refused");
    assert!(refused.message().contains(&format!("unreachable: {dead}")), "{}", refused.message());

    // The replacement: remove the dead member, add a new one started with --join.
    remove_member(&cluster, alive[1], dead).await.expect("remove the dead member");
    cluster.forget(dead);
    cluster.restart(4);
    add_member(&cluster, alive[0], 4, &addr4.to_string()).await.expect("add member 4");
    let mut voters = alive.clone();
    voters.push(4);
    wait_voters(&cluster, &voters).await;
    urls.lock().unwrap_or_else(|p| p.into_inner()).push(cluster.url(4));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A removed id never comes back.
    let reused = add_member(&cluster, 4, dead, "127.0.0.1:1").await.expect_err("refused");
    assert!(reused.message().contains("never reused"), "{}", reused.message());

    stop.store(true, Ordering::SeqCst);
    task.await.expect("writer");
    let load = std::mem::take(&mut *load.lock().unwrap_or_else(|p| p.into_inner()));
    assert!(load.failures.is_empty(), "writes failed during the replacement: {:?}", load.failures);
    assert!(load.acked.len() > 20, "only {} writes acknowledged", load.acked.len());
    assert!(load.longest_gap < Duration::from_secs(5), "writes stalled for {:?}", load.longest_gap);
    cluster.wait_converged(CONVERGE).await;
    for id in cluster.ids() {
        check_acked(&cluster, id, &load.acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_member_grows_to_three() {
    let mut cluster = Cluster::start(1, &QUIET);
    setup(&cluster).await;
    let addr2 = cluster.new_joiner(2, &QUIET);
    // Two voters need both: refused while member 2 does not run yet.
    let refused = add_member(&cluster, 1, 2, &addr2.to_string()).await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("unreachable: 2"), "{}", refused.message());
    cluster.restart(2);
    add_member(&cluster, 1, 2, &addr2.to_string()).await.expect("add member 2");
    wait_voters(&cluster, &[1, 2]).await;

    let addr3 = cluster.new_joiner(3, &QUIET);
    cluster.restart(3);
    // The address answers as member 3: adding it under another id is refused.
    let wrong = add_member(&cluster, 2, 9, &addr3.to_string()).await.expect_err("refused");
    assert!(wrong.message().contains("is member 3, not 9"), "{}", wrong.message());
    add_member(&cluster, 2, 3, &addr3.to_string()).await.expect("add member 3");
    wait_voters(&cluster, &[1, 2, 3]).await;

    // Now any one member may fail.
    let names: Vec<String> = (0..5).map(|i| format!("grown{i}")).collect();
    for name in &names {
        cluster
            .write_any(|mut c| {
                let req = create_endpoint_request(name, "h1", "net");
                async move { c.create_endpoint(req).await.map(|r| r.into_inner()) }
            })
            .await
            .expect("write");
    }
    let leader = cluster.wait_leader(ELECTION).await;
    cluster.kill(leader);
    cluster.wait_leader(ELECTION).await;
    cluster.wait_converged(CONVERGE).await;
    for id in cluster.running() {
        check_acked(&cluster, id, &names).await;
    }
}
