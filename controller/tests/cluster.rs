//! Multi-process tests of the controller cluster: real `overlay-controller` processes on
//! loopback, SIGKILLed, restarted and wiped underneath concurrent gRPC clients.
//!
//! What they hold the cluster to: an acknowledged write is never lost or applied twice,
//! members converge to the same revision and state digest, a member that lost its disk
//! rejoins (from a snapshot when the log was compacted), a minority cannot write and
//! says so, watch streams have no gaps or duplicates across members, and host liveness
//! follows heartbeats.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client_for, create_endpoint_request, is_retryable, timed, Client, Cluster};
use overlay_model::{Catalog, Change};
use overlay_proto::pb;
use tonic::Code;

/// Liveness transitions are writes too; keep them out of tests that count revisions.
const QUIET: [&str; 2] = ["--host-down-after-ms", "600000"];
const ELECTION: Duration = Duration::from_secs(15);
const CONVERGE: Duration = Duration::from_secs(30);

/// What a create that was retried across members ended as.
enum Created {
    /// Acknowledged with this endpoint.
    Acked(pb::Endpoint),
    /// A retry found it present: an attempt whose outcome was unknown did apply.
    Existed,
}

/// The failed attempts before a create succeeded, as `Code: message`.
type Failures = Vec<String>;

/// Creates one endpoint, starting at `clients[0]` and moving to the next member on
/// Unavailable/DeadlineExceeded. AlreadyExists is fine only after such a failure.
async fn create_retrying(
    clients: &[Client],
    req: &pb::CreateEndpointRequest,
) -> (Created, Failures) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut failures = Vec::new();
    let mut i = 0;
    loop {
        let mut c = clients[i % clients.len()].clone();
        match timed(c.create_endpoint(req.clone())).await {
            Ok(r) => return (Created::Acked(r.into_inner()), failures),
            Err(s) if s.code() == Code::AlreadyExists && !failures.is_empty() => {
                return (Created::Existed, failures)
            }
            Err(s) if is_retryable(&s) && Instant::now() < deadline => {
                failures.push(format!("{:?}: {}", s.code(), s.message()));
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("create {} failed: {s:?} after {failures:?}", req.name),
        }
    }
}

/// Creates `names` sequentially, each through the next client in turn (bounded retries).
async fn create_all(clients: &[Client], names: impl IntoIterator<Item = String>) {
    for (i, name) in names.into_iter().enumerate() {
        let k = i % clients.len();
        let rotated: Vec<Client> = clients[k..].iter().chain(&clients[..k]).cloned().collect();
        create_retrying(&rotated, &create_endpoint_request(&name, "h1", "net")).await;
    }
}

/// Creates `names` with 8 concurrent tasks, each through all members in turn.
async fn create_concurrently(clients: &[Client], names: Vec<String>) {
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let clients = clients.to_vec();
            let mine: Vec<String> = names.iter().skip(t).step_by(8).cloned().collect();
            tokio::spawn(async move { create_all(&clients, mine).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("create task");
    }
}

/// Checks the invariants of an endpoint list: names unique and exactly `expected`,
/// one attachment each, no IP or MAC handed out twice. Returns endpoints by name.
fn check_endpoints(
    list: &pb::EndpointList,
    expected: &BTreeSet<String>,
) -> BTreeMap<String, pb::Endpoint> {
    let mut by_name = BTreeMap::new();
    let mut ips = BTreeSet::new();
    let mut macs = BTreeSet::new();
    for e in &list.endpoints {
        assert!(by_name.insert(e.name.clone(), e.clone()).is_none(), "{} listed twice", e.name);
        assert_eq!(e.attachments.len(), 1, "{e:?}");
        for a in &e.attachments {
            assert!(ips.insert((a.network.clone(), a.ip.clone())), "IP {} given twice", a.ip);
            assert!(macs.insert(a.mac.clone()), "MAC {} given twice", a.mac);
        }
    }
    let names: BTreeSet<String> = by_name.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&names).collect();
    let extra: Vec<_> = names.difference(expected).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, unexpected {extra:?}");
    by_name
}

