//! Test-only: an in-process controller that answers every call the same way, so the
//! failover rules and the binary's output can be tested without the real controller.
//! Also included by `tests/cli.rs`.

#![allow(dead_code)]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use overlay_proto::pb;
use overlay_proto::pb::overlay_server::{Overlay, OverlayServer};
use tonic::codegen::tokio_stream::{self, Stream};
use tonic::{Code, Request, Response, Status};

#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answer with the samples below (creates echo the request's name).
    Answer,
    /// Answer every call with this error.
    Fail(Code, String),
    /// Never answer.
    Hang,
}

struct Fake {
    behaviour: Behaviour,
    calls: Arc<AtomicUsize>,
}

/// Serves a fake controller on a free local port; returns its URL and a call counter.
pub async fn spawn(behaviour: Behaviour) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let fake = Fake { behaviour, calls: calls.clone() };
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder().serve_with_incoming(OverlayServer::new(fake), incoming),
    );
    (format!("http://{addr}"), calls)
}

pub fn sample_network(name: &str) -> pb::Network {
    pb::Network {
        name: name.into(),
        subnet: "10.0.1.0/24".into(),
        gateway: "10.0.1.1".into(),
        vni: 4097,
        mtu: 1450,
        encap: "vxlan".into(),
        internal: false,
        encrypted: false,
        endpoints: vec![pb::NetworkEndpoint {
            name: "s1".into(),
            host: "h1".into(),
            interface: "eth0".into(),
            ip: "10.0.1.2".into(),
            mac: "02:00:00:00:00:01".into(),
            aliases: vec!["web".into()],
        }],
    }
}

pub fn sample_endpoint(name: &str) -> pb::Endpoint {
    pb::Endpoint {
        name: name.into(),
        host: "h1".into(),
        attachments: vec![
            pb::Attachment {
                network: "frontend".into(),
                interface: "eth0".into(),
                ip: "10.0.1.2".into(),
                mac: "02:00:00:00:00:01".into(),
                aliases: vec!["web".into()],
            },
            pb::Attachment {
                network: "backend".into(),
                interface: "eth1".into(),
                ip: "10.0.2.2".into(),
                mac: "02:00:00:00:00:02".into(),
                aliases: vec![],
            },
        ],
        status: "ready".into(),
        reason: String::new(),
    }
}

pub fn sample_host(name: &str) -> pb::Host {
    pb::Host {
        name: name.into(),
        underlay_ip: "192.168.1.10".into(),
        status: "ready".into(),
        endpoints: 1,
        last_seen_ms: 1_795_428_245_000,
        underlay_mtu: 1500,
        underlay_prefix: 24,
        reason: String::new(),
    }
}

pub fn sample_route() -> pb::Route {
    pb::Route {
        network: "frontend".into(),
        destination: "10.0.2.0/24".into(),
        via: "gw".into(),
        via_ip: "10.0.1.254".into(),
    }
}

pub fn sample_cluster() -> pb::ClusterStatusResponse {
    let member = |id: u64, role: &str, reachable: bool| pb::Member {
        id,
        address: format!("10.0.0.{id}:7400"),
        role: role.into(),
        term: 3,
        commit_index: 42,
        reachable,
        applied_index: 42,
        revision: 17,
        digest: "9f2c".into(),
        snapshot_index: 0,
        leader: 1,
        matched: if reachable { 42 } else { 0 },
        voter: true,
    };
    pb::ClusterStatusResponse {
        leader: 1,
        members: vec![
            member(1, "leader", true),
            member(2, "follower", true),
            member(3, "unreachable", false),
        ],
        cluster_id: "0123456789abcdef0123456789abcdef".into(),
    }
}

