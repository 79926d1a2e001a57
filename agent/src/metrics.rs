//! The agent's Prometheus metrics (`--metrics-listen`, served by `overlay-ops`).
//!
//! * Reconcile passes, counted as they end ([`Metrics::pass`]): passes, actions applied
//!   by kind, errors by stage, pass duration, when the last pass ended; what this host
//!   carries (networks, endpoints, catalog revision); whether the host firewall failed.
//! * The data plane, read at scrape time, never counted twice: the kernel's own
//!   counters of each VXLAN network's `ovx-` device (`/proc/net/dev` of the agent's
//!   network namespace), and for `--encap udp` networks the counters the data-plane
//!   daemon writes to `dataplane-counters.json` ([`dataplane_samples`], pure).
//!
//! Names start with `overlay_agent_`; the README lists them and what to alert on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use overlay_ops::metrics::{duration_buckets, Samples, Scraped};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::dataplane::client::{counters_path, pid_path, socket_path};
use crate::desired::{HostDesired, Uplink};
use crate::reconcile::Pass;

type Labels = Vec<(&'static str, String)>;

/// A network this host carries, as the data-plane metrics label it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub name: String,
    /// The uplink device (`ovx-<VNI>` or `ovu-<VNI>`).
    pub uplink: String,
    /// Carried by the user-space data plane (`--encap udp`).
    pub user_space: bool,
}

pub struct Metrics {
    passes: Counter,
    actions: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    pass_seconds: Histogram,
    last_pass: Gauge<f64, AtomicU64>,
    networks: Gauge,
    endpoints: Gauge,
    revision: Gauge,
    firewall_failing: Gauge,
    held_back: Gauge,
    /// By VNI, as of the last pass.
    carried: Mutex<BTreeMap<u32, Carried>>,
    data_dir: PathBuf,
}