async fn setup(cluster: &Cluster, subnet: &str) {
    cluster.wait_leader(ELECTION).await;
    cluster.register_host("h1", "192.0.2.1").await;
    cluster.create_network("net", subnet).await;
}

fn clients(cluster: &Cluster) -> Vec<Client> {
    cluster.ids().into_iter().map(|id| cluster.client(id)).collect()
}

/// a. 8 clients create endpoints through all three members while the leader is
/// SIGKILLed and restarted; nothing acknowledged is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_survive_leader_kill_and_restart() {
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 40;
    let mut cluster = Cluster::start(3, &QUIET);
    setup(&cluster, "10.1.0.0/16").await;

    let acked = Arc::new(AtomicUsize::new(0));
    let urls = cluster.urls();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let acked = acked.clone();
            let clients: Vec<Client> = (0..urls.len())
                .map(|k| client_for(cluster.dialer(), &urls[(c + k) % urls.len()]))
                .collect();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..PER_CLIENT {
                    let req = create_endpoint_request(&format!("ep-{c}-{i}"), "h1", "net");
                    let (created, failures) = create_retrying(&clients, &req).await;
                    acked.fetch_add(1, Ordering::SeqCst);
                    out.push((req.name, created, failures));
                }
                out
            })
        })
        .collect();

    // Mid-stream: SIGKILL the leader, bring it back from its data dir a second later.
    let until = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::SeqCst) < CLIENTS * PER_CLIENT / 4 {
        assert!(Instant::now() < until, "writes did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leader = cluster.wait_leader(ELECTION).await;
    let at_kill = acked.load(Ordering::SeqCst);
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.restart(leader);
    let at_restart = acked.load(Ordering::SeqCst);

    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.expect("client task"));
    }
    assert!(at_kill < CLIENTS * PER_CLIENT, "the leader died only after all writes");
    let existed = results.iter().filter(|(_, c, _)| matches!(c, Created::Existed)).count();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for f in results.iter().flat_map(|(_, _, f)| f) {
        *seen.entry(f.as_str()).or_default() += 1;
    }
    eprintln!(
        "killed leader {leader} at {at_kill} acks, restarted at {at_restart}; \
         {existed} creates found present on retry; failed attempts: {seen:#?}"
    );

    let view = cluster.wait_converged(CONVERGE).await;
    let expected: BTreeSet<String> = results.iter().map(|(n, _, _)| n.clone()).collect();
    for id in cluster.ids() {
        let list = cluster.endpoints(id).await;
        assert_eq!(list.revision, view.revision, "member {id}");
        let by_name = check_endpoints(&list, &expected);
        // What each acknowledgement said is what the cluster holds.
        for (name, created, _) in &results {
            if let Created::Acked(e) = created {
                assert_eq!(&by_name[name], e, "member {id} holds another {name}");
            }
        }
    }
}

