//! What the user sees: the API's messages turned into `-o json` objects (snake_case keys,
//! shapes fixed by SPEC.md) and into aligned tables. Pure formatting; the current time is
//! passed in so that "2s ago" can be tested.

use overlay_proto::pb;
use serde::Serialize;

/// Something a command prints: as JSON (`-o json`) or as a table (the default).
pub trait Render {
    type Json: Serialize;
    fn json(&self) -> Self::Json;
    /// The table, ending in a newline. `now_ms` is the current unix time in ms.
    fn table(&self, now_ms: i64) -> String;
}

// ---- JSON shapes ----

#[derive(Debug, Serialize)]
pub struct NetworkJson {
    pub name: String,
    pub subnet: String,
    pub gateway: String,
    pub vni: u32,
    pub mtu: u32,
    pub encap: String,
    pub internal: bool,
    pub encrypted: bool,
    pub endpoints: Vec<NetworkEndpointJson>,
}

#[derive(Debug, Serialize)]
pub struct NetworkEndpointJson {
    pub name: String,
    pub host: String,
    pub interface: String,
    pub ip: String,
    pub mac: String,
    pub aliases: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct EndpointJson {
    pub name: String,
    pub host: String,
    /// `pending` until its host has realized it, `ready`, or `failed` (issue 15).
    pub status: String,
    /// Why it failed, or what it waits for while pending; empty when ready.
    pub reason: String,
    pub attachments: Vec<AttachmentJson>,
}

#[derive(Debug, Serialize)]
pub struct AttachmentJson {
    pub network: String,
    pub interface: String,
    pub ip: String,
    pub mac: String,
    pub aliases: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct HostJson {
    pub name: String,
    pub underlay_ip: String,
    pub status: String,
    pub endpoints: u32,
    /// RFC 3339 UTC; `None` (null) if the host never sent a heartbeat.
    pub last_seen: Option<String>,
    pub underlay_mtu: u32,
    /// Prefix length of the host's underlay network; 0 until its agent reports it.
    pub underlay_prefix: u32,
    /// Why the host is `degraded` (what its agent reports); empty otherwise.
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct RouteJson {
    pub network: String,
    pub destination: String,
    pub via: String,
    pub via_ip: String,
}

#[derive(Debug, Serialize)]
pub struct ClusterJson {
    /// `None` (null) while no leader is known.
    pub leader: Option<u64>,
    pub members: Vec<MemberJson>,
    /// `None` until the first leader named the cluster.
    pub cluster_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MemberJson {
    pub id: u64,
    pub address: String,
    pub role: String,
    pub term: u64,
    pub commit_index: u64,
    pub reachable: bool,
    pub applied_index: u64,
    pub revision: u64,
    pub digest: String,
    pub snapshot_index: u64,
    /// Highest log index the leader knows to match its own (0 when no leader answered).
    pub matched: u64,
    /// False for a learner: a member being added that has not caught up yet.
    pub voter: bool,
}

impl From<&pb::Network> for NetworkJson {
    fn from(n: &pb::Network) -> Self {
        NetworkJson {
            name: n.name.clone(),
            subnet: n.subnet.clone(),
            gateway: n.gateway.clone(),
            vni: n.vni,
            mtu: n.mtu,
            encap: n.encap.clone(),
            internal: n.internal,
            encrypted: n.encrypted,
            endpoints: n
                .endpoints
                .iter()
                .map(|e| NetworkEndpointJson {
                    name: e.name.clone(),
                    host: e.host.clone(),
                    interface: e.interface.clone(),
                    ip: e.ip.clone(),
                    mac: e.mac.clone(),
                    aliases: e.aliases.clone(),
                })
                .collect(),
        }
    }
}

impl From<&pb::Endpoint> for EndpointJson {
    fn from(e: &pb::Endpoint) -> Self {
        EndpointJson {
            name: e.name.clone(),
            host: e.host.clone(),
            status: status_of(e).to_string(),
            reason: e.reason.clone(),
            attachments: e
                .attachments
                .iter()
                .map(|a| AttachmentJson {
                    network: a.network.clone(),
                    interface: a.interface.clone(),
                    ip: a.ip.clone(),
                    mac: a.mac.clone(),
                    aliases: a.aliases.clone(),
                })
                .collect(),
        }
    }
}

impl From<&pb::Host> for HostJson {
    fn from(h: &pb::Host) -> Self {
        HostJson {
            name: h.name.clone(),
            underlay_ip: h.underlay_ip.clone(),
            status: h.status.clone(),
            endpoints: h.endpoints,
            last_seen: (h.last_seen_ms != 0).then(|| rfc3339(h.last_seen_ms)),
            underlay_mtu: h.underlay_mtu,
            underlay_prefix: h.underlay_prefix,
            reason: h.reason.clone(),
        }
    }
}

impl From<&pb::Route> for RouteJson {
    fn from(r: &pb::Route) -> Self {
        RouteJson {
            network: r.network.clone(),
            destination: r.destination.clone(),
            via: r.via.clone(),
            via_ip: r.via_ip.clone(),
        }
    }
}

impl From<&pb::Member> for MemberJson {
    fn from(m: &pb::Member) -> Self {
        MemberJson {
            id: m.id,
            address: m.address.clone(),
            role: m.role.clone(),
            term: m.term,
            commit_index: m.commit_index,
            reachable: m.reachable,
            applied_index: m.applied_index,
            revision: m.revision,
            digest: m.digest.clone(),
            snapshot_index: m.snapshot_index,
            matched: m.matched,
            voter: m.voter,
        }
    }
}

// ---- Render: lists are slices, single objects the message itself ----

impl Render for [pb::Network] {
    type Json = Vec<NetworkJson>;
    fn json(&self) -> Self::Json {
        self.iter().map(NetworkJson::from).collect()
    }
    fn table(&self, _now_ms: i64) -> String {
        let rows = self
            .iter()
            .map(|n| {
                vec![
                    cell(&n.name),
                    cell(&n.subnet),
                    cell(&n.gateway),
                    n.vni.to_string(),
                    n.mtu.to_string(),
                    encap(n),
                    n.internal.to_string(),
                    n.endpoints.len().to_string(),
                ]
            })
            .collect::<Vec<_>>();
        table(&["NAME", "SUBNET", "GATEWAY", "VNI", "MTU", "ENCAP", "INTERNAL", "ENDPOINTS"], &rows)
    }
}

/// One network: its settings, then one row per attached endpoint.
impl Render for pb::Network {
    type Json = NetworkJson;
    fn json(&self) -> Self::Json {
        NetworkJson::from(self)
    }
    fn table(&self, _now_ms: i64) -> String {
        let mut out = fields(&[
            ("Name", cell(&self.name)),
            ("Subnet", cell(&self.subnet)),
            ("Gateway", cell(&self.gateway)),
            ("VNI", self.vni.to_string()),
            ("MTU", self.mtu.to_string()),
            ("Encap", cell(&self.encap)),
            ("Internal", self.internal.to_string()),
            ("Encrypted", self.encrypted.to_string()),
            ("Endpoints", self.endpoints.len().to_string()),
        ]);
        if !self.endpoints.is_empty() {
            let rows = self
                .endpoints
                .iter()
                .map(|e| {
                    vec![
                        cell(&e.name),
                        cell(&e.host),
                        cell(&e.interface),
                        cell(&e.ip),
                        cell(&e.mac),
                        aliases(&e.aliases),
                    ]
                })
                .collect::<Vec<_>>();
            out.push('\n');
            out.push_str(&table(&["NAME", "HOST", "INTERFACE", "IP", "MAC", "ALIASES"], &rows));
        }
        out
    }
}

/// The status an endpoint is shown with: a controller from before statuses sends none.
fn status_of(e: &pb::Endpoint) -> &str {
    if e.status.is_empty() {
        "unknown"
    } else {
        &e.status
    }
}

impl Render for [pb::Endpoint] {
    type Json = Vec<EndpointJson>;
    fn json(&self) -> Self::Json {
        self.iter().map(EndpointJson::from).collect()
    }
    /// One row per attachment; an endpoint without any still gets a row. Its status
    /// is on every row (so `grep` finds it), its reason on the first.
    fn table(&self, _now_ms: i64) -> String {
        let mut rows = Vec::new();
        for e in self {
            let row = |a: Option<&pb::Attachment>, first: bool| {
                let dash = || "-".to_string();
                vec![
                    cell(&e.name),
                    cell(&e.host),
                    cell(status_of(e)),
                    a.map_or_else(dash, |a| cell(&a.network)),
                    a.map_or_else(dash, |a| cell(&a.interface)),
                    a.map_or_else(dash, |a| cell(&a.ip)),
                    a.map_or_else(dash, |a| cell(&a.mac)),
                    a.map_or_else(dash, |a| aliases(&a.aliases)),
                    if first { cell(&e.reason) } else { cell("") },
                ]
            };
            if e.attachments.is_empty() {
                rows.push(row(None, true));
            }
            for (i, a) in e.attachments.iter().enumerate() {
                rows.push(row(Some(a), i == 0));
            }
        }
        table(
            &["NAME", "HOST", "STATUS", "NETWORK", "INTERFACE", "IP", "MAC", "ALIASES", "REASON"],
            &rows,
        )
    }
}

impl Render for pb::Endpoint {
    type Json = EndpointJson;
    fn json(&self) -> Self::Json {
        EndpointJson::from(self)
    }
    fn table(&self, now_ms: i64) -> String {
        std::slice::from_ref(self).table(now_ms)
    }
}

impl Render for [pb::Host] {
    type Json = Vec<HostJson>;
    fn json(&self) -> Self::Json {
        self.iter().map(HostJson::from).collect()
    }
    fn table(&self, now_ms: i64) -> String {
        let rows = self
            .iter()
            .map(|h| {
                vec![
                    cell(&h.name),
                    cell(&h.underlay_ip),
                    cell(&h.status),
                    h.endpoints.to_string(),
                    ago(h.last_seen_ms, now_ms),
                    cell(&h.reason),
                ]
            })
            .collect::<Vec<_>>();
        table(&["NAME", "UNDERLAY-IP", "STATUS", "ENDPOINTS", "LAST-SEEN", "REASON"], &rows)
    }
}

impl Render for pb::Host {
    type Json = HostJson;
    fn json(&self) -> Self::Json {
        HostJson::from(self)
    }
    fn table(&self, now_ms: i64) -> String {
        std::slice::from_ref(self).table(now_ms)
    }
}

impl Render for [pb::Route] {
    type Json = Vec<RouteJson>;
    fn json(&self) -> Self::Json {
        self.iter().map(RouteJson::from).collect()
    }
    fn table(&self, _now_ms: i64) -> String {
        let rows = self
            .iter()
            .map(|r| vec![cell(&r.network), cell(&r.destination), cell(&r.via), cell(&r.via_ip)])
            .collect::<Vec<_>>();
        table(&["NETWORK", "DESTINATION", "VIA", "VIA-IP"], &rows)
    }
}

impl Render for pb::Route {
    type Json = RouteJson;
    fn json(&self) -> Self::Json {
        RouteJson::from(self)
    }
    fn table(&self, now_ms: i64) -> String {
        std::slice::from_ref(self).table(now_ms)
    }
}

impl Render for pb::ClusterStatusResponse {
    type Json = ClusterJson;
    fn json(&self) -> Self::Json {
        ClusterJson {
            leader: (self.leader != 0).then_some(self.leader),
            members: self.members.iter().map(MemberJson::from).collect(),
            cluster_id: (!self.cluster_id.is_empty()).then(|| self.cluster_id.clone()),
        }
    }
    fn table(&self, _now_ms: i64) -> String {
        let rows = self
            .members
            .iter()
            .map(|m| {
                vec![
                    m.id.to_string(),
                    cell(&m.address),
                    cell(&m.role),
                    m.term.to_string(),
                    m.commit_index.to_string(),
                    m.applied_index.to_string(),
                    m.revision.to_string(),
                    m.reachable.to_string(),
                    m.matched.to_string(),
                    m.voter.to_string(),
                ]
            })
            .collect::<Vec<_>>();
        table(
            &[
                "ID",
                "ADDRESS",
                "ROLE",
                "TERM",
                "COMMIT",
                "APPLIED",
                "REVISION",
                "REACHABLE",
                "MATCHED",
                "VOTER",
            ],
            &rows,
        )
    }
}

/// The answer to `cluster member add` / `rm`: the member and the configuration after.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberChanged {
    Added(pb::MemberChangeResponse),
    Removed(pb::MemberChangeResponse),
}

#[derive(Debug, Serialize)]
pub struct MemberChangedJson {
    /// `added` or `removed`.
    pub change: &'static str,
    pub id: u64,
    pub address: String,
    pub members: Vec<ConfiguredMemberJson>,
}

#[derive(Debug, Serialize)]
pub struct ConfiguredMemberJson {
    pub id: u64,
    pub address: String,
    pub voter: bool,
}

impl Render for MemberChanged {
    type Json = MemberChangedJson;
    fn json(&self) -> Self::Json {
        let (change, r) = match self {
            MemberChanged::Added(r) => ("added", r),
            MemberChanged::Removed(r) => ("removed", r),
        };
        MemberChangedJson {
            change,
            id: r.id,
            address: r.address.clone(),
            members: r
                .members
                .iter()
                .map(|m| ConfiguredMemberJson {
                    id: m.id,
                    address: m.address.clone(),
                    voter: m.voter,
                })
                .collect(),
        }
    }
    fn table(&self, _now_ms: i64) -> String {
        match self {
            MemberChanged::Added(r) => {
                let voter = r.members.iter().any(|m| m.id == r.id && m.voter);
                if voter {
                    format!("added member {} ({})\n", r.id, r.address)
                } else {
                    format!(
                        "added member {} ({}) as a learner: it becomes a voter once it has caught \
                         up (`overlayctl cluster status` shows it)\n",
                        r.id, r.address
                    )
                }
            }
            MemberChanged::Removed(r) if r.address.is_empty() => {
                format!("removed member {}\n", r.id)
            }
            MemberChanged::Removed(r) => format!("removed member {} ({})\n", r.id, r.address),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct JoinTokenJson {
    pub token: String,
}

impl Render for pb::JoinTokenResponse {
    type Json = JoinTokenJson;
    fn json(&self) -> Self::Json {
        JoinTokenJson { token: self.token.clone() }
    }
    /// The token is the last word, so `$(overlayctl cluster join-token | awk '{print $NF}')`
    /// and the like work.
    fn table(&self, _now_ms: i64) -> String {
        format!(
            "To add a host, run on it: overlay-agent --name HOST --underlay-ip IP --controller URLS --tls-ca ca.pem --join-token TOKEN, with TOKEN:\n{}\n",
            self.token
        )
    }
}

/// The confirmation of a removal, which the API answers with `Empty`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// `kind` is `network`, `endpoint` or `host`.
    Named {
        kind: &'static str,
        name: String,
    },
    Route {
        network: String,
        destination: String,
    },
}

#[derive(Debug, Serialize)]
pub struct RemovedJson {
    pub removed: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

impl Render for Removed {
    type Json = RemovedJson;
    fn json(&self) -> Self::Json {
        match self {
            Removed::Named { kind, name } => RemovedJson {
                removed: kind,
                name: Some(name.clone()),
                network: None,
                destination: None,
            },
            Removed::Route { network, destination } => RemovedJson {
                removed: "route",
                name: None,
                network: Some(network.clone()),
                destination: Some(destination.clone()),
            },
        }
    }
    fn table(&self, _now_ms: i64) -> String {
        match self {
            Removed::Named { kind, name } => format!("removed {kind} {name}\n"),
            Removed::Route { network, destination } => {
                format!("removed route {destination} from network {network}\n")
            }
        }
    }
}

// ---- helpers ----

/// Aligned columns, three spaces apart, no trailing blanks; headers even with no rows.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, value) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(value.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, value) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(value);
            let width = widths.get(i).copied().unwrap_or(0);
            line.extend(std::iter::repeat_n(' ', width.saturating_sub(value.chars().count())));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `Key:   value` lines with the values aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs.iter().map(|(k, v)| format!("{:<width$}  {v}\n", format!("{k}:"))).collect()
}

/// Empty strings print as `-` so that columns stay countable.
fn cell(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn aliases(aliases: &[String]) -> String {
    if aliases.is_empty() {
        "-".into()
    } else {
        aliases.join(",")
    }
}

fn encap(n: &pb::Network) -> String {
    if n.encrypted {
        format!("{}+encrypted", cell(&n.encap))
    } else {
        cell(&n.encap)
    }
}

/// How long ago `then_ms` was, coarsely: `4s ago`, `3m ago`, `5h ago`, `2d ago`; `never` for 0.
pub fn ago(then_ms: i64, now_ms: i64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    let secs = now_ms.saturating_sub(then_ms).max(0) / 1000;
    match secs {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

/// Unix milliseconds as RFC 3339 UTC to the second: `2026-11-23T10:04:05Z`.
pub fn rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let in_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The current unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::fake::{sample_cluster, sample_endpoint, sample_host, sample_network, sample_route};

    fn value<R: Render + ?Sized>(r: &R) -> Value {
        serde_json::to_value(r.json()).expect("serializable")
    }

    #[test]
    fn network_json() {
        let n = sample_network("frontend");
        let expected = json!({
            "name": "frontend",
            "subnet": "10.0.1.0/24",
            "gateway": "10.0.1.1",
            "vni": 4097,
            "mtu": 1450,
            "encap": "vxlan",
            "internal": false,
            "encrypted": false,
            "endpoints": [{
                "name": "s1",
                "host": "h1",
                "interface": "eth0",
                "ip": "10.0.1.2",
                "mac": "02:00:00:00:00:01",
                "aliases": ["web"],
            }],
        });
        assert_eq!(value(&n), expected);
        assert_eq!(value(std::slice::from_ref(&n)), json!([expected]));
        assert_eq!(value(&[] as &[pb::Network]), json!([]));
    }

    #[test]
    fn endpoint_json() {
        let expected = json!({
            "name": "s1",
            "host": "h1",
            "status": "ready",
            "reason": "",
            "attachments": [
                {"network": "frontend", "interface": "eth0", "ip": "10.0.1.2", "mac": "02:00:00:00:00:01", "aliases": ["web"]},
                {"network": "backend", "interface": "eth1", "ip": "10.0.2.2", "mac": "02:00:00:00:00:02", "aliases": []},
            ],
        });
        assert_eq!(value(&sample_endpoint("s1")), expected);
        assert_eq!(value(&[sample_endpoint("s1")][..]), json!([expected]));
    }

    #[test]
    fn host_json() {
        let expected = json!({
            "name": "h1",
            "underlay_ip": "192.168.1.10",
            "status": "ready",
            "endpoints": 1,
            "last_seen": "2026-11-23T10:04:05Z",
            "underlay_mtu": 1500,
            "underlay_prefix": 24,
            "reason": "",
        });
        assert_eq!(value(&sample_host("h1")), expected);
        let degraded = pb::Host {
            status: "degraded".into(),
            reason: "host firewall: cannot run nft".into(),
            ..sample_host("h1")
        };
        assert_eq!(value(&degraded)["status"], "degraded");
        assert_eq!(value(&degraded)["reason"], "host firewall: cannot run nft");
        let never = pb::Host { last_seen_ms: 0, status: "down".into(), ..sample_host("h2") };
        assert_eq!(value(&never)["last_seen"], Value::Null);
        assert_eq!(value(&[sample_host("h1"), never][..]).as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn route_json() {
        let expected = json!({"network": "frontend", "destination": "10.0.2.0/24", "via": "gw", "via_ip": "10.0.1.254"});
        assert_eq!(value(&sample_route()), expected);
        assert_eq!(value(&[sample_route()][..]), json!([expected]));
    }

    #[test]
    fn cluster_json() {
        let member = |id: u64, role: &str, reachable: bool| {
            json!({
                "id": id, "address": format!("10.0.0.{id}:7400"), "role": role, "term": 3,
                "commit_index": 42, "reachable": reachable, "applied_index": 42, "revision": 17,
                "digest": "9f2c", "snapshot_index": 0, "matched": if reachable { 42 } else { 0 },
                "voter": true,
            })
        };
        assert_eq!(
            value(&sample_cluster()),
            json!({
                "cluster_id": "0123456789abcdef0123456789abcdef",
                "leader": 1,
                "members": [member(1, "leader", true), member(2, "follower", true), member(3, "unreachable", false)],
            })
        );
        let leaderless =
            pb::ClusterStatusResponse { leader: 0, members: vec![], cluster_id: String::new() };
        assert_eq!(value(&leaderless), json!({"leader": null, "members": [], "cluster_id": null}));
    }

    #[test]
    fn member_changes_json_and_table() {
        let member = |id: u64, voter: bool| pb::Member {
            id,
            address: format!("10.0.0.{id}:7400"),
            voter,
            ..Default::default()
        };
        let added = MemberChanged::Added(pb::MemberChangeResponse {
            id: 4,
            address: "10.0.0.4:7400".into(),
            members: vec![member(1, true), member(4, false)],
        });
        assert_eq!(
            value(&added),
            json!({"change": "added", "id": 4, "address": "10.0.0.4:7400", "members": [
                {"id": 1, "address": "10.0.0.1:7400", "voter": true},
                {"id": 4, "address": "10.0.0.4:7400", "voter": false},
            ]})
        );
        assert!(added.table(0).starts_with("added member 4 (10.0.0.4:7400) as a learner"));
        let removed = MemberChanged::Removed(pb::MemberChangeResponse {
            id: 3,
            address: "10.0.0.3:7400".into(),
            members: vec![member(1, true)],
        });
        assert_eq!(value(&removed)["change"], "removed");
        assert_eq!(removed.table(0), "removed member 3 (10.0.0.3:7400)\n");
    }

    #[test]
    fn removed_json_and_table() {
        let endpoint = Removed::Named { kind: "endpoint", name: "s1".into() };
        assert_eq!(value(&endpoint), json!({"removed": "endpoint", "name": "s1"}));
        assert_eq!(endpoint.table(0), "removed endpoint s1\n");
        let route =
            Removed::Route { network: "frontend".into(), destination: "10.0.2.0/24".into() };
        assert_eq!(
            value(&route),
            json!({"removed": "route", "network": "frontend", "destination": "10.0.2.0/24"})
        );
        assert_eq!(route.table(0), "removed route 10.0.2.0/24 from network frontend\n");
    }

    #[test]
    fn network_tables() {
        let backend = pb::Network {
            name: "backend".into(),
            subnet: "10.0.2.0/24".into(),
            gateway: "10.0.2.1".into(),
            vni: 7,
            mtu: 1400,
            encap: "udp".into(),
            internal: true,
            encrypted: true,
            endpoints: vec![],
        };
        let list = [sample_network("frontend"), backend.clone()];
        assert_eq!(
            list.table(0),
            "\
NAME       SUBNET        GATEWAY    VNI    MTU    ENCAP           INTERNAL   ENDPOINTS
frontend   10.0.1.0/24   10.0.1.1   4097   1450   vxlan           false      1
backend    10.0.2.0/24   10.0.2.1   7      1400   udp+encrypted   true       0
"
        );
        assert_eq!(
            sample_network("frontend").table(0),
            "\
Name:       frontend
Subnet:     10.0.1.0/24
Gateway:    10.0.1.1
VNI:        4097
MTU:        1450
Encap:      vxlan
Internal:   false
Encrypted:  false
Endpoints:  1

NAME   HOST   INTERFACE   IP         MAC                 ALIASES
s1     h1     eth0        10.0.1.2   02:00:00:00:00:01   web
"
        );
        assert!(backend.table(0).ends_with("Endpoints:  0\n"));
    }

    #[test]
    fn endpoint_table_has_a_row_per_attachment() {
        let bare = pb::Endpoint {
            name: "lonely".into(),
            host: "h2".into(),
            attachments: vec![],
            status: "failed".into(),
            reason: "namespace lonely exists and was not created by overlay-agent".into(),
        };
        assert_eq!(
            [sample_endpoint("s1"), bare].table(0),
            "\
NAME     HOST   STATUS   NETWORK    INTERFACE   IP         MAC                 ALIASES   REASON
s1       h1     ready    frontend   eth0        10.0.1.2   02:00:00:00:00:01   web       -
s1       h1     ready    backend    eth1        10.0.2.2   02:00:00:00:00:02   -         -
lonely   h2     failed   -          -           -          -                   -         namespace lonely exists and was not created by overlay-agent
"
        );
    }

    #[test]
    fn host_route_cluster_tables() {
        let now = 1_795_428_247_500;
        let never =
            pb::Host { last_seen_ms: 0, status: "down".into(), endpoints: 0, ..sample_host("h2") };
        let degraded = pb::Host {
            status: "degraded".into(),
            reason: "host firewall: cannot run nft".into(),
            ..sample_host("h3")
        };
        assert_eq!(
            [sample_host("h1"), never, degraded].table(now),
            "\
NAME   UNDERLAY-IP    STATUS     ENDPOINTS   LAST-SEEN   REASON
h1     192.168.1.10   ready      1           2s ago      -
h2     192.168.1.10   down       0           never       -
h3     192.168.1.10   degraded   1           2s ago      host firewall: cannot run nft
"
        );
        assert_eq!(
            sample_route().table(0),
            "\
NETWORK    DESTINATION   VIA   VIA-IP
frontend   10.0.2.0/24   gw    10.0.1.254
"
        );
        assert_eq!(
            sample_cluster().table(0),
            "\
ID   ADDRESS         ROLE          TERM   COMMIT   APPLIED   REVISION   REACHABLE   MATCHED   VOTER
1    10.0.0.1:7400   leader        3      42       42        17         true        42        true
2    10.0.0.2:7400   follower      3      42       42        17         true        42        true
3    10.0.0.3:7400   unreachable   3      42       42        17         false       0         true
"
        );
        assert_eq!(([] as [pb::Route; 0]).table(0), "NETWORK   DESTINATION   VIA   VIA-IP\n");
    }

    #[test]
    fn relative_times() {
        let now = 1_000_000_000;
        assert_eq!(ago(0, now), "never");
        assert_eq!(ago(now, now), "0s ago");
        assert_eq!(ago(now + 5_000, now), "0s ago");
        assert_eq!(ago(now - 59_999, now), "59s ago");
        assert_eq!(ago(now - 60_000, now), "1m ago");
        assert_eq!(ago(now - 7_200_000, now), "2h ago");
        assert_eq!(ago(now - 3 * 86_400_000, now), "3d ago");
        assert_eq!(ago(i64::MIN + 1, i64::MAX), format!("{}d ago", i64::MAX / 1000 / 86400));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_428_245_000), "2026-11-23T10:04:05Z");
        assert_eq!(rfc3339(1_795_428_245_999), "2026-11-23T10:04:05Z");
        assert_eq!(rfc3339(951_868_799_000), "2000-02-29T23:59:59Z");
        assert_eq!(rfc3339(4_107_542_400_000), "2100-03-01T00:00:00Z");
        assert_eq!(rfc3339(253_402_300_799_000), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(-62_135_596_800_000), "0001-01-01T00:00:00Z");
        // Nothing overflows at the extremes.
        assert!(rfc3339(i64::MAX).ends_with('Z'));
        assert!(rfc3339(i64::MIN).ends_with('Z'));
    }

    #[test]
    fn civil_dates_round_trip_day_by_day() {
        // Walk 1900..2200 and check that consecutive days are consecutive dates.
        let mut prev = civil_from_days(-25_568); // 1899-12-31
        assert_eq!(prev, (1899, 12, 31));
        for days in -25_567..84_000 {
            let (y, m, d) = civil_from_days(days);
            let (py, pm, pd) = prev;
            let next_ok = (y == py && m == pm && d == pd + 1)
                || (y == py && m == pm + 1 && d == 1)
                || (y == py + 1 && m == 1 && d == 1 && pm == 12 && pd == 31);
            assert!(next_ok, "{prev:?} -> {:?}", (y, m, d));
            prev = (y, m, d);
        }
    }
}
