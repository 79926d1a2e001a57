//! The public `Overlay` service. Writes become `Command`s proposed through the cluster
//! handle; reads wait on a ReadIndex barrier (unless the caller asks for LOCAL) and are
//! answered from this member's applied state.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use overlay_model::types::DEFAULT_UNDERLAY_MTU;
use overlay_model::{names, parse, Applied, Change, Command, Encap, NetworkSpec};
use overlay_pki::token;
use overlay_proto::convert;
use overlay_proto::pb;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use overlay_grpc::Caller;

use super::auth::{self, Act};
use crate::cluster::{Cluster, ClusterError, Role};
use crate::liveness::{Heard, Liveness};
use crate::raft::membership::{MemberChange, MembershipError};
use crate::security::{Signer, WatchLimits};
use crate::status::{self, Carriers};

/// Most entries one status report may carry (far above a host's endpoints).
const MAX_REPORTED: usize = 100_000;

/// What the leader keeps in memory about each host: last heartbeat, reported problem,
/// and the catalog revision its kernel reflects.
#[derive(Default)]
struct LeaderView {
    last_seen: HashMap<String, i64>,
    problems: HashMap<String, String>,
    applied: HashMap<String, u64>,
}

pub struct OverlayApi {
    pub cluster: Cluster,
    pub liveness: Arc<Liveness>,
    /// Present when this member was given the CA key.
    pub signer: Option<Arc<Signer>>,
    pub watches: Arc<WatchLimits>,
}

/// Refuses the request unless its caller may perform `act`.
#[allow(clippy::result_large_err)]
fn allow<T>(req: &Request<T>, act: Act<'_>) -> Result<(), Status> {
    auth::check(&Caller::of(req), act)
}

fn bad(e: overlay_model::ModelError) -> Status {
    ClusterError::Rejected(e).into()
}

impl OverlayApi {
    /// Refuses every call while this member takes no part (its raft log cannot be
    /// written): clients and agents then ask another member.
    #[allow(clippy::result_large_err)]
    pub(super) fn serving(&self) -> Result<(), Status> {
        match self.cluster.shared.not_serving(self.cluster.id) {
            Some(why) => Err(Status::unavailable(why)),
            None => Ok(()),
        }
    }

    async fn read(&self, consistency: i32) -> Result<(), Status> {
        self.serving()?;
        if consistency == pb::ReadConsistency::Local as i32 {
            return Ok(());
        }
        self.cluster.read_barrier().await.map_err(Status::from)
    }

    /// Proposes and returns once this member also shows the write (read-your-writes on
    /// followers, whose handlers read the result back from local state).
    async fn write(&self, command: Command) -> Result<Applied, Status> {
        let applied = self.cluster.propose(command).await.map_err(Status::from)?;
        self.cluster.wait_for_revision(applied.revision).await;
        Ok(applied)
    }

    /// The endpoint a write returned, with its status (`pending`: it just changed).
    fn endpoint_of(&self, applied: &Applied) -> Result<pb::Endpoint, Status> {
        let e = applied
            .changes
            .iter()
            .find_map(|c| match c {
                Change::PutEndpoint(e) => Some(e),
                _ => None,
            })
            .ok_or_else(|| Status::internal("the write applied but returned no endpoint"))?;
        let state = self.cluster.read_state();
        Ok(with_status(e, &state, &Carriers::around(&state, e), &HashMap::new()))
    }

    fn network_pb(&self, name: &str) -> Result<pb::Network, Status> {
        let state = self.cluster.read_state();
        let network = state
            .catalog
            .networks
            .get(name)
            .ok_or_else(|| bad(overlay_model::ModelError::NetworkNotFound(name.to_string())))?;
        Ok(convert::network_with_endpoints(network, state.catalog.endpoints_in(name)))
    }

    /// The host endpoint `name` is on, from this member's applied state; `None` if there
    /// is no such endpoint. For authorisation messages only: what an agent asks is applied
    /// as a command guarded by its host (see `auth::own_host`), checked atomically.
    fn endpoint_host(&self, name: &str) -> Option<String> {
        self.cluster.read_state().catalog.endpoints.get(name).map(|e| e.host.clone())
    }

    /// The cluster's id, empty until the first leader named it.
    fn cluster_id(&self) -> String {
        self.cluster.read_state().meta().cluster_id.clone().unwrap_or_default()
    }