/// b. A follower loses its disk: it rejoins, catches up and the cluster keeps writing.
/// Returns the cluster and the wiped member.
async fn wiped_follower_rejoins(extra: &[&str], before: usize) -> (Cluster, u64) {
    let mut cluster = Cluster::start(3, extra);
    setup(&cluster, "10.2.0.0/16").await;
    let leader = cluster.wait_leader(ELECTION).await;
    // One client, one write at a time: one raft entry per write.
    create_all(&[cluster.client(leader)], (0..before).map(|i| format!("a{i}"))).await;
    let follower = *cluster.ids().iter().find(|&&id| id != leader).expect("a follower");
    cluster.kill(follower);
    cluster.wipe(follower);
    cluster.restart(follower);

    // Writes through every member, the rejoining one included, while it catches up.
    let all = clients(&cluster);
    create_all(&all, (0..30).map(|i| format!("b{i}"))).await;

    let view = cluster.wait_converged(CONVERGE).await;
    let expected: BTreeSet<String> =
        (0..before).map(|i| format!("a{i}")).chain((0..30).map(|i| format!("b{i}"))).collect();
    let list = cluster.endpoints(follower).await;
    assert_eq!(list.revision, view.revision);
    check_endpoints(&list, &expected);
    (cluster, follower)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_follower_catches_up_from_a_members_snapshot() {
    // It starts from another member's snapshot of the applied state (which carries the
    // membership) and votes again only once caught up.
    let (cluster, follower) = wiped_follower_rejoins(&QUIET, 40).await;
    let log = cluster.log(follower);
    assert!(log.contains("starting from a snapshot of the cluster"), "{log}");
    assert!(log.contains("caught up from the leader: voting again"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_follower_catches_up_from_a_snapshot() {
    // The leader keeps 1,000 entries behind its snapshot for slow followers, so a wiped
    // member needs a snapshot only once more than that were compacted away.
    let extra = ["--snapshot-every", "50", QUIET[0], QUIET[1]];
    let (cluster, follower) = wiped_follower_rejoins(&extra, 1_100).await;
    let log = cluster.log(follower);
    assert!(
        log.contains("installed snapshot from the leader")
            || log.contains("starting from a snapshot of the cluster"),
        "member {follower} caught up without a snapshot:\n{}",
        cluster.log_tail(follower, 40)
    );
    let status = cluster.status().await.expect("cluster status");
    for m in &status.members {
        assert!(m.snapshot_index > 0, "member {} has not snapshotted: {m:?}", m.id);
    }
}

/// c. A standalone controller SIGKILLed mid-write keeps every acknowledged write, also
/// across log compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_member_survives_sigkill_and_compaction() {
    let mut cluster = Cluster::start(1, &QUIET);
    setup(&cluster, "10.3.0.0/16").await;

    // Four writers; SIGKILL after 100 acknowledgements while they are still writing.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut c = cluster.client(1);
            let (stop, acked) = (stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let req = create_endpoint_request(&format!("w{w}-{i}"), "h1", "net");
                    match timed(c.create_endpoint(req)).await {
                        Ok(r) => done.push(r.into_inner()),
                        Err(_) => break,
                    }
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                done
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::SeqCst) < 100 {
        assert!(Instant::now() < until, "100 writes took over 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill(1);
    stop.store(true, Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.extend(w.await.expect("writer"));
    }

    let compact = ["--snapshot-every", "20", QUIET[0], QUIET[1]];
    cluster.restart_with(1, &compact);
    cluster.wait_leader(ELECTION).await;
    let list = cluster.endpoints(1).await;
    let held: BTreeMap<&str, &pb::Endpoint> =
        list.endpoints.iter().map(|e| (e.name.as_str(), e)).collect();
    for e in &acknowledged {
        assert_eq!(held.get(e.name.as_str()), Some(&e), "acknowledged {} lost", e.name);
    }

    // 100 more writes with a snapshot every 20 entries, then SIGKILL again.
    create_all(&[cluster.client(1)], (0..100).map(|i| format!("c{i}"))).await;
    let before = cluster.wait_converged(CONVERGE).await;
    let list_before = cluster.endpoints(1).await;
    assert!(before.snapshot_index > 0, "no snapshot taken: {before:?}");
    assert!(cluster.log(1).contains("log compacted"));
    cluster.kill(1);
    cluster.restart(1);
    cluster.wait_leader(ELECTION).await;
    let after = cluster.wait_converged(CONVERGE).await;
    assert_eq!((after.revision, &after.digest), (before.revision, &before.digest));
    assert!(after.snapshot_index > 0);
    assert_eq!(cluster.endpoints(1).await, list_before);
    // And it still writes.
    create_all(&[cluster.client(1)], ["after-restart".to_string()]).await;
}

/// d. One of three down: writes go on through either survivor. Two down: a write fails
/// with Unavailable that says why, in bounded time; local reads still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_loss_keeps_writing_majority_loss_fails_clearly() {
    let mut cluster = Cluster::start(3, &QUIET);
    setup(&cluster, "10.4.0.0/16").await;
    let leader = cluster.wait_leader(ELECTION).await;
    cluster.kill(leader);
    let survivors = cluster.running();
    for &id in &survivors {
        // Only this member, retried while the survivors elect a new leader.
        create_all(&[cluster.client(id)], [format!("via-{id}")]).await;
    }
    let expected: BTreeSet<String> = survivors.iter().map(|id| format!("via-{id}")).collect();
    check_endpoints(&cluster.endpoints(survivors[0]).await, &expected);

    let new_leader = cluster.wait_leader(ELECTION).await;
    cluster.kill(new_leader);
    let last = cluster.running()[0];
    let mut c = cluster.client(last);
    let started = Instant::now();
    let req = create_endpoint_request("lost", "h1", "net");
    let result = tokio::time::timeout(Duration::from_secs(15), c.create_endpoint(req)).await;
    let elapsed = started.elapsed();
    let status = match result {
        Err(_) => panic!("write without a majority still pending after {elapsed:?}"),
        Ok(Ok(e)) => panic!("write without a majority succeeded: {e:?}"),
        Ok(Err(s)) => s,
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?} after {elapsed:?}");
    assert!(status.message().contains("majority"), "unclear error: {:?}", status.message());
    eprintln!("minority write failed after {elapsed:?}: {}", status.message());

    let local = timed(c.list_endpoints(pb::ListEndpointsRequest {
        consistency: pb::ReadConsistency::Local as i32,
    }))
    .await
    .expect("local read on a minority");
    check_endpoints(&local.into_inner(), &expected);
}

/// Reads one watch message (bounded).
async fn next(stream: &mut tonic::Streaming<pb::WatchResponse>) -> pb::WatchResponse {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(m))) => m,
        other => panic!("watch stream: {other:?}"),
    }
}

/// Applies incremental messages until the catalog reaches `revision`. A message carries
/// the next revision or a later one (revisions that waited for the stream come
/// together; the messages before the last of such a group carry the revision the
/// watcher already has), never an earlier one; gaps show as a replica that differs from
/// ListEndpoints.
async fn follow_until(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
    catalog: &mut Catalog,
    revision: u64,
) {
    while catalog.revision < revision {
        let m = next(stream).await;
        assert!(!m.reset && !m.snapshot_done, "unexpected snapshot at {}", m.revision);
        assert!(
            m.revision >= catalog.revision,
            "went back: {} after {}",
            m.revision,
            catalog.revision
        );
        assert!(
            m.revision > catalog.revision || !m.changes.is_empty(),
            "an empty message that moves nothing at {}",
            m.revision
        );
        for c in &m.changes {
            catalog.apply_change(&Change::try_from(c).expect("valid change"));
        }
        catalog.revision = m.revision;
    }
}

fn endpoints_of(list: &pb::EndpointList) -> BTreeMap<String, overlay_model::Endpoint> {
    list.endpoints
        .iter()
        .map(|e| (e.name.clone(), overlay_model::Endpoint::try_from(e).expect("valid endpoint")))
        .collect()
}

/// e. Watch: snapshot then ordered changes; resuming on another member from the last
/// revision gives exactly the missing ones; the replica equals ListEndpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_on_another_member_without_gaps() {
    let cluster = Cluster::start(3, &QUIET);
    setup(&cluster, "10.5.0.0/16").await;
    let all = clients(&cluster);
    // More than one snapshot chunk (512 changes) for the first watcher.
    create_concurrently(&all, (0..600).map(|i| format!("s{i}")).collect()).await;

    let mut first = cluster.client(1);
    let watch =
        |from_revision| pb::WatchRequest { host: "h1".into(), from_revision, ..Default::default() };
    let mut stream = first.watch(watch(0)).await.expect("watch").into_inner();
    let mut catalog = Catalog::default();
    let head = next(&mut stream).await;
    assert!(head.reset, "a watch from 0 starts with a reset");
    let snapshot_revision = head.revision;
    let mut m = head;
    let mut chunks = 1;
    loop {
        assert_eq!(m.revision, snapshot_revision, "revision moved mid-snapshot");
        for c in &m.changes {
            catalog.apply_change(&Change::try_from(c).expect("valid change"));
        }
        catalog.revision = m.revision;
        if m.snapshot_done {
            break;
        }
        m = next(&mut stream).await;
        assert!(!m.reset, "reset in the middle of a snapshot");
        chunks += 1;
    }
    assert!(chunks > 1, "600 endpoints fit one snapshot message");
    assert_eq!(catalog.endpoints.len(), 600);

    // Live changes: creates and removes through other members.
    create_all(&all[1..], (0..20).map(|i| format!("l{i}"))).await;
    for i in 0..5 {
        let mut c = all[2].clone();
        timed(c.remove_endpoint(pb::NameRequest { name: format!("s{i}") })).await.expect("remove");
    }
    let revision = cluster.endpoints(2).await.revision;
    follow_until(&mut stream, &mut catalog, revision).await;
    drop(stream);

    // Missed while disconnected, then resumed on member 3 from the last revision.
    create_all(&all[..1], (0..20).map(|i| format!("m{i}"))).await;
    let mut c = all[0].clone();
    timed(c.remove_endpoint(pb::NameRequest { name: "l0".into() })).await.expect("remove");
    let list = cluster.endpoints(1).await;
    let mut third = cluster.client(3);
    let mut stream = third.watch(watch(catalog.revision)).await.expect("watch").into_inner();
    follow_until(&mut stream, &mut catalog, list.revision).await;
    assert_eq!(catalog.endpoints, endpoints_of(&list));
    assert_eq!(catalog.endpoints.len(), 600 - 5 + 20 - 1 + 20);

    // Still live after the resume.
    create_all(&all[..1], ["tail".to_string()]).await;
    let list = cluster.endpoints(3).await;
    follow_until(&mut stream, &mut catalog, list.revision).await;
    assert_eq!(catalog.endpoints, endpoints_of(&list));
}