impl Fake {
    async fn answer<T>(&self, value: impl FnOnce() -> T) -> Result<Response<T>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &self.behaviour {
            Behaviour::Answer => Ok(Response::new(value())),
            Behaviour::Fail(code, message) => Err(Status::new(*code, message.clone())),
            Behaviour::Hang => std::future::pending().await,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Overlay for Fake {
    async fn create_network(
        &self,
        r: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        let r = r.into_inner();
        self.answer(|| pb::Network {
            subnet: r.subnet.clone(),
            endpoints: vec![],
            ..sample_network(&r.name)
        })
        .await
    }
    async fn list_networks(
        &self,
        _: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::NetworkList>, Status> {
        self.answer(|| pb::NetworkList { networks: vec![sample_network("frontend")], revision: 1 })
            .await
    }
    async fn inspect_network(
        &self,
        r: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        self.answer(|| sample_network(&r.into_inner().name)).await
    }
    async fn remove_network(
        &self,
        _: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.answer(|| pb::Empty {}).await
    }
    async fn connect_network(
        &self,
        r: Request<pb::ConnectRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        self.answer(|| sample_endpoint(&r.into_inner().endpoint)).await
    }
    async fn disconnect_network(
        &self,
        r: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        self.answer(|| sample_endpoint(&r.into_inner().endpoint)).await
    }
    async fn create_endpoint(
        &self,
        r: Request<pb::CreateEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        self.answer(|| sample_endpoint(&r.into_inner().name)).await
    }
    async fn list_endpoints(
        &self,
        _: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::EndpointList>, Status> {
        self.answer(|| pb::EndpointList { endpoints: vec![sample_endpoint("s1")], revision: 1 })
            .await
    }
    async fn inspect_endpoint(
        &self,
        r: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        self.answer(|| sample_endpoint(&r.into_inner().name)).await
    }
    async fn remove_endpoint(
        &self,
        _: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.answer(|| pb::Empty {}).await
    }
    async fn add_route(
        &self,
        _: Request<pb::AddRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        self.answer(sample_route).await
    }
    async fn list_routes(
        &self,
        _: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::RouteList>, Status> {
        self.answer(|| pb::RouteList { routes: vec![sample_route()], revision: 1 }).await
    }
    async fn remove_route(
        &self,
        _: Request<pb::RemoveRouteRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.answer(|| pb::Empty {}).await
    }
    async fn list_hosts(
        &self,
        _: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::HostList>, Status> {
        self.answer(|| pb::HostList { hosts: vec![sample_host("h1")], revision: 1 }).await
    }
    async fn register_host(
        &self,
        r: Request<pb::RegisterHostRequest>,
    ) -> Result<Response<pb::Host>, Status> {
        self.answer(|| sample_host(&r.into_inner().name)).await
    }
    async fn remove_host(
        &self,
        _: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.answer(|| pb::Empty {}).await
    }
    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.answer(|| pb::HeartbeatResponse { status: "ready".into(), cluster_id: String::new() })
            .await
    }
    type WatchStream = WatchStream;
    async fn watch(&self, _: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        self.answer(|| Box::pin(tokio_stream::empty()) as WatchStream).await
    }
    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.answer(sample_cluster).await
    }

    async fn add_member(
        &self,
        r: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        let r = r.into_inner();
        self.answer(|| pb::MemberChangeResponse { id: r.id, address: r.address, members: vec![] })
            .await
    }

    async fn remove_member(
        &self,
        r: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        let id = r.into_inner().id;
        self.answer(|| pb::MemberChangeResponse { id, ..Default::default() }).await
    }

    async fn join_token(
        &self,
        _: Request<pb::JoinTokenRequest>,
    ) -> Result<Response<pb::JoinTokenResponse>, Status> {
        self.answer(|| pb::JoinTokenResponse {
            token: "OVTKN-1-0123456789abcdef-0123456789abcdef0123456789abcdef".into(),
        })
        .await
    }
    async fn join(
        &self,
        _: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        self.answer(pb::CertificateResponse::default).await
    }
    async fn renew_certificate(
        &self,
        _: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        self.answer(pb::CertificateResponse::default).await
    }

    async fn report_status(
        &self,
        _: Request<pb::StatusReport>,
    ) -> Result<Response<pb::StatusReportResponse>, Status> {
        self.answer(pb::StatusReportResponse::default).await
    }
}