    /// Refuses a caller whose state belongs to another cluster (a reinitialised cluster,
    /// another cluster's backup): mixing the two would corrupt both.
    #[allow(clippy::result_large_err)]
    pub(crate) fn same_cluster(&self, theirs: &str) -> Result<(), Status> {
        let ours = self.cluster_id();
        if theirs.is_empty() || ours.is_empty() || theirs.eq_ignore_ascii_case(&ours) {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "this controller serves cluster {ours}, but the caller belongs to cluster {theirs}: refusing to mix their state (if the host really moved to this cluster, remove the agent's data dir state and restart it)"
        )))
    }

    /// This member's signer, or the error that sends the caller to another member.
    #[allow(clippy::result_large_err)]
    fn signer(&self) -> Result<&Signer, Status> {
        self.signer.as_deref().ok_or_else(|| {
            Status::unavailable(format!(
                "controller {} cannot sign certificates (it runs without --tls-ca-key): ask another member",
                self.cluster.id
            ))
        })
    }

    /// Last-seen times, reported problems and applied revisions live in the leader's
    /// memory; ask it when we are not it.
    async fn leader_view(&self) -> LeaderView {
        let local = || LeaderView {
            last_seen: self.liveness.last_seen_ms(),
            problems: self.liveness.problems(),
            applied: self.liveness.applied(),
        };
        let status = self.cluster.status();
        if status.role == Role::Leader || status.leader == 0 {
            return local();
        }
        let Some(mut client) = self.cluster.peers.client(status.leader) else {
            return local();
        };
        let mut request = Request::new(pb::Empty {});
        request.set_timeout(Duration::from_secs(1));
        match client.last_seen(request).await {
            Ok(resp) => {
                let r = resp.into_inner();
                LeaderView {
                    last_seen: r.last_seen_ms.into_iter().collect(),
                    problems: r.problems.into_iter().collect(),
                    applied: r.applied.into_iter().collect(),
                }
            }
            Err(_) => local(),
        }
    }
}

fn aliases(list: &[String]) -> Result<Vec<String>, Status> {
    for a in list {
        names::validate_name(a).map_err(bad)?;
    }
    Ok(list.to_vec())
}

/// `e` as the API shows it: with its status (see [`crate::status`]).
fn with_status(
    e: &overlay_model::Endpoint,
    state: &overlay_model::State,
    carriers: &Carriers<'_>,
    applied: &HashMap<String, u64>,
) -> pb::Endpoint {
    let shown = status::shown(e, state.endpoint_status(&e.name), &state.catalog, carriers, applied);
    let mut out = pb::Endpoint::from(e);
    out.status = shown.state.to_string();
    out.reason = shown.reason;
    out
}