async fn host_status(cluster: &Cluster, id: u64) -> String {
    let mut c = cluster.client(id);
    let list = timed(c.list_hosts(pb::ListHostsRequest { consistency: 0 }))
        .await
        .expect("list hosts")
        .into_inner();
    list.hosts.iter().find(|h| h.name == "h1").map(|h| h.status.clone()).expect("host h1")
}

/// Heartbeats for `h1` every 300 ms, round robin over the members, until `stop`.
fn heartbeats(cluster: &Cluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let all = clients(cluster);
    tokio::spawn(async move {
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            let mut c = all[i % all.len()].clone();
            let _ = timed(
                c.heartbeat(pb::HeartbeatRequest { host: "h1".into(), ..Default::default() }),
            )
            .await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// f. Host liveness: ready while heartbeating, down soon after they stop, ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_goes_down_without_heartbeats_and_comes_back() {
    const DOWN_AFTER: Duration = Duration::from_millis(1500);
    let cluster = Cluster::start(3, &["--host-down-after-ms", "1500"]);
    cluster.wait_leader(ELECTION).await;
    cluster.register_host("h1", "192.0.2.1").await;

    let stop = Arc::new(AtomicBool::new(false));
    let beating = heartbeats(&cluster, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in cluster.ids() {
        assert_eq!(host_status(&cluster, id).await, "ready", "member {id}");
    }
    stop.store(true, Ordering::SeqCst);
    beating.await.expect("heartbeat task");

    let stopped = Instant::now();
    let bound = DOWN_AFTER + Duration::from_secs(2);
    while host_status(&cluster, 2).await != "down" {
        assert!(
            stopped.elapsed() < bound,
            "h1 still not down {:?} after heartbeats stopped",
            bound
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("down {:?} after the last heartbeat", stopped.elapsed());

    let stop = Arc::new(AtomicBool::new(false));
    let beating = heartbeats(&cluster, stop.clone());
    let resumed = Instant::now();
    while host_status(&cluster, 3).await != "ready" {
        assert!(resumed.elapsed() < Duration::from_secs(3), "h1 not ready again after 3 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("ready {:?} after heartbeats resumed", resumed.elapsed());
    stop.store(true, Ordering::SeqCst);
    beating.await.expect("heartbeat task");
}
