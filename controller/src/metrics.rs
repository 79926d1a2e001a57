//! The controller's Prometheus metrics (`--metrics-listen`, served by `overlay-ops`).
//!
//! Two kinds:
//! * events, counted where they happen through the [`Metrics`] handle that `Shared`
//!   carries: proposals by outcome and their latency, apply latency, snapshots, open
//!   watch streams, gRPC requests by method and status code ([`CountRequests`], a
//!   tower layer on the server);
//! * state, read at scrape time ([`scrape`], pure): raft term, leader, commit and
//!   applied index, membership, catalog sizes, endpoints per network, hosts by status.
//!
//! Names start with `overlay_controller_`; the README lists them and what to alert on.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http_body::{Body, Frame};
use overlay_model::Catalog;
use overlay_ops::metrics::{duration_buckets, Samples};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cluster::{NodeStatus, Role};

type Labels = Vec<(&'static str, String)>;

/// Distinct gRPC method labels kept; calls to others count as `other` (a client
/// inventing method names must not grow the scrape without bound).
const MAX_METHODS: usize = 64;

/// Event metrics. Cheap to update from any task (atomics).
pub struct Metrics {
    proposals: Family<Labels, Counter>,
    proposal_seconds: Histogram,
    apply_seconds: Histogram,
    snapshots: Family<Labels, Counter>,
    snapshot_bytes: Gauge,
    watch_streams: Gauge,
    requests: Family<Labels, Counter>,
    methods: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            proposals: Family::default(),
            proposal_seconds: Histogram::new(duration_buckets()),
            apply_seconds: Histogram::new(duration_buckets()),
            snapshots: Family::default(),
            snapshot_bytes: Gauge::default(),
            watch_streams: Gauge::default(),
            requests: Family::default(),
            methods: Mutex::default(),
        }
    }
}

/// How a client's write ended, as the `outcome` label of proposals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed and applied.
    Committed,
    /// Refused by the state machine (validation); nothing changed.
    Rejected,
    /// No leader within the timeout; nothing changed.
    NoLeader,
    /// The leader went away or the commit timed out: it may or may not have happened.
    Unknown,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Rejected => "rejected",
            Outcome::NoLeader => "no_leader",
            Outcome::Unknown => "unknown",
        }
    }
}

impl Metrics {
    /// Registers the event metrics in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "overlay_controller_proposals",
            "Writes proposed through this member, by outcome (committed, rejected, no_leader, unknown)",
            self.proposals.clone(),
        );
        registry.register(
            "overlay_controller_proposal_duration_seconds",
            "Time from a write's arrival at this member to its answer",
            self.proposal_seconds.clone(),
        );
        registry.register(
            "overlay_controller_apply_duration_seconds",
            "Time to apply one committed raft entry (a batch of writes) to the state",
            self.apply_seconds.clone(),
        );
        registry.register(
            "overlay_controller_snapshots",
            "Raft snapshots taken by this member or installed from the leader, by kind",
            self.snapshots.clone(),
        );
        registry.register(
            "overlay_controller_snapshot_bytes",
            "Size of the latest raft snapshot taken or installed",
            self.snapshot_bytes.clone(),
        );
        registry.register(
            "overlay_controller_watch_streams",
            "Watch streams (agents following the desired state) open on this member",
            self.watch_streams.clone(),
        );
        registry.register(
            "overlay_controller_grpc_requests",
            "gRPC calls served by this member, by method and status code",
            self.requests.clone(),
        );
    }

    pub fn proposal(&self, outcome: Outcome, took: Duration) {
        self.proposals.get_or_create(&vec![("outcome", outcome.as_str().to_string())]).inc();
        self.proposal_seconds.observe(took.as_secs_f64());
    }

    pub fn applied(&self, took: Duration) {
        self.apply_seconds.observe(took.as_secs_f64());
    }

    /// A snapshot of `bytes` was `taken` here or installed from the leader.
    pub fn snapshot(&self, taken: bool, bytes: usize) {
        let kind = if taken { "taken" } else { "installed" };
        self.snapshots.get_or_create(&vec![("kind", kind.to_string())]).inc();
        self.snapshot_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts a watch stream as open until the returned guard is dropped.
    pub fn watch_opened(self: &Arc<Self>) -> WatchGuard {
        self.watch_streams.inc();
        WatchGuard(self.clone())
    }

    fn request(&self, method: &str, code: tonic::Code) {
        let labels = vec![("method", method.to_string()), ("code", format!("{code:?}"))];
        self.requests.get_or_create(&labels).inc();
    }

    /// The `method` label of a request path: `/overlay.Overlay/CreateNetwork` ->
    /// `overlay.Overlay/CreateNetwork`; anything else, or past [`MAX_METHODS`], `other`.
    fn method_label(&self, path: &str) -> String {
        let other = "other".to_string();
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return other;
        };
        let plausible = |s: &str, extra: char| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == extra)
        };
        if !plausible(service, '.') || !plausible(method, '_') {
            return other;
        }
        let name = format!("{service}/{method}");
        let mut seen = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(&name) || (seen.len() < MAX_METHODS && seen.insert(name.clone())) {
            name
        } else {
            other
        }
    }
}

