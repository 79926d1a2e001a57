//! Flags and the TOML config file. Every flag can come from the file; flags win.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

const DEFAULT_CONFIG: &str = "/etc/overlay/controller.toml";

#[derive(Debug, Parser)]
#[command(
    name = "overlay-controller",
    version,
    about = "overlay control plane member (raft + gRPC)"
)]
pub struct Flags {
    /// This member's raft id (1, 2, 3, …), unique in the cluster.
    #[arg(long)]
    pub id: Option<u64>,
    /// Address for the client API and raft peer traffic.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where the raft log and snapshots live.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Every member, itself included: `1=IP:PORT,2=IP:PORT,3=IP:PORT`.
    #[arg(long, conflicts_with = "join")]
    pub peers: Option<String>,
    /// Join an existing cluster through any of its members, `URL[,URL...]`
    /// (`https://IP:PORT`), instead of `--peers`: the new member starts from a snapshot
    /// and takes part once `overlayctl cluster member add` has added it.
    #[arg(long, value_name = "URL[,URL...]")]
    pub join: Option<String>,
    /// TOML config file (default /etc/overlay/controller.toml when present).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Mark a host down after this many milliseconds without a heartbeat.
    #[arg(long)]
    pub host_down_after_ms: Option<u64>,
    /// Snapshot and compact the raft log every this many entries.
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Log filter (RUST_LOG syntax), e.g. `info` or `overlay_controller=debug`.
    #[arg(long)]
    pub log: Option<String>,
    /// The cluster CA certificate (PEM): every client and member must present a
    /// certificate it signed.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This member's certificate (PEM, role controller).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This member's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA's private key: lets this member sign agent certificates for join tokens.
    #[arg(long, value_name = "FILE")]
    pub tls_ca_key: Option<PathBuf>,
    /// Lifetime of the agent certificates this member signs (e.g. 30d, 12h, 90s); agents
    /// renew them when a third is left.
    #[arg(long, value_name = "DURATION")]
    pub agent_cert_lifetime: Option<String>,
    /// Serve plaintext without authentication: anyone who can reach --listen can change
    /// the network. For labs only.
    #[arg(long)]
    pub insecure: bool,
}

/// The file's keys mirror the flags (snake_case).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub id: Option<u64>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub peers: Option<String>,
    pub join: Option<String>,
    pub host_down_after_ms: Option<u64>,
    pub snapshot_every: Option<u64>,
    pub log: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca_key: Option<PathBuf>,
    pub agent_cert_lifetime: Option<String>,
    pub insecure: Option<bool>,
}

/// How the member secures its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    Tls {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        /// With the CA key, the member signs agent certificates for join tokens.
        ca_key: Option<PathBuf>,
        agent_cert_lifetime: Duration,
    },
    Insecure,
}

/// Default lifetime of agent certificates signed for join tokens.
pub const DEFAULT_AGENT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Clone)]
pub struct Config {
    pub id: u64,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The members this one was configured with (itself included): the initial
    /// membership of a new cluster, and addresses for snapshots that carry none.
    pub peers: BTreeMap<u64, String>,
    /// Addresses (`IP:PORT`) of members to join through; empty unless `--join`.
    pub join: Vec<String>,
    pub host_down_after: Duration,
    pub snapshot_every: u64,
    pub log: Option<String>,
    pub security: Security,
}

pub fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("invalid peer {part:?}: expected ID=IP:PORT"))?;
        let id: u64 = id.trim().parse().ok().filter(|&i| i > 0).with_context(|| {
            format!("invalid peer id {id:?} in {part:?}: expected a positive number")
        })?;
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .with_context(|| format!("invalid peer address {addr:?}: expected IP:PORT"))?;
        if peers.insert(id, addr.to_string()).is_some() {
            bail!("peer id {id} is listed twice in --peers");
        }
    }
    if peers.is_empty() {
        bail!("--peers {s:?} lists no members");
    }
    Ok(peers)
}

/// `--join URL[,URL...]` into `IP:PORT` addresses. A URL is `http://IP:PORT` (or
/// `https://`, or just `IP:PORT`); the port defaults to 7400.
pub fn parse_join(s: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for url in s.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or(url)
            .trim_end_matches('/');
        let addr: SocketAddr = rest
            .parse()
            .or_else(|_| format!("{rest}:7400").parse())
            .with_context(|| format!("invalid --join URL {url:?}: expected https://IP:PORT"))?;
        out.push(addr.to_string());
    }
    if out.is_empty() {
        bail!("--join {s:?} names no member");
    }
    Ok(out)
}

