//! ADD, DEL and CHECK as the agent carries them out: records, the namespace's bind mount,
//! the controller calls, and the bounded wait for this agent's own reconcile pass. Each
//! step that fails undoes the ones before it, so a failed ADD leaves nothing behind (the
//! runtime's DEL that follows finds nothing to do).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlay_cni::protocol::{Attached, Failure, FailureKind, Op, Reply, Request};
use overlay_model::Catalog;
use overlay_proto::pb;
use overlay_proto::pb::overlay_client::OverlayClient;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::decide::{self, AddPlan};
use super::registry::{Phase, Record};
use super::Cni;
use crate::netns;
use crate::nl::Nl;
use crate::observe::observe_netns;

/// How long an ADD waits for the endpoint to be realised (interface, address, routes, DNS).
const REALIZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long CHECK allows for convergence right after an ADD.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long DEL waits for the reconcile pass to let go of the namespace.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// All controller calls of one operation together: a container started while no
/// controller answers fails within this, never hangs.
const CONTROLLER_DEADLINE: Duration = Duration::from_secs(8);
/// One RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(6);

pub async fn handle(cni: &Arc<Cni>, req: Request) -> Reply {
    let started = Instant::now();
    let reply = match req.op {
        Op::Add => add(cni, &req).await.map(Reply::Attached),
        Op::Del => del(cni, &req).await.map(|()| Reply::Detached),
        Op::Check => check(cni, &req).await.map(Reply::Attached),
    };
    match reply {
        Ok(reply) => {
            info!(elapsed_ms = started.elapsed().as_millis() as u64, "done");
            reply
        }
        Err(failure) => {
            warn!(kind = ?failure.kind, "{}", failure.message);
            Reply::Failed(failure)
        }
    }
}

fn catalog(cni: &Cni) -> Result<Arc<Catalog>, Failure> {
    cni.catalog.borrow().clone().ok_or_else(|| {
        Failure::new(
            FailureKind::ControllerUnreachable,
            "controller unreachable: this agent has not received the desired state from any controller yet",
        )
    })
}

fn internal(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::new(FailureKind::Internal, format!("{what}: {e}"))
}

/// Changes one record (`None`: removes it), persisted before anything depends on it.
fn set_record(cni: &Cni, container_id: &str, record: Option<Record>) -> Result<(), Failure> {
    cni.registry().set(container_id, record).map_err(|e| internal("recording the container", e))
}

fn record(cni: &Cni, container_id: &str) -> Option<Record> {
    cni.registry().get(container_id).cloned()
}

async fn add(cni: &Arc<Cni>, req: &Request) -> Result<Attached, Failure> {
    if req.netns.is_empty() || !req.netns.starts_with('/') {
        return Err(Failure::new(
            FailureKind::InvalidRequest,
            format!("CNI_NETNS {:?} is not an absolute path", req.netns),
        ));
    }
    let ops = cni.ops.lock().await;
    let catalog = catalog(cni)?;
    let plan = decide::plan_add(req, &cni.registry(), &catalog)?;
    drop(catalog);
    match plan {
        AddPlan::Already { endpoint } => {
            remount(cni, req, &endpoint)?;
            drop(ops);
            wait_realized(cni, &endpoint, req, REALIZE_TIMEOUT)
                .await
                .map_err(|why| not_realized(&endpoint, &why))
        }
        AddPlan::Create { endpoint } => {
            create(cni, req, &endpoint).await?;
            drop(ops);
            match wait_realized(cni, &endpoint, req, REALIZE_TIMEOUT).await {
                Ok(attached) => {
                    info!(endpoint = %endpoint, address = %attached.address, "container attached");
                    Ok(attached)
                }
                Err(why) => {
                    let failure = not_realized(&endpoint, &why);
                    let _ops = cni.ops.lock().await;
                    if let Err(e) = detach_all(cni, req, &endpoint).await {
                        warn!(endpoint = %endpoint, "undoing the attachment: {}", e.message);
                    }
                    Err(failure)
                }
            }
        }
        AddPlan::Connect { endpoint } => {
            connect(cni, req, &endpoint).await?;
            drop(ops);
            match wait_realized(cni, &endpoint, req, REALIZE_TIMEOUT).await {
                Ok(attached) => Ok(attached),
                Err(why) => {
                    let failure = not_realized(&endpoint, &why);
                    let _ops = cni.ops.lock().await;
                    if let Err(e) = disconnect(cni, req, &endpoint).await {
                        warn!(endpoint = %endpoint, "undoing the connection: {}", e.message);
                    }
                    Err(failure)
                }
            }
        }
    }
}