/// Held for the life of one watch stream.
pub struct WatchGuard(Arc<Metrics>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watch_streams.dec();
    }
}

/// Values read at scrape time from the published raft status and the applied catalog
/// (pure). `problems`: what agents reported, by host (known on the leader only, which
/// alone can tell `degraded` hosts); `cert_expiry`: this member's certificate's end.
pub fn scrape(
    status: &NodeStatus,
    catalog: &Catalog,
    problems: &std::collections::HashMap<String, String>,
    cert_expiry: Option<SystemTime>,
) -> Samples {
    let mut s = Samples::default();
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    s.gauge(
        "overlay_controller_raft_term",
        "Current raft term seen by this member.",
        status.term as f64,
    );
    s.gauge(
        "overlay_controller_raft_leader_id",
        "Raft id of the leader this member follows (0: none known).",
        status.leader as f64,
    );
    s.gauge(
        "overlay_controller_raft_is_leader",
        "1 when this member is the raft leader.",
        flag(status.role == Role::Leader),
    );
    s.gauge(
        "overlay_controller_raft_has_leader",
        "1 when this member knows a leader (0 during elections, or cut off from a majority).",
        flag(status.leader != 0),
    );
    s.gauge(
        "overlay_controller_raft_commit_index",
        "Highest raft log index known committed.",
        status.commit as f64,
    );
    s.gauge(
        "overlay_controller_raft_applied_index",
        "Highest raft log index applied to this member's state.",
        status.applied as f64,
    );
    s.gauge(
        "overlay_controller_raft_snapshot_index",
        "Raft log index of this member's latest snapshot.",
        status.snapshot_index as f64,
    );
    s.gauge(
        "overlay_controller_raft_recovering",
        "1 while a member that lost its data catches up before it votes again.",
        flag(status.recovering),
    );
    let voters = status.members.values().filter(|m| m.voter).count();
    for (kind, n) in [("voter", voters), ("learner", status.members.len() - voters)] {
        s.gauge_with(
            "overlay_controller_raft_members",
            "Members of the raft configuration, by kind (voter, learner).",
            vec![("kind", kind.to_string())],
            n as f64,
        );
    }
    s.gauge(
        "overlay_controller_catalog_revision",
        "Revision of the applied desired state.",
        catalog.revision as f64,
    );
    for (kind, n) in [
        ("networks", catalog.networks.len()),
        ("endpoints", catalog.endpoints.len()),
        ("routes", catalog.routes.len()),
        ("hosts", catalog.hosts.len()),
    ] {
        s.gauge_with(
            "overlay_controller_catalog_objects",
            "Objects in the desired state, by kind (networks, endpoints, routes, hosts).",
            vec![("kind", kind.to_string())],
            n as f64,
        );
    }
    let mut per_network: std::collections::BTreeMap<&str, usize> =
        catalog.networks.keys().map(|n| (n.as_str(), 0)).collect();
    for endpoint in catalog.endpoints.values() {
        for a in &endpoint.attachments {
            if let Some(n) = per_network.get_mut(a.network.as_str()) {
                *n += 1;
            }
        }
    }
    for (network, n) in per_network {
        s.gauge_with(
            "overlay_controller_network_endpoints",
            "Endpoints attached to each network.",
            vec![("network", network.to_string())],
            n as f64,
        );
    }
    let mut by_status: std::collections::BTreeMap<&str, usize> =
        ["ready", "down", "degraded"].into_iter().map(|k| (k, 0)).collect();
    for host in catalog.hosts.values() {
        let problem = problems.get(&host.name).map(String::as_str);
        let (shown, _) = crate::liveness::shown_status(host, problem);
        let key = match shown.as_str() {
            "degraded" => "degraded",
            _ => host.status.as_str(),
        };
        *by_status.entry(key).or_default() += 1;
    }
    for (st, n) in by_status {
        s.gauge_with(
            "overlay_controller_hosts",
            "Registered hosts, by status (ready, down, degraded: ready but its agent reports a problem; the leader alone knows problems).",
            vec![("status", st.to_string())],
            n as f64,
        );
    }
    if let Some(t) = cert_expiry.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()) {
        s.gauge(
            "overlay_controller_tls_cert_expiry_timestamp_seconds",
            "When this member's TLS certificate expires (Unix time).",
            t.as_secs() as f64,
        );
    }
    s.gauge_with(
        "overlay_controller_build_info",
        "Always 1; the labels name this member's build.",
        vec![("version", env!("CARGO_PKG_VERSION").to_string()), ("id", status.id.to_string())],
        1.0,
    );
    s
}

/// Tower layer counting every gRPC call by method and final status code.
#[derive(Clone)]
pub struct CountRequests(pub Arc<Metrics>);

impl<S> tower_layer::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Counted<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin + Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = self.metrics.method_label(req.uri().path());
        let metrics = self.metrics.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            let (parts, body) = response.into_parts();
            let mut tally = Tally { metrics, method, done: false };
            // A call refused before any message (most errors) carries its status in the
            // headers ("trailers-only"); the rest in the trailers.
            tally.read_status(&parts.headers);
            Ok(http::Response::from_parts(parts, CountedBody { inner: body, tally }))
        })
    }
}