impl Config {
    pub fn load(flags: Flags) -> anyhow::Result<Config> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG).exists() => read_file(Path::new(DEFAULT_CONFIG))?,
            None => FileConfig::default(),
        };
        let id = flags.id.or(file.id).unwrap_or(1);
        if id == 0 {
            bail!("invalid --id 0: member ids start at 1");
        }
        let listen = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7400)));
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/overlay/controller"));
        let join = match flags.join.or(file.join) {
            Some(j) => parse_join(&j)?,
            None => Vec::new(),
        };
        let peers = match flags.peers.or(file.peers) {
            Some(_) if !join.is_empty() => bail!(
                "--peers and --join exclude each other: a new \
                member joins with --join only"
            ),
            Some(p) => parse_peers(&p)?,
            None => BTreeMap::from([(id, listen.to_string())]),
        };
        if !peers.contains_key(&id) {
            bail!("--peers does not list this member's id {id}");
        }
        if ![1, 3, 5].contains(&peers.len()) {
            tracing::warn!(members = peers.len(), "clusters of 1, 3 or 5 members are recommended");
        }
        let host_down_after = Duration::from_millis(
            flags.host_down_after_ms.or(file.host_down_after_ms).unwrap_or(5000),
        );
        let snapshot_every = flags.snapshot_every.or(file.snapshot_every).unwrap_or(10_000).max(1);
        let security = security(
            flags.insecure || file.insecure.unwrap_or(false),
            [
                flags.tls_ca.or(file.tls_ca),
                flags.tls_cert.or(file.tls_cert),
                flags.tls_key.or(file.tls_key),
                flags.tls_ca_key.or(file.tls_ca_key),
            ],
            flags.agent_cert_lifetime.or(file.agent_cert_lifetime),
        )?;
        Ok(Config {
            id,
            listen,
            data_dir,
            peers,
            join,
            host_down_after,
            snapshot_every,
            log: flags.log.or(file.log),
            security,
        })
    }
}

/// TLS files or `--insecure`, never both and never neither.
fn security(
    insecure: bool,
    [ca, cert, key, ca_key]: [Option<PathBuf>; 4],
    lifetime: Option<String>,
) -> anyhow::Result<Security> {
    let any_tls = ca.is_some() || cert.is_some() || key.is_some() || ca_key.is_some();
    if insecure {
        if any_tls {
            bail!("--insecure and the --tls-* files exclude each other: give one or the other");
        }
        return Ok(Security::Insecure);
    }
    let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) else {
        bail!(
            "TLS is required: give --tls-ca, --tls-cert and --tls-key (config keys tls_ca, tls_cert, tls_key), or --insecure to run without TLS"
        );
    };
    let agent_cert_lifetime = match lifetime {
        Some(text) => {
            let d = overlay_model::parse::duration(&text)
                .map_err(|e| anyhow::anyhow!("--agent-cert-lifetime: {e}"))?;
            if d < Duration::from_secs(30) {
                bail!("--agent-cert-lifetime {text} is too short: agents need at least 30s");
            }
            d
        }
        None => DEFAULT_AGENT_CERT_LIFETIME,
    };
    Ok(Security::Tls { ca, cert, key, ca_key, agent_cert_lifetime })
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_errors_name_the_bad_part() {
        let p = parse_peers("1=127.0.0.1:7401, 2=127.0.0.1:7402").expect("valid");
        assert_eq!(p.get(&2).map(String::as_str), Some("127.0.0.1:7402"));
        let e = parse_peers("1=127.0.0.1:7401,x=1.2.3.4:5").expect_err("bad id").to_string();
        assert!(e.contains("\"x\""), "{e}");
        let e = parse_peers("1=nowhere").expect_err("bad addr").to_string();
        assert!(e.contains("nowhere"), "{e}");
        assert!(parse_peers("1=127.0.0.1:1,1=127.0.0.1:2").is_err());
    }

    #[test]
    fn join_urls_parse_and_errors_name_the_bad_url() {
        let j = parse_join("http://10.0.0.1:7400, 10.0.0.2:7401,https://10.0.0.3").expect("valid");
        assert_eq!(j, vec!["10.0.0.1:7400", "10.0.0.2:7401", "10.0.0.3:7400"]);
        let e = parse_join("http://10.0.0.1:7400,http://nowhere").expect_err("bad").to_string();
        assert!(e.contains("http://nowhere"), "{e}");
        assert!(parse_join(" , ").is_err());
    }

    #[test]
    fn tls_or_insecure_never_both_never_neither() {
        let p = |s: &str| Some(PathBuf::from(s));
        let files = [p("ca.pem"), p("c1.pem"), p("c1-key.pem"), None];
        assert!(matches!(security(false, files.clone(), None), Ok(Security::Tls { .. })));
        assert_eq!(security(true, [None, None, None, None], None).ok(), Some(Security::Insecure));
        let e = security(true, files.clone(), None).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("exclude each other")));
        let e = security(false, [None, None, None, None], None).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.starts_with("TLS is required")));
        let e = security(false, files.clone(), Some("10x".into())).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("\"10x\"")));
        let e = security(false, files, Some("5s".into())).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("too short")));
    }

    #[test]
    fn file_keys_are_checked() {
        assert!(toml::from_str::<FileConfig>("id = 2\nlisten = \"127.0.0.1:7400\"").is_ok());
        assert!(toml::from_str::<FileConfig>("idd = 2").is_err());
    }
}