fn not_realized(endpoint: &str, why: &str) -> Failure {
    Failure::new(
        FailureKind::NotRealized,
        format!(
            "endpoint {endpoint} was not realised on this host within {}s: {why}",
            REALIZE_TIMEOUT.as_secs()
        ),
    )
    .with_details(
        "see the agent's log (journalctl -u overlay-agent) for the reconcile pass's errors",
    )
}

/// A new container: record, mount, create at the controller, hand over to the loop.
async fn create(cni: &Arc<Cni>, req: &Request, endpoint: &str) -> Result<(), Failure> {
    let mut rec = decide::new_record(req, endpoint);
    set_record(cni, &req.container_id, Some(rec.clone()))?;
    rec.inode = match netns::adopt(endpoint, Path::new(&req.netns)) {
        Ok(inode) => inode,
        Err(e) => {
            let _ = set_record(cni, &req.container_id, None);
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                Failure::new(
                    FailureKind::NameClash,
                    format!("a network namespace named {endpoint} already exists on this host"),
                )
                .with_details(
                    "endpoint names are namespace names: run the container under another name",
                )
            } else {
                Failure::new(
                    FailureKind::InvalidRequest,
                    format!("cannot use CNI_NETNS {}: {e}", req.netns),
                )
            });
        }
    };
    let undo_mount = |cni: &Arc<Cni>| {
        if let Err(e) = netns::delete(endpoint) {
            warn!(endpoint = %endpoint, "unmounting the container's namespace: {e}");
        }
        let _ = set_record(cni, &req.container_id, None);
    };
    if let Err(f) = foreign_interfaces(endpoint, &[]).await {
        undo_mount(cni);
        return Err(f);
    }
    if let Err(f) = set_record(cni, &req.container_id, Some(rec.clone())) {
        undo_mount(cni);
        return Err(f);
    }
    let request = pb::CreateEndpointRequest {
        name: endpoint.to_string(),
        host: cni.host.clone(),
        network: req.network.clone(),
        ip: req.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        aliases: vec![],
        interface: req.ifname.clone(),
    };
    let created = call(cni, move |mut c| {
        let r = timed(request.clone());
        async move { c.create_endpoint(r).await }
    })
    .await;
    if let Err(f) = created {
        undo_mount(cni);
        return Err(f);
    }
    rec.phase = Phase::Attached;
    if let Err(f) = set_record(cni, &req.container_id, Some(rec)) {
        let _ = remove_endpoint(cni, endpoint).await;
        undo_mount(cni);
        return Err(f);
    }
    cni.poke.notify_one();
    Ok(())
}

/// An ADD repeated for an attached container whose namespace is another one now (the
/// host rebooted, or the runtime made a new namespace for the same container): the
/// endpoint moves into the container's current namespace.
fn remount(cni: &Cni, req: &Request, endpoint: &str) -> Result<(), Failure> {
    let Some(mut rec) = record(cni, &req.container_id) else { return Ok(()) };
    let runtime = std::fs::metadata(&req.netns).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let mounted = netns::inode(endpoint);
    if runtime.as_ref().ok() == Some(&rec.inode) && mounted == Some(rec.inode) {
        return Ok(());
    }
    if mounted.is_some() && mounted != Some(rec.inode) {
        return Err(Failure::new(
            FailureKind::NameClash,
            format!("a network namespace named {endpoint} already exists on this host"),
        ));
    }
    let bad_netns = |e: std::io::Error| {
        Failure::new(
            FailureKind::InvalidRequest,
            format!("cannot use CNI_NETNS {}: {e}", req.netns),
        )
    };
    // The record names the new namespace before it is mounted, so a pass in between
    // never takes the new mount for a stranger (it holds the endpoint back until then).
    rec.inode = runtime.map_err(bad_netns)?;
    rec.netns = req.netns.clone();
    set_record(cni, &req.container_id, Some(rec.clone()))?;
    if mounted.is_some() {
        netns::delete(endpoint).map_err(|e| internal("unmounting the old namespace", e))?;
    }
    let inode = netns::adopt(endpoint, Path::new(&req.netns)).map_err(bad_netns)?;
    if inode != rec.inode {
        let _ = netns::delete(endpoint);
        return Err(internal("mounting the container's namespace", "CNI_NETNS changed meanwhile"));
    }
    info!(endpoint = %endpoint, "container's endpoint moved into its new namespace");
    cni.poke.notify_one();
    Ok(())
}