impl Metrics {
    pub fn new(data_dir: &Path) -> Metrics {
        Metrics {
            passes: Counter::default(),
            actions: Family::default(),
            errors: Family::default(),
            pass_seconds: Histogram::new(duration_buckets()),
            last_pass: Gauge::default(),
            networks: Gauge::default(),
            endpoints: Gauge::default(),
            revision: Gauge::default(),
            firewall_failing: Gauge::default(),
            held_back: Gauge::default(),
            carried: Mutex::default(),
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// A pass ended after `took`: `result` is what reconcile returned (an error means
    /// the kernel could not even be observed).
    pub fn pass(
        &self,
        desired: &HostDesired,
        revision: u64,
        result: Result<&Pass, ()>,
        took: Duration,
    ) {
        self.passes.inc();
        self.pass_seconds.observe(took.as_secs_f64());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.last_pass.set(now.as_secs_f64());
        self.networks.set(desired.networks.len() as i64);
        self.endpoints.set(desired.endpoints.len() as i64);
        self.revision.set(i64::try_from(revision).unwrap_or(i64::MAX));
        match result {
            Ok(pass) => {
                let failed: Vec<&crate::plan::Action> =
                    pass.errors.iter().map(|e| &e.action).collect();
                for a in &pass.actions {
                    if !failed.contains(&a) && !pass.held_back.contains(a) {
                        self.actions.get_or_create(&vec![("kind", action_kind(a))]).inc();
                    }
                }
                for _ in &pass.errors {
                    self.error("apply");
                }
                self.firewall_failing.set(i64::from(pass.firewall.is_err()));
                self.held_back.set(pass.held_back.len() as i64);
            }
            Err(()) => self.error("observe"),
        }
        let carried = desired
            .networks
            .values()
            .map(|n| {
                let user_space = matches!(n.uplink_kind, Uplink::Tap { .. });
                (n.vni, Carried { name: n.name.clone(), uplink: n.uplink.clone(), user_space })
            })
            .collect();
        *self.carried.lock().unwrap_or_else(|p| p.into_inner()) = carried;
    }

    /// Something failed at `stage` (`apply`: one action; `observe`: a whole pass;
    /// `dataplane`: handing tables to the data-plane daemon).
    pub fn error(&self, stage: &str) {
        self.errors.get_or_create(&vec![("stage", stage.to_string())]).inc();
    }

    /// The registry `/metrics` encodes: the pass metrics, and the data plane read at
    /// each scrape.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::default();
        r.register(
            "overlay_agent_reconcile_passes",
            "Reconcile passes run (on every change and every reconcile_interval)",
            self.passes.clone(),
        );
        r.register(
            "overlay_agent_reconcile_actions",
            "Actions applied to the kernel by reconcile passes, by kind",
            self.actions.clone(),
        );
        r.register(
            "overlay_agent_reconcile_errors",
            "Reconcile failures, by stage (apply: one action failed; observe: a pass could not read the kernel; dataplane: the data-plane daemon refused its tables)",
            self.errors.clone(),
        );
        r.register(
            "overlay_agent_reconcile_duration_seconds",
            "Duration of one reconcile pass",
            self.pass_seconds.clone(),
        );
        r.register(
            "overlay_agent_last_reconcile_timestamp_seconds",
            "When the last reconcile pass ended (Unix time)",
            self.last_pass.clone(),
        );
        r.register("overlay_agent_networks", "Networks this host carries", self.networks.clone());
        r.register(
            "overlay_agent_endpoints",
            "Endpoints on this host in the desired state",
            self.endpoints.clone(),
        );
        r.register(
            "overlay_agent_catalog_revision",
            "Revision of the desired state the last pass reconciled to",
            self.revision.clone(),
        );
        r.register(
            "overlay_agent_firewall_failing",
            "1 when the last pass could not install the host firewall (nftables): the host is degraded and attaches no endpoint",
            self.firewall_failing.clone(),
        );
        r.register(
            "overlay_agent_reconcile_held_back",
            "Actions the last pass held back because the host firewall is not in place",
            self.held_back.clone(),
        );
        let me = self.clone();
        r.register_collector(Box::new(Scraped(move || me.scrape())));
        r
    }

    /// What `/metrics` shows.
    pub fn render(self: &Arc<Self>) -> overlay_ops::http::Render {
        let registry = self.registry();
        Arc::new(move || overlay_ops::metrics::encode(&registry))
    }

    fn scrape(&self) -> Samples {
        let carried = self.carried.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let socket = socket_path(&self.data_dir);
        // Counters of a daemon that is gone (no pid file) would be stale.
        let counters = if pid_path(&socket).exists() {
            std::fs::read_to_string(counters_path(&socket)).ok()
        } else {
            None
        };
        // The main thread's view (`/proc/PID`, not `/proc/self`): a thread that entered
        // an endpoint's namespace would see that namespace's devices.
        let path = format!("/proc/{}/net/dev", std::process::id());
        let proc_net_dev = std::fs::read_to_string(path).unwrap_or_default();
        let mut s = dataplane_samples(&carried, counters.as_deref(), &proc_net_dev);
        s.gauge_with(
            "overlay_agent_build_info",
            "Always 1; the label names this agent's build.",
            vec![("version", env!("CARGO_PKG_VERSION").to_string())],
            1.0,
        );
        s
    }
}

/// `CreateBridge { .. }` -> `create_bridge`: the `kind` label of an action.
pub fn action_kind(action: &crate::plan::Action) -> String {
    let debug = format!("{action:?}");
    let name: String = debug.chars().take_while(char::is_ascii_alphanumeric).collect();
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

const RX_PACKETS: &str = "overlay_agent_dataplane_rx_packets";
const RX_BYTES: &str = "overlay_agent_dataplane_rx_bytes";
const TX_PACKETS: &str = "overlay_agent_dataplane_tx_packets";
const TX_BYTES: &str = "overlay_agent_dataplane_tx_bytes";
const DROPS: &str = "overlay_agent_dataplane_drops";
const ERRORS: &str = "overlay_agent_dataplane_errors";
const RX_PACKETS_HELP: &str = "Packets received from other hosts for each network (kernel VXLAN device, or the user-space data plane).";
const RX_BYTES_HELP: &str = "Bytes received from other hosts for each network.";
const TX_PACKETS_HELP: &str =
    "Packets sent to other hosts for each network (the user-space data plane counts one per destination host).";
const TX_BYTES_HELP: &str = "Bytes sent to other hosts for each network.";
const DROPS_HELP: &str = "Packets dropped on each network's data plane, by reason (rx_dropped/tx_dropped: the kernel VXLAN device; unknown_source, malformed, no_route, wrong_transport, reassembly: the user-space data plane).";
const ERRORS_HELP: &str = "Send, receive or TAP-write errors on each network's data plane.";

/// Data-plane samples per carried network (pure): VXLAN networks from the kernel's
/// device counters in `proc_net_dev` (`/proc/net/dev` text), `--encap udp` networks
/// from the daemon's `counters` JSON (absent when no daemon runs).
pub fn dataplane_samples(
    carried: &BTreeMap<u32, Carried>,
    counters: Option<&str>,
    proc_net_dev: &str,
) -> Samples {
    let mut s = Samples::default();
    let devices = parse_proc_net_dev(proc_net_dev);
    let json: Option<serde_json::Value> = counters.and_then(|c| serde_json::from_str(c).ok());
    for (vni, net) in carried {
        let labels = |extra: Option<(&'static str, String)>| {
            let mut l: Labels = vec![("network", net.name.clone()), ("vni", vni.to_string())];
            l.extend(extra);
            l
        };
        if net.user_space {
            let Some(c) = json.as_ref().and_then(|j| j["udp"][vni.to_string()].as_object()) else {
                continue;
            };
            for (field, value) in c {
                let Some(v) = value.as_u64() else { continue };
                let v = v as f64;
                match field.as_str() {
                    "rx_frames" => s.counter_with(RX_PACKETS, RX_PACKETS_HELP, labels(None), v),
                    "rx_bytes" => s.counter_with(RX_BYTES, RX_BYTES_HELP, labels(None), v),
                    "tx_frames" => s.counter_with(TX_PACKETS, TX_PACKETS_HELP, labels(None), v),
                    "tx_bytes" => s.counter_with(TX_BYTES, TX_BYTES_HELP, labels(None), v),
                    "errors" => s.counter_with(ERRORS, ERRORS_HELP, labels(None), v),
                    other => {
                        if let Some(reason) = other.strip_prefix("dropped_") {
                            let l = labels(Some(("reason", reason.to_string())));
                            s.counter_with(DROPS, DROPS_HELP, l, v);
                        }
                    }
                }
            }
        } else if let Some(d) = devices.get(net.uplink.as_str()) {
            s.counter_with(RX_PACKETS, RX_PACKETS_HELP, labels(None), d.rx_packets as f64);
            s.counter_with(RX_BYTES, RX_BYTES_HELP, labels(None), d.rx_bytes as f64);
            s.counter_with(TX_PACKETS, TX_PACKETS_HELP, labels(None), d.tx_packets as f64);
            s.counter_with(TX_BYTES, TX_BYTES_HELP, labels(None), d.tx_bytes as f64);
            for (reason, v) in [("rx_dropped", d.rx_dropped), ("tx_dropped", d.tx_dropped)] {
                s.counter_with(
                    DROPS,
                    DROPS_HELP,
                    labels(Some(("reason", reason.into()))),
                    v as f64,
                );
            }
            s.counter_with(ERRORS, ERRORS_HELP, labels(None), (d.rx_errors + d.tx_errors) as f64);
        }
    }
    if let Some(j) = &json {
        if let Some(engine) = j["engine"].as_object() {
            for (field, value) in engine {
                let (Some(reason), Some(v)) = (field.strip_prefix("dropped_"), value.as_u64())
                else {
                    continue;
                };
                s.counter_with(
                    "overlay_agent_dataplane_unattributed_drops",
                    "Datagrams the user-space data plane dropped before knowing their network, by reason (unknown_vni, malformed).",
                    vec![("reason", reason.to_string())],
                    v as f64,
                );
            }
        }
        if let Some(quic) = j["quic"].as_object() {
            for (field, value) in quic {
                let Some(v) = value.as_u64() else { continue };
                let v = v as f64;
                match field.as_str() {
                    "connections" => s.gauge(
                        "overlay_agent_dataplane_quic_connections",
                        "QUIC connections of the encrypted data plane to other hosts.",
                        v,
                    ),
                    "sent" | "received" | "dropped" | "rejected_peers" => s.counter_with(
                        "overlay_agent_dataplane_quic_datagrams",
                        "Datagrams of the encrypted data plane (QUIC), by event (sent, received, dropped, rejected_peers).",
                        vec![("event", field.clone())],
                        v,
                    ),
                    _ => {}
                }
            }
        }
    }
    s
}

/// One device's counters from `/proc/net/dev`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DevCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// `/proc/net/dev` text -> counters by device name (lines it cannot read are skipped).
pub fn parse_proc_net_dev(text: &str) -> BTreeMap<&str, DevCounters> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else { continue };
        let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if f.len() < 16 {
            continue;
        }
        out.insert(
            name.trim(),
            DevCounters {
                rx_bytes: f[0],
                rx_packets: f[1],
                rx_errors: f[2],
                rx_dropped: f[3],
                tx_bytes: f[8],
                tx_packets: f[9],
                tx_errors: f[10],
                tx_dropped: f[11],
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PROC_NET_DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
ovx-4096:   5000      40    1    3    0     0          0         0     6000      50    2    4    0     0       0          0
";

    fn carried() -> BTreeMap<u32, Carried> {
        [
            (4096, Carried { name: "front".into(), uplink: "ovx-4096".into(), user_space: false }),
            (4097, Carried { name: "udpnet".into(), uplink: "ovu-4097".into(), user_space: true }),
            (4098, Carried { name: "gone".into(), uplink: "ovx-4098".into(), user_space: false }),
        ]
        .into()
    }

    #[test]
    fn proc_net_dev_is_parsed() {
        let d = parse_proc_net_dev(PROC_NET_DEV);
        assert_eq!(d["lo"].rx_packets, 2);
        let v = d["ovx-4096"];
        assert_eq!((v.rx_bytes, v.rx_packets, v.rx_errors, v.rx_dropped), (5000, 40, 1, 3));
        assert_eq!((v.tx_bytes, v.tx_packets, v.tx_errors, v.tx_dropped), (6000, 50, 2, 4));
        assert!(parse_proc_net_dev("garbage\nx: 1 2\n").is_empty());
    }

    #[test]
    fn dataplane_counters_per_network_from_kernel_and_daemon() {
        let json = r#"{"udp":{"4097":{"rx_frames":7,"rx_bytes":700,"tx_frames":9,"tx_bytes":900,
            "dropped_unknown_source":2,"dropped_malformed":1,"errors":0}},
            "engine":{"dropped_unknown_vni":5,"dropped_malformed":0},
            "quic":{"sent":1,"received":2,"dropped":0,"rejected_peers":3,"connections":1}}"#;
        let s = dataplane_samples(&carried(), Some(json), PROC_NET_DEV);
        let front = [("network", "front"), ("vni", "4096")];
        let udp = [("network", "udpnet"), ("vni", "4097")];
        assert_eq!(s.get(RX_PACKETS, &front), Some(40.0));
        assert_eq!(s.get(TX_BYTES, &front), Some(6000.0));
        assert_eq!(s.get(ERRORS, &front), Some(3.0));
        let drop = |l: &[(&str, &str)], r: &str| {
            let mut l = l.to_vec();
            l.push(("reason", r));
            s.get(DROPS, &l)
        };
        assert_eq!(drop(&front, "rx_dropped"), Some(3.0));
        assert_eq!(s.get(RX_PACKETS, &udp), Some(7.0));
        assert_eq!(s.get(TX_PACKETS, &udp), Some(9.0));
        assert_eq!(drop(&udp, "unknown_source"), Some(2.0));
        assert_eq!(drop(&udp, "malformed"), Some(1.0));
        assert_eq!(
            s.get("overlay_agent_dataplane_unattributed_drops", &[("reason", "unknown_vni")]),
            Some(5.0)
        );
        assert_eq!(
            s.get("overlay_agent_dataplane_quic_datagrams", &[("event", "rejected_peers")]),
            Some(3.0)
        );
        assert_eq!(s.get("overlay_agent_dataplane_quic_connections", &[]), Some(1.0));
        // A network whose device is missing, and no daemon: nothing made up.
        assert!(!s.0.iter().any(|x| x.labels.iter().any(|(_, v)| v == "gone")));
        let s = dataplane_samples(&carried(), None, "");
        assert!(s.0.is_empty());
    }

    #[test]
    fn action_kinds_are_snake_case_variant_names() {
        let a = crate::plan::Action::SetUp { ns: crate::plan::Ns::Host, dev: "ovb-1".into() };
        assert_eq!(action_kind(&a), "set_up");
    }
}