type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::overlay_server::Overlay for OverlayApi {
    async fn create_network(
        &self,
        req: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        allow(&req, Act::Write)?;
        let r = req.into_inner();
        names::validate_name(&r.name).map_err(bad)?;
        let spec = NetworkSpec {
            name: r.name.clone(),
            subnet: parse::cidr(&r.subnet).map_err(bad)?,
            gateway: parse::optional_ipv4(&r.gateway).map_err(bad)?,
            vni: (r.vni != 0).then_some(r.vni),
            mtu: (r.mtu != 0).then_some(r.mtu),
            encap: if r.encap.is_empty() { Encap::Vxlan } else { r.encap.parse().map_err(bad)? },
            encrypted: r.encrypted,
            internal: r.internal,
        };
        self.write(Command::CreateNetwork(spec)).await?;
        info!(network = %r.name, "network created");
        Ok(Response::new(self.network_pb(&r.name)?))
    }

    async fn list_networks(
        &self,
        req: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::NetworkList>, Status> {
        allow(&req, Act::Read)?;
        self.read(req.get_ref().consistency).await?;
        let state = self.cluster.read_state();
        let c = &state.catalog;
        // One pass over endpoints instead of one per network.
        let mut by_network: std::collections::BTreeMap<&str, Vec<_>> = Default::default();
        for e in c.endpoints.values() {
            for a in &e.attachments {
                by_network.entry(a.network.as_str()).or_default().push((e, a));
            }
        }
        let networks = c
            .networks
            .values()
            .map(|n| {
                convert::network_with_endpoints(
                    n,
                    by_network.remove(n.name.as_str()).unwrap_or_default(),
                )
            })
            .collect();
        Ok(Response::new(pb::NetworkList { networks, revision: c.revision }))
    }

    async fn inspect_network(
        &self,
        req: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        allow(&req, Act::Read)?;
        self.read(pb::ReadConsistency::Linearizable as i32).await?;
        Ok(Response::new(self.network_pb(&req.get_ref().name)?))
    }

    async fn remove_network(
        &self,
        req: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        allow(&req, Act::Write)?;
        let name = req.into_inner().name;
        self.write(Command::RemoveNetwork { name: name.clone() }).await?;
        info!(network = %name, "network removed");
        Ok(Response::new(pb::Empty {}))
    }

    async fn connect_network(
        &self,
        req: Request<pb::ConnectRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let host = self.endpoint_host(&r.endpoint);
        auth::check(&caller, Act::ChangeEndpoint { endpoint: &r.endpoint, host: host.as_deref() })?;
        let ip = parse::optional_ipv4(&r.ip).map_err(bad)?;
        let aliases = aliases(&r.aliases)?;
        let guard = auth::own_host(&caller).map(str::to_string);
        let command = if r.interface.is_empty() && guard.is_none() {
            Command::Connect { network: r.network, endpoint: r.endpoint, ip, aliases }
        } else {
            Command::ConnectAs {
                network: r.network,
                endpoint: r.endpoint,
                ip,
                aliases,
                interface: (!r.interface.is_empty()).then_some(r.interface),
                host: guard,
            }
        };
        let applied = self.write(command).await?;
        Ok(Response::new(self.endpoint_of(&applied)?))
    }

    async fn disconnect_network(
        &self,
        req: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let host = self.endpoint_host(&r.endpoint);
        auth::check(&caller, Act::ChangeEndpoint { endpoint: &r.endpoint, host: host.as_deref() })?;
        let command = match auth::own_host(&caller) {
            Some(host) => Command::DisconnectOn {
                network: r.network,
                endpoint: r.endpoint,
                host: host.to_string(),
            },
            None => Command::Disconnect { network: r.network, endpoint: r.endpoint },
        };
        let applied = self.write(command).await?;
        Ok(Response::new(self.endpoint_of(&applied)?))
    }

    async fn create_endpoint(
        &self,
        req: Request<pb::CreateEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        auth::check(&caller, Act::ChangeEndpoint { endpoint: &r.name, host: Some(&r.host) })?;
        names::validate_name(&r.name).map_err(bad)?;
        let (name, host, network) = (r.name.clone(), r.host.clone(), r.network);
        let ip = parse::optional_ipv4(&r.ip).map_err(bad)?;
        let aliases = aliases(&r.aliases)?;
        let command = if r.interface.is_empty() {
            Command::CreateEndpoint { name, host, network, ip, aliases }
        } else {
            Command::CreateEndpointAs { name, host, network, ip, aliases, interface: r.interface }
        };
        let applied = self.write(command).await?;
        debug!(endpoint = %r.name, host = %r.host, "endpoint created");
        Ok(Response::new(self.endpoint_of(&applied)?))
    }

    async fn list_endpoints(
        &self,
        req: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::EndpointList>, Status> {
        allow(&req, Act::Read)?;
        self.read(req.get_ref().consistency).await?;
        let view = self.leader_view().await;
        let state = self.cluster.read_state();
        let carriers = Carriers::of(&state.catalog);
        let endpoints = state
            .catalog
            .endpoints
            .values()
            .map(|e| with_status(e, &state, &carriers, &view.applied))
            .collect();
        Ok(Response::new(pb::EndpointList { endpoints, revision: state.catalog.revision }))
    }

    async fn inspect_endpoint(
        &self,
        req: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let name = req.get_ref().name.clone();
        let host = self.endpoint_host(&name);
        allow(&req, Act::ReadEndpoint { endpoint: &name, host: host.as_deref() })?;
        self.read(pb::ReadConsistency::Linearizable as i32).await?;
        let view = self.leader_view().await;
        let state = self.cluster.read_state();
        let e = state
            .catalog
            .endpoints
            .get(&name)
            .ok_or_else(|| bad(overlay_model::ModelError::EndpointNotFound(name.clone())))?;
        // An agent may read its own host's endpoints only (checked again on what was read).
        if let Some(own) = auth::own_host(&Caller::of(&req)) {
            if own != e.host {
                return Err(bad(overlay_model::ModelError::EndpointNotFound(name)));
            }
        }
        let carriers = Carriers::around(&state, e);
        Ok(Response::new(with_status(e, &state, &carriers, &view.applied)))
    }

    async fn remove_endpoint(
        &self,
        req: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let caller = Caller::of(&req);
        let name = req.into_inner().name;
        let host = self.endpoint_host(&name);
        auth::check(&caller, Act::ChangeEndpoint { endpoint: &name, host: host.as_deref() })?;
        let command = match auth::own_host(&caller) {
            Some(host) => Command::RemoveEndpointOn { name, host: host.to_string() },
            None => Command::RemoveEndpoint { name },
        };
        self.write(command).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn add_route(
        &self,
        req: Request<pb::AddRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        allow(&req, Act::Write)?;
        let r = req.into_inner();
        let destination = parse::cidr(&r.destination).map_err(bad)?;
        let applied = self
            .write(Command::AddRoute { network: r.network.clone(), destination, via: r.via })
            .await?;
        let route = applied
            .changes
            .iter()
            .find_map(|c| match c {
                Change::PutRoute(route) => Some(route.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::internal("the write applied but returned no route"))?;
        let state = self.cluster.read_state();
        Ok(Response::new(convert::route(&route, state.catalog.route_via_ip(&route))))
    }

    async fn list_routes(
        &self,
        req: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::RouteList>, Status> {
        allow(&req, Act::Read)?;
        let r = req.into_inner();
        self.read(r.consistency).await?;
        let state = self.cluster.read_state();
        let c = &state.catalog;
        if !r.network.is_empty() && !c.networks.contains_key(&r.network) {
            return Err(bad(overlay_model::ModelError::NetworkNotFound(r.network)));
        }
        let routes = c
            .routes
            .values()
            .filter(|route| r.network.is_empty() || route.network == r.network)
            .map(|route| convert::route(route, c.route_via_ip(route)))
            .collect();
        Ok(Response::new(pb::RouteList { routes, revision: c.revision }))
    }

    async fn remove_route(
        &self,
        req: Request<pb::RemoveRouteRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        allow(&req, Act::Write)?;
        let r = req.into_inner();
        let destination = parse::cidr(&r.destination).map_err(bad)?;
        self.write(Command::RemoveRoute { network: r.network, destination }).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_hosts(
        &self,
        req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::HostList>, Status> {
        allow(&req, Act::Read)?;
        self.read(req.get_ref().consistency).await?;
        let LeaderView { last_seen, problems, .. } = self.leader_view().await;
        let state = self.cluster.read_state();
        let c = &state.catalog;
        let counts = c.endpoint_counts_by_host();
        let hosts = c
            .hosts
            .values()
            .map(|h| {
                let count = counts.get(h.name.as_str()).copied().unwrap_or(0) as u32;
                let mut out = convert::host(h, count, last_seen.get(&h.name).copied().unwrap_or(0));
                (out.status, out.reason) =
                    crate::liveness::shown_status(h, problems.get(&h.name).map(String::as_str));
                out
            })
            .collect();
        Ok(Response::new(pb::HostList { hosts, revision: c.revision }))
    }

    async fn register_host(
        &self,
        req: Request<pb::RegisterHostRequest>,
    ) -> Result<Response<pb::Host>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        names::validate_name(&r.name).map_err(bad)?;
        let underlay_ip = parse::ipv4(&r.underlay_ip).map_err(bad)?;
        auth::check(&caller, Act::RegisterHost { host: &r.name, underlay_ip: underlay_ip.into() })?;
        self.serving()?;
        self.same_cluster(&r.cluster_id)?;
        let underlay_prefix =
            u8::try_from(r.underlay_prefix).ok().filter(|p| *p <= 32).ok_or_else(|| {
                bad(overlay_model::ModelError::InvalidCidr(format!(
                    "{underlay_ip}/{}",
                    r.underlay_prefix
                )))
            })?;
        // An agent registers at every start and reconnect: when it is already registered
        // as it says, that is only a sign of life, not a write every watcher would hear
        // about (1,000 agents restarting at once would be 1,000 revisions sent to 1,000
        // watchers). A host shown down comes back through the liveness monitor, which
        // writes all the hosts it sees return in one pass as one revision.
        let unchanged = self.cluster.read_state().catalog.hosts.get(&r.name).is_some_and(|h| {
            h.underlay_ip == underlay_ip
                && h.underlay_prefix == underlay_prefix
                && h.underlay_mtu
                    == if r.underlay_mtu == 0 { DEFAULT_UNDERLAY_MTU } else { r.underlay_mtu }
        });
        if unchanged {
            heartbeat(&self.cluster, &self.liveness, &r.name, None);
            let state = self.cluster.read_state();
            if let Some(host) = state.catalog.hosts.get(&r.name) {
                debug!(host = %r.name, "host registered again, unchanged");
                return Ok(Response::new(convert::host(
                    host,
                    state.endpoints_on_host(&r.name) as u32,
                    0,
                )));
            }
        }
        let now_ms = crate::liveness::unix_ms(std::time::SystemTime::now()) as u64;
        self.write(Command::RegisterHost {
            name: r.name.clone(),
            underlay_ip,
            underlay_prefix,
            underlay_mtu: r.underlay_mtu,
            now_ms,
        })
        .await?;
        // Registration counts as a sign of life for the liveness monitor (the problem,
        // if any, comes with the next heartbeat).
        heartbeat(&self.cluster, &self.liveness, &r.name, None);
        let state = self.cluster.read_state();
        let host = state
            .catalog
            .hosts
            .get(&r.name)
            .ok_or_else(|| Status::internal("host vanished after registration"))?;
        info!(host = %r.name, underlay_ip = %underlay_ip, "host registered");
        Ok(Response::new(convert::host(host, state.endpoints_on_host(&r.name) as u32, 0)))
    }

    async fn remove_host(
        &self,
        req: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        allow(&req, Act::Write)?;
        self.write(Command::RemoveHost { name: req.into_inner().name }).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = Caller::of(&req);
        let pb::HeartbeatRequest { host, cluster_id, problem } = req.into_inner();
        auth::check(&caller, Act::Heartbeat { host: &host })?;
        self.serving()?;
        self.same_cluster(&cluster_id)?;
        let status = {
            let state = self.cluster.read_state();
            match state.catalog.hosts.get(&host) {
                Some(h) => h.status.to_string(),
                None => return Err(bad(overlay_model::ModelError::HostNotFound(host))),
            }
        };
        heartbeat(&self.cluster, &self.liveness, &host, Some(&problem));
        Ok(Response::new(pb::HeartbeatResponse { status, cluster_id: self.cluster_id() }))
    }

    type WatchStream = WatchStream;

    /// The server answers Watch in `super::watch::WithWatch` (pre-encoded frames); this
    /// serves the same frames decoded, for a server built without it.
    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        use tokio_stream::StreamExt;
        let frames = super::watch::open(self, req)?;
        let messages = frames
            .map(|f| f.and_then(|f| f.to_message().map_err(|e| Status::internal(e.to_string()))));
        Ok(Response::new(Box::pin(messages)))
    }

    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        allow(&req, Act::Read)?;
        let status = self.cluster.status();
        let mut configured: BTreeMap<u64, (String, bool)> =
            status.members.iter().map(|(&id, m)| (id, (m.address.clone(), m.voter))).collect();
        if configured.is_empty() {
            // Before the driver published its first status.
            configured =
                self.cluster.peers.addresses().into_iter().map(|(id, a)| (id, (a, true))).collect();
        }
        let asks = configured.iter().map(|(&id, (address, voter))| {
            let cluster = self.cluster.clone();
            let unreachable = pb::Member {
                id,
                address: address.clone(),
                role: "unreachable".into(),
                reachable: false,
                voter: *voter,
                ..Default::default()
            };
            async move {
                if id == cluster.id {
                    return (
                        super::peer::member_status(&cluster),
                        super::peer::member_progress(&cluster),
                    );
                }
                let Some(mut client) = cluster.peers.client(id) else {
                    return (unreachable, vec![]);
                };
                let mut request = Request::new(pb::Empty {});
                request.set_timeout(Duration::from_secs(1));
                match tokio::time::timeout(
                    Duration::from_millis(1500),
                    client.member_status(request),
                )
                .await
                {
                    Ok(Ok(resp)) => {
                        let resp = resp.into_inner();
                        (resp.member.unwrap_or(unreachable), resp.progress)
                    }
                    _ => (unreachable, vec![]),
                }
            }
        });
        let answers = futures::future::join_all(asks).await;
        // A member that knows no leader (an election, or it takes no part: a full disk)
        // still shows the one another member says leads.
        let leader = match status.leader {
            0 => answers
                .iter()
                .find(|(m, _)| m.role == Role::Leader.as_str())
                .map_or(0, |(m, _)| m.id),
            known => known,
        };
        // The leader's raft progress says how far each member's log matches.
        let matched: BTreeMap<u64, u64> = answers
            .iter()
            .find(|(m, _)| m.id == leader && m.role == Role::Leader.as_str())
            .map(|(_, progress)| progress.iter().map(|p| (p.id, p.matched)).collect())
            .unwrap_or_default();
        let members = answers
            .into_iter()
            .map(|(mut m, _)| {
                if let Some((address, voter)) = configured.get(&m.id) {
                    m.address = address.clone();
                    m.voter = *voter;
                }
                m.matched = matched.get(&m.id).copied().unwrap_or(0);
                m
            })
            .collect();
        let cluster_id = self.cluster_id();
        Ok(Response::new(pb::ClusterStatusResponse { leader, members, cluster_id }))
    }

    async fn join_token(
        &self,
        req: Request<pb::JoinTokenRequest>,
    ) -> Result<Response<pb::JoinTokenResponse>, Status> {
        allow(&req, Act::Write)?;
        let rotate = req.into_inner().rotate;
        let ca = self.signer()?.ca();
        self.read(pb::ReadConsistency::Linearizable as i32).await?;
        let current = self.cluster.read_state().meta().join_token.clone();
        if let (Some(record), false) = (current, rotate) {
            let token = token::derive(ca.cert_der(), &ca.key_der(), &record.nonce);
            // A record made under another CA key cannot be shown again: rotate it.
            if token::hashes_equal(&token::hash(&token), &record.hash) {
                return Ok(Response::new(pb::JoinTokenResponse { token }));
            }
        }
        let nonce = overlay_pki::random_bytes::<{ token::NONCE_LEN }>()
            .map_err(|e| Status::internal(e.to_string()))?;
        let token = token::derive(ca.cert_der(), &ca.key_der(), &nonce);
        self.write(Command::SetJoinToken { nonce, hash: token::hash(&token) }).await?;
        info!(rotated = rotate, "new join token");
        Ok(Response::new(pb::JoinTokenResponse { token }))
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        allow(&req, Act::Join)?;
        let remote = Caller::of(&req).remote();
        let r = req.into_inner();
        overlay_pki::validate_cert_name(&r.host)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let underlay_ip = parse::ipv4(&r.underlay_ip).map_err(bad)?;
        let signer = self.signer()?;
        // A token rotated a moment ago on another member must already be refused here.
        self.read(pb::ReadConsistency::Linearizable as i32).await?;
        {
            let state = self.cluster.read_state();
            let Some(record) = &state.meta().join_token else {
                return Err(Status::failed_precondition(
                    "no join token has been made yet: run overlayctl cluster join-token",
                ));
            };
            if !token::hashes_equal(&token::hash(&r.token), &record.hash) {
                warn!(host = %r.host, ?remote, "join refused: wrong or rotated-out token");
                return Err(Status::permission_denied(
                    "permission denied: the join token is wrong or was rotated out (see overlayctl cluster join-token)",
                ));
            }
            // A token is not a licence to take over a host that registered elsewhere.
            if let Some(host) = state.catalog.hosts.get(&r.host) {
                if host.underlay_ip != underlay_ip {
                    return Err(Status::permission_denied(format!(
                        "permission denied: host {} is registered with underlay IP {}, not {underlay_ip} (overlayctl host rm {} first, if it moved)",
                        r.host, host.underlay_ip, r.host
                    )));
                }
            }
        }
        let certificate = signer
            .sign_agent(&r.csr, &r.host, vec![underlay_ip.into()])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(host = %r.host, %underlay_ip, ?remote, "signed an agent certificate for a join token");
        Ok(Response::new(pb::CertificateResponse { certificate, cluster_id: self.cluster_id() }))
    }

    async fn renew_certificate(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        allow(&req, Act::RenewCertificate)?;
        let Caller::Certified { cert, .. } = Caller::of(&req) else {
            return Err(Status::permission_denied(
                "permission denied: renewing needs the agent certificate being renewed",
            ));
        };
        let certificate = self
            .signer()?
            .sign_agent(&req.get_ref().csr, &cert.name, cert.ips.clone())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(host = %cert.name, "renewed an agent certificate");
        Ok(Response::new(pb::CertificateResponse { certificate, cluster_id: self.cluster_id() }))
    }

    async fn report_status(
        &self,
        req: Request<pb::StatusReport>,
    ) -> Result<Response<pb::StatusReportResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        auth::check(&caller, Act::ReportStatus { host: &r.host })?;
        self.serving()?;
        names::validate_name(&r.host).map_err(bad)?;
        if r.statuses.len() > MAX_REPORTED {
            return Err(Status::invalid_argument(format!(
                "a status report carries at most {MAX_REPORTED} endpoints, not {}",
                r.statuses.len()
            )));
        }
        let mut statuses = Vec::with_capacity(r.statuses.len());
        for s in &r.statuses {
            names::validate_name(&s.endpoint).map_err(bad)?;
            statuses.push(overlay_model::ReportedStatus {
                endpoint: s.endpoint.clone(),
                state: s.status.parse().map_err(bad)?,
                reason: overlay_model::status::clean_reason(&s.reason),
            });
        }
        if r.applied_revision > 0 {
            record_applied(&self.cluster, &self.liveness, &r.host, r.applied_revision);
        }
        if !statuses.is_empty() {
            let command = Command::SetEndpointStatuses {
                host: r.host.clone(),
                revision: r.revision,
                statuses,
            };
            self.cluster.propose(command).await.map_err(Status::from)?;
            // So that `wanted` below already counts what this report said.
            self.read(pb::ReadConsistency::Linearizable as i32).await?;
            debug!(host = %r.host, revision = r.revision, entries = r.statuses.len(), "endpoint statuses reported");
        }
        let wanted = self.cluster.read_state().unreported_on(&r.host);
        Ok(Response::new(pb::StatusReportResponse { wanted }))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        allow(&req, Act::Write)?;
        let r = req.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument(MembershipError::InvalidId.to_string()));
        }
        let address: std::net::SocketAddr = r.address.trim().parse().map_err(|_| {
            Status::invalid_argument(MembershipError::InvalidAddress(r.address.clone()).to_string())
        })?;
        let address = address.to_string();
        self.cluster
            .change_membership(MemberChange::AddLearner { id: r.id, address: address.clone() })
            .await
            .map_err(Status::from)?;
        info!(id = r.id, %address, "member added (as a learner until it has caught up)");
        let members = self.members_after(|m| m.contains_key(&r.id)).await;
        Ok(Response::new(pb::MemberChangeResponse { id: r.id, address, members }))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        allow(&req, Act::Write)?;
        let id = req.into_inner().id;
        if id == 0 {
            return Err(Status::invalid_argument(MembershipError::InvalidId.to_string()));
        }
        let address = self.cluster.status().members.get(&id).map(|m| m.address.clone());
        self.cluster.change_membership(MemberChange::Remove { id }).await.map_err(Status::from)?;
        info!(id, "member removed");
        // A removed member may never hear that its removal committed: do not wait for it.
        let members = if id == self.cluster.id {
            self.members_after(|_| true).await
        } else {
            self.members_after(|m| !m.contains_key(&id)).await
        };
        Ok(Response::new(pb::MemberChangeResponse {
            id,
            address: address.unwrap_or_default(),
            members,
        }))
    }
}

impl OverlayApi {
    /// The configuration once this member has applied a change (`done` says when), or
    /// as it is after a short wait: a follower applies it a round trip after the leader.
    async fn members_after(
        &self,
        done: impl Fn(&BTreeMap<u64, crate::cluster::MemberInfo>) -> bool,
    ) -> Vec<pb::Member> {
        let mut status = self.cluster.shared.status.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done(&self.cluster.status().members) {
            if tokio::time::timeout_at(deadline, status.changed()).await.is_err() {
                break;
            }
        }
        self.cluster
            .status()
            .members
            .into_iter()
            .map(|(id, m)| pb::Member {
                id,
                address: m.address,
                voter: m.voter,
                ..Default::default()
            })
            .collect()
    }
}

/// Records a heartbeat (with the problem the host reports, if any) where the liveness
/// monitor runs: here if we lead, else the leader.
pub fn heartbeat(cluster: &Cluster, liveness: &Liveness, host: &str, problem: Option<&str>) {
    crate::liveness::heard(cluster, liveness, Heard::Heartbeat { host, problem });
}

/// Records the revision `host`'s kernel reflects where the leader keeps it.
fn record_applied(cluster: &Cluster, liveness: &Liveness, host: &str, revision: u64) {
    crate::liveness::heard(cluster, liveness, Heard::Applied { host, revision });
}