/// Devices the kernel puts into every new namespace while a tunnel module is loaded.
const FALLBACK_DEVICES: [&str; 8] =
    ["sit0", "tunl0", "ip6tnl0", "gre0", "gretap0", "erspan0", "ip_vti0", "ip6_vti0"];

/// Refuses a container whose namespace holds interfaces that are not the agent's
/// (`ours`, besides `lo`): the agent treats every interface in an endpoint's namespace as
/// its own, so it would take over or remove another plugin's (including one named
/// `CNI_IFNAME`, which the specification says must be an error).
async fn foreign_interfaces(endpoint: &str, ours: &[String]) -> Result<(), Failure> {
    let links = match Nl::in_netns(endpoint) {
        Ok(nl) => {
            nl.links().await.map_err(|e| internal("listing the container's interfaces", e))?
        }
        Err(e) => return Err(internal("entering the container's namespace", e)),
    };
    let foreign: Vec<String> = links
        .into_iter()
        .map(|l| l.name)
        .filter(|n| n != "lo" && !FALLBACK_DEVICES.contains(&n.as_str()) && !ours.contains(n))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    Err(Failure::new(
        FailureKind::Refused,
        format!("the container already has interface(s) {} that overlay did not make", foreign.join(", ")),
    )
    .with_details("overlay-cni attaches containers whose networks are all overlay networks: the agent owns every interface in their namespace"))
}

/// A further network of an attached container.
async fn connect(cni: &Arc<Cni>, req: &Request, endpoint: &str) -> Result<(), Failure> {
    let Some(mut rec) = record(cni, &req.container_id) else {
        return Err(internal("connecting", "the container's record vanished"));
    };
    let ours: Vec<String> = rec.interfaces.keys().cloned().collect();
    foreign_interfaces(endpoint, &ours).await?;
    let before = rec.clone();
    rec.interfaces.insert(req.ifname.clone(), req.network.clone());
    set_record(cni, &req.container_id, Some(rec))?;
    let request = pb::ConnectRequest {
        network: req.network.clone(),
        endpoint: endpoint.to_string(),
        ip: req.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        aliases: vec![],
        interface: req.ifname.clone(),
    };
    let connected = call(cni, move |mut c| {
        let r = timed(request.clone());
        async move { c.connect_network(r).await }
    })
    .await;
    if let Err(f) = connected {
        let _ = set_record(cni, &req.container_id, Some(before));
        return Err(f);
    }
    cni.poke.notify_one();
    Ok(())
}

async fn del(cni: &Arc<Cni>, req: &Request) -> Result<(), Failure> {
    let _ops = cni.ops.lock().await;
    let Some(rec) = record(cni, &req.container_id) else {
        info!("nothing attached for this container");
        return Ok(());
    };
    if !rec.interfaces.contains_key(&req.ifname) {
        info!(endpoint = %rec.endpoint, "nothing attached as this interface");
        return Ok(());
    }
    if rec.interfaces.len() > 1 && rec.phase == Phase::Attached {
        disconnect(cni, req, &rec.endpoint).await
    } else {
        detach_all(cni, req, &rec.endpoint).await
    }
}