/// Records one call's status code once.
struct Tally {
    metrics: Arc<Metrics>,
    method: String,
    done: bool,
}

impl Tally {
    fn read_status(&mut self, headers: &http::HeaderMap) {
        if self.done {
            return;
        }
        if let Some(v) = headers.get("grpc-status") {
            self.record(tonic::Code::from_bytes(v.as_bytes()));
        }
    }

    fn record(&mut self, code: tonic::Code) {
        self.done = true;
        self.metrics.request(&self.method, code);
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        // The body went away before its trailers: the client cancelled (a watch stream
        // whose agent stopped, a timed-out call).
        if !self.done {
            self.record(tonic::Code::Cancelled);
        }
    }
}

/// A response body that reads the status code from the trailers as they pass.
pub struct CountedBody<B> {
    inner: B,
    tally: Tally,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(trailers) = frame.trailers_ref() {
                this.tally.read_status(trailers);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cluster::MemberInfo;
    use overlay_model::{Command, State};

    fn status() -> NodeStatus {
        let mut s = NodeStatus::initial(2, false);
        s.role = Role::Leader;
        s.term = 5;
        s.leader = 2;
        s.commit = 40;
        s.applied = 39;
        for (id, voter) in [(1, true), (2, true), (3, true), (4, false)] {
            s.members.insert(id, MemberInfo { address: format!("10.0.0.{id}:7400"), voter });
        }
        s
    }

    #[test]
    fn scrape_reads_raft_status_and_catalog() {
        let mut state = State::default();
        let net = |name: &str, subnet: &str| {
            Command::CreateNetwork(overlay_model::command::NetworkSpec {
                name: name.into(),
                subnet: subnet.parse().unwrap(),
                gateway: None,
                vni: None,
                mtu: None,
                encap: overlay_model::Encap::Vxlan,
                encrypted: false,
                internal: false,
            })
        };
        let endpoint = |name: &str| Command::CreateEndpoint {
            name: name.into(),
            host: "h1".into(),
            network: "front".into(),
            ip: None,
            aliases: vec![],
        };
        let host = Command::RegisterHost {
            name: "h1".into(),
            underlay_ip: "192.0.2.1".parse().unwrap(),
            underlay_prefix: 24,
            underlay_mtu: 1500,
            now_ms: 0,
        };
        for c in [
            host,
            net("front", "10.1.0.0/24"),
            net("back", "10.2.0.0/24"),
            endpoint("a"),
            endpoint("b"),
        ] {
            state.apply(&c).unwrap();
        }
        let s = scrape(&status(), &state.catalog, &Default::default(), None);
        assert_eq!(s.get("overlay_controller_raft_term", &[]), Some(5.0));
        assert_eq!(s.get("overlay_controller_raft_is_leader", &[]), Some(1.0));
        assert_eq!(s.get("overlay_controller_raft_has_leader", &[]), Some(1.0));
        assert_eq!(s.get("overlay_controller_raft_commit_index", &[]), Some(40.0));
        assert_eq!(s.get("overlay_controller_raft_members", &[("kind", "voter")]), Some(3.0));
        assert_eq!(s.get("overlay_controller_raft_members", &[("kind", "learner")]), Some(1.0));
        assert_eq!(s.get("overlay_controller_tls_cert_expiry_timestamp_seconds", &[]), None);
        let per = |n: &str| s.get("overlay_controller_network_endpoints", &[("network", n)]);
        assert_eq!((per("front"), per("back")), (Some(2.0), Some(0.0)));
        let objects = |k: &str| s.get("overlay_controller_catalog_objects", &[("kind", k)]);
        assert_eq!(
            (objects("networks"), objects("endpoints"), objects("hosts")),
            (Some(2.0), Some(2.0), Some(1.0))
        );
        assert_eq!(s.get("overlay_controller_hosts", &[("status", "ready")]), Some(1.0));
        assert_eq!(s.get("overlay_controller_hosts", &[("status", "down")]), Some(0.0));
        let problems = [("h1".to_string(), "no nft".to_string())].into();
        let s = scrape(&status(), &state.catalog, &problems, None);
        assert_eq!(s.get("overlay_controller_hosts", &[("status", "degraded")]), Some(1.0));
        assert_eq!(s.get("overlay_controller_hosts", &[("status", "ready")]), Some(0.0));
    }

    #[test]
    fn method_labels_are_bounded() {
        let m = Metrics::default();
        assert_eq!(
            m.method_label("/overlay.Overlay/CreateNetwork"),
            "overlay.Overlay/CreateNetwork"
        );
        assert_eq!(m.method_label("/nonsense"), "other");
        assert_eq!(m.method_label("/a b/c"), "other");
        for i in 0..MAX_METHODS {
            let _ = m.method_label(&format!("/x.Y/M{i}"));
        }
        assert_eq!(m.method_label("/x.Y/Another"), "other");
        assert_eq!(
            m.method_label("/overlay.Overlay/CreateNetwork"),
            "overlay.Overlay/CreateNetwork"
        );
    }
}
