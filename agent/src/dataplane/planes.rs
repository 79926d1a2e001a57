//! The engines the daemon drives: the UDP engine (`overlay-udp`) for every
//! `--encap udp` network, and, when this host has a certificate, the QUIC plane
//! (`overlay-quic`) that carries the `--encrypted` ones.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use overlay_udp::{Engine, EngineConfig, SecureTransport, UdpNetwork};
use tracing::info;

use super::protocol::{DaemonSettings, Tables};

/// Host name by underlay address, shared with the QUIC plane's certificate check.
type HostNames = Arc<RwLock<BTreeMap<IpAddr, String>>>;

pub struct Planes {
    engine: Arc<Engine>,
    quic: Option<Arc<overlay_quic::QuicPlane>>,
    names: HostNames,
}

/// The QUIC plane as the UDP engine's secure transport.
struct Quic(Arc<overlay_quic::QuicPlane>);

impl SecureTransport for Quic {
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
                let identity = overlay_quic::pki::Identity::load(ca, cert, key)
                    .context("loading the host certificate")?;
                let lookup = names.clone();
                let sink = engine.clone();
                let plane = overlay_quic::QuicPlane::start(
                    overlay_quic::QuicConfig {
                        listen: SocketAddr::new(ip, settings.quic_port),
                        identity,
                        underlay_mtu: settings.underlay_mtu,
                    },
                    Arc::new(move |addr: IpAddr| {
                        lookup.read().ok().and_then(|m| m.get(&addr).cloned())
                    }),
                    Arc::new(move |from: IpAddr, datagram: &[u8]| sink.deliver(from, datagram)),
                )
                .with_context(|| format!("QUIC data plane on {ip}:{}", settings.quic_port))?;
                let plane = Arc::new(plane);
                engine.set_secure(Arc::new(Quic(plane.clone())));
                info!(port = settings.quic_port, "encrypted data plane ready");
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
                arp: n.arp.iter().map(|(ip, mac)| (*ip, mac.0)).collect(),
            })
            .collect();
        self.engine.set_networks(networks).context("applying the UDP data plane's tables")
    }

    /// Per-VNI counters (and the QUIC plane's) as JSON.
    pub fn counters_json(&self) -> String {
        let udp: BTreeMap<String, serde_json::Value> = self
            .engine
            .counters()
            .into_iter()
            .map(|(vni, c)| (vni.to_string(), serde_json::to_value(c).unwrap_or_default()))
            .collect();
        let quic = self.quic.as_ref().map(|q| serde_json::to_value(q.counters()).unwrap_or_default());
        serde_json::json!({ "udp": udp, "quic": quic }).to_string()
    }

    pub fn stop(&mut self) {
        if let Some(q) = self.quic.take() {
            q.close();
        }
        self.engine.stop();
    }
}