/// Detaches `req.ifname` only: the container keeps its other networks.
async fn disconnect(cni: &Arc<Cni>, req: &Request, endpoint: &str) -> Result<(), Failure> {
    let network = record(cni, &req.container_id)
        .and_then(|r| r.interfaces.get(&req.ifname).cloned())
        .unwrap_or_else(|| req.network.clone());
    let request = pb::DisconnectRequest { network, endpoint: endpoint.to_string() };
    let result = call(cni, move |mut c| {
        let r = timed(request.clone());
        async move { c.disconnect_network(r).await }
    })
    .await;
    match result {
        Ok(_) => {}
        // Already detached (by hand, or by an earlier DEL whose reply was lost).
        Err(f) if matches!(f.kind, FailureKind::Refused | FailureKind::UnknownNetwork) => {
            info!(endpoint = %endpoint, "controller: {}", f.message);
        }
        Err(f) => return Err(f),
    }
    if let Some(mut rec) = record(cni, &req.container_id) {
        rec.interfaces.remove(&req.ifname);
        set_record(cni, &req.container_id, Some(rec))?;
    }
    cni.poke.notify_one();
    info!(endpoint = %endpoint, "container detached from one network");
    Ok(())
}

/// Detaches the container from everything: the loop tears it down locally, the
/// controller forgets the endpoint, the mount goes, then the record.
async fn detach_all(cni: &Arc<Cni>, req: &Request, endpoint: &str) -> Result<(), Failure> {
    let Some(mut rec) = record(cni, &req.container_id) else { return Ok(()) };
    rec.phase = Phase::Detaching;
    set_record(cni, &req.container_id, Some(rec.clone()))?;
    cni.poke.notify_one();
    if let Err(f) = remove_endpoint(cni, endpoint).await {
        // Detached here all the same: the record stays (Detaching), so a DEL again, or
        // `overlayctl endpoint rm`, finishes the job.
        return Err(Failure {
            details: format!(
                "the container was detached on this host, but endpoint {endpoint} is still registered: run DEL again or `overlayctl endpoint rm {endpoint}` once a controller answers. {}",
                f.details
            ),
            ..f
        });
    }
    release_namespace(cni, endpoint, rec.inode).await;
    set_record(cni, &req.container_id, None)?;
    info!(endpoint = %endpoint, "container detached");
    Ok(())
}

/// Removes the endpoint at the controller; gone already (or moved to another host under
/// the same name) is fine.
async fn remove_endpoint(cni: &Arc<Cni>, endpoint: &str) -> Result<(), Failure> {
    let request = pb::NameRequest { name: endpoint.to_string() };
    let result = call(cni, move |mut c| {
        let r = timed(request.clone());
        async move { c.remove_endpoint(r).await }
    })
    .await;
    match result {
        Ok(_) => Ok(()),
        Err(f) if f.kind == FailureKind::Refused => {
            info!(endpoint = %endpoint, "controller: {}", f.message);
            Ok(())
        }
        Err(f) => Err(f),
    }
}

