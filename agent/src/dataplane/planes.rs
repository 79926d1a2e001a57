//! The engines the daemon drives: the UDP engine (`overlay-udp`) for every
//! `--encap udp` network, and, when this host has a certificate, the QUIC plane
//! (`overlay-quic`) that carries the `--encrypted` ones.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use overlay_quic::{QuicConfig, QuicPlane};
use overlay_udp::{Engine, EngineConfig, SecureTransport, UdpNetwork};

use super::protocol::{DaemonSettings, Tables};

/// Host name by underlay address, shared with the QUIC plane's certificate check.
type HostNames = Arc<RwLock<BTreeMap<IpAddr, String>>>;

pub struct Planes {
    engine: Arc<Engine>,
    quic: Option<Arc<QuicPlane>>,
    names: HostNames,
}

/// The QUIC plane as the UDP engine's transport for `--encrypted` networks.
struct Encrypted(Arc<QuicPlane>);

impl SecureTransport for Encrypted {
    fn max_datagram(&self, peer: IpAddr) -> Option<usize> {
        self.0.max_datagram(peer)
    }

    fn send(&self, peer: IpAddr, datagram: &[u8]) -> bool {
        self.0.send(peer, datagram)
    }
}

impl Planes {
    /// Binds the UDP socket (and the QUIC endpoint) on the underlay address.
    pub async fn start(settings: &DaemonSettings) -> Result<Planes> {
        let ip = IpAddr::V4(settings.underlay_ip);
        let engine = Arc::new(
            Engine::start(EngineConfig {
                listen: SocketAddr::new(ip, settings.udp_port),
                underlay_mtu: settings.underlay_mtu,
                queues: settings.queues,
            })
            .with_context(|| format!("UDP data plane on {ip}:{}", settings.udp_port))?,
        );
        let names: HostNames = Arc::default();
        let quic = match &settings.tls {
            None => None,
            Some((ca, cert, key)) => {
                let identity = overlay_quic::pki::Identity::load_for(
                    ca,
                    cert,
                    key,
                    &settings.host,
                    overlay_quic::pki::Role::Agent,
                )
                .context("loading this host's certificate")?;
                let listen = SocketAddr::new(ip, settings.quic_port);
                let mut cfg = QuicConfig::new(listen, identity, settings.underlay_mtu);
                cfg.runtime = Some(tokio::runtime::Handle::current());
                let lookup = names.clone();
                let sink = engine.clone();
                let plane = QuicPlane::start(
                    cfg,
                    Arc::new(move |addr| lookup.read().ok()?.get(&addr).cloned()),
                    Arc::new(move |from, datagram| sink.deliver(from, datagram)),
                )
                .with_context(|| format!("encrypted data plane on {listen}"))?;
                let plane = Arc::new(plane);
                engine.set_secure(Arc::new(Encrypted(plane.clone())));
                Some(plane)
            }
        };
        Ok(Planes { engine, quic, names })
    }

    /// Forwards by `tables` from now on.
    pub fn set_tables(&mut self, tables: &Tables) -> Result<()> {
        if let Ok(mut names) = self.names.write() {
            *names = tables.hosts.iter().map(|(n, ip)| (IpAddr::V4(*ip), n.clone())).collect();
        }
        let networks = tables
            .networks
            .iter()
            .map(|n| UdpNetwork {
                vni: n.vni,
                tap: n.tap.clone(),
                encrypted: n.encrypted,
                peers: n.peers.iter().map(|ip| IpAddr::V4(*ip)).collect(),
                remote_macs: n.macs.iter().map(|(mac, ip)| (mac.0, IpAddr::V4(*ip))).collect(),
            })
            .collect();
        // A TAP deleted by hand is reopened (so recreated) by the engine on this call.
        self.engine.set_networks(networks).context("applying the UDP data plane's tables")
    }

    /// Per-VNI counters (and the engine-wide ones) as JSON.
    pub fn counters_json(&self) -> String {
        let udp: BTreeMap<String, serde_json::Value> = self
            .engine
            .counters()
            .into_iter()
            .map(|(vni, c)| (vni.to_string(), serde_json::to_value(c).unwrap_or_default()))
            .collect();
        let engine = serde_json::to_value(self.engine.engine_counters()).unwrap_or_default();
        let quic = self.quic.as_ref().map(|q| {
            let c = q.counters();
            serde_json::json!({
                "sent": c.sent,
                "received": c.received,
                "dropped": c.dropped,
                "rejected_peers": c.rejected_peers,
                "connections": c.connections,
            })
        });
        serde_json::json!({ "udp": udp, "engine": engine, "quic": quic }).to_string()
    }

    /// Stops forwarding (the engine's threads end when it is dropped).
    pub fn stop(&mut self) {
        let _ = self.engine.set_networks(Vec::new());
        self.quic = None;
    }
}