/// Waits (bounded) until the loop has unmounted the container's namespace, and unmounts
/// it here if the loop never took it over (an ADD interrupted before it did).
async fn release_namespace(cni: &Cni, endpoint: &str, inode: u64) {
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    let mut passes = cni.passes.subscribe();
    while netns::inode(endpoint) == Some(inode) && Instant::now() < deadline {
        tokio::select! {
            _ = passes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    if netns::inode(endpoint) == Some(inode) {
        if let Err(e) = netns::delete(endpoint) {
            warn!(endpoint = %endpoint, "unmounting the container's namespace: {e}");
        }
    }
}

async fn check(cni: &Arc<Cni>, req: &Request) -> Result<Attached, Failure> {
    let gone = |msg: String| Err(Failure::new(FailureKind::NotAttached, msg));
    let Some(rec) = record(cni, &req.container_id) else {
        return gone(format!("container {} is not attached by this agent", req.container_id));
    };
    if rec.interfaces.get(&req.ifname) != Some(&req.network) {
        return gone(format!(
            "container {} (endpoint {}) has no {} in network {}",
            req.container_id, rec.endpoint, req.ifname, req.network
        ));
    }
    let runtime = std::fs::metadata(&req.netns).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    if runtime.ok() != Some(rec.inode) || netns::inode(&rec.endpoint) != Some(rec.inode) {
        return gone(format!(
            "endpoint {}'s namespace is not the container's ({}) any more",
            rec.endpoint, req.netns
        ));
    }
    wait_realized(cni, &rec.endpoint, req, CHECK_TIMEOUT).await.map_err(|why| {
        Failure::new(FailureKind::NotAttached, format!("endpoint {}: {why}", rec.endpoint))
    })
}

/// Waits until the endpoint's attachment of `req` is realised in the kernel and its DNS
/// served, and the controller shows it `ready` (every other host of its networks knows
/// it: issue 15), checking after every reconcile pass (and every 200 ms); what is still
/// missing when `limit` runs out. A controller that cannot tell (unreachable, or older
/// than endpoint statuses) does not hold the container back once it is realised here.
async fn wait_realized(
    cni: &Cni,
    endpoint: &str,
    req: &Request,
    limit: Duration,
) -> Result<Attached, String> {
    let deadline = Instant::now() + limit;
    let mut passes = cni.passes.subscribe();
    loop {
        let served = passes.borrow_and_update().dns_served.clone();
        let want = cni
            .catalog
            .borrow()
            .as_ref()
            .and_then(|c| decide::expected(c, &cni.host, endpoint, &req.network, &req.ifname));
        let missing = match want {
            None => "the endpoint has not reached this agent's desired state yet".to_string(),
            Some(want) => match observe_netns(endpoint).await {
                Ok(observed) => match decide::realized(&want, &observed, &served, None) {
                    Ok(mut attached) => match cluster_ready(cni, endpoint, deadline).await {
                        Ok(()) => {
                            attached.host_mac = host_mac(&attached.host_interface).await;
                            return Ok(attached);
                        }
                        Err(why) => why,
                    },
                    Err(why) => why,
                },
                Err(e) => format!("cannot read the container's namespace: {e:#}"),
            },
        };
        if Instant::now() >= deadline {
            return Err(missing);
        }
        tokio::select! {
            _ = passes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Whether the controller shows `endpoint` ready; `Err` says what it waits for. An
/// answer that cannot be had (no controller in time, or one without statuses) counts
/// as ready: the container is realised on this host, and the data plane does not depend
/// on the controllers.
async fn cluster_ready(cni: &Cni, endpoint: &str, deadline: Instant) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(500));
    let request = pb::NameRequest { name: endpoint.to_string() };
    let asked = tokio::time::timeout(
        left,
        call(cni, move |mut c| {
            let r = timed(request.clone());
            async move { c.inspect_endpoint(r).await }
        }),
    )
    .await;
    match asked {
        Ok(Ok(e)) => match e.status.as_str() {
            "ready" | "" => Ok(()),
            "failed" => Err(format!("its host reports it failed: {}", e.reason)),
            _ => Err(format!("the controller shows it pending: {}", e.reason)),
        },
        Ok(Err(f)) => {
            tracing::debug!(endpoint = %endpoint, "cannot ask the controller for its status: {}", f.message);
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// The MAC of the veth's host end, for the result (absent if it cannot be read).
async fn host_mac(name: &str) -> Option<String> {
    let nl = Nl::current().ok()?;
    let links = nl.links().await.ok()?;
    links.into_iter().find(|l| l.name == name)?.mac.map(|m| m.to_string())
}

/// A request with the RPC timeout set.
fn timed<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(RPC_TIMEOUT);
    r
}

/// One write to the controllers, trying each URL in turn while connections fail (the
/// request was not sent); any answer is the answer. Bounded by [`CONTROLLER_DEADLINE`].
async fn call<T, F, Fut>(cni: &Cni, f: F) -> Result<T, Failure>
where
    F: Fn(OverlayClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + CONTROLLER_DEADLINE;
    let mut reasons = vec![];
    for url in &cni.controllers.urls {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let client = match tokio::time::timeout(left, cni.controllers.connect(url)).await {
            Ok(Ok(client)) => client,
            Ok(Err(why)) => {
                reasons.push((url.clone(), why));
                continue;
            }
            Err(_) => {
                reasons.push((url.clone(), "connecting timed out".into()));
                break;
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        return match tokio::time::timeout(left, f(client)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(decide::refusal(status.code(), status.message())),
            Err(_) => Err(Failure::new(
                FailureKind::ControllerUnreachable,
                format!("controller unreachable: {url} did not answer in time"),
            )),
        };
    }
    Err(decide::unreachable(&reasons))
}
