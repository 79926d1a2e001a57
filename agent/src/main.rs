//! `overlay-agent`: flags and config file, logging, signals; the work is in the library.
//!
//! It must never tear down the data plane on exit: SIGTERM stops the agent and leaves
//! bridges, VXLAN devices and endpoints running.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use overlay_agent::agent::TlsFiles;
use overlay_agent::identity::Security;
use serde::Deserialize;
use tracing::{error, info_span, Instrument};

const DEFAULT_CONFIG: &str = "/etc/overlay/agent.toml";
const DEFAULT_DATA_DIR: &str = "/var/lib/overlay/agent";
const DEFAULT_UDP_PORT: u16 = 7470;
const DEFAULT_QUIC_PORT: u16 = 7471;
const DEFAULT_SOCKET: &str = overlay_agent::cni::server::DEFAULT_SOCKET;
/// Ports endpoints must never reach on a host: the controller's API and raft port, and
/// the suggested `--metrics-listen` ports of the controller (7490) and the agent (7491).
const DEFAULT_CONTROL_PORTS: [u16; 3] = [7400, 7490, 7491];

/// The overlay host agent: reconciles this host's VXLAN data plane to the controller's
/// desired state.
#[derive(Parser, Debug)]
#[command(name = "overlay-agent", version)]
struct Args {
    /// This host's name in the cluster.
    #[arg(long)]
    name: Option<String>,
    /// The address other hosts reach this one at (VXLAN tunnel endpoint).
    #[arg(long)]
    underlay_ip: Option<Ipv4Addr>,
    /// Controller URLs, comma-separated (http://IP:PORT,...).
    #[arg(long)]
    controller: Option<String>,
    /// Where the last desired state and the record of created namespaces are kept.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML file with the same keys (default /etc/overlay/agent.toml when present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds between level-triggered reconcile passes.
    #[arg(long)]
    reconcile_interval: Option<f64>,
    /// resolv.conf whose nameservers get the names DNS does not answer itself (default
    /// /etc/resolv.conf, or systemd-resolved's list when that names only 127.0.0.53).
    #[arg(long)]
    resolv_conf: Option<PathBuf>,
    /// UDP port of the user-space data plane (`--encap udp` networks).
    #[arg(long)]
    udp_port: Option<u16>,
    /// UDP port of the encrypted (QUIC) data plane (`--encrypted` networks).
    #[arg(long)]
    quic_port: Option<u16>,
    /// TAP queues (reader threads) per UDP network; default min(CPUs, 4).
    #[arg(long)]
    udp_queues: Option<usize>,
    /// Controller and metrics ports that endpoints must not reach on any host,
    /// comma-separated (the ports of the --controller URLs and of this agent's
    /// --metrics-listen are always added); default 7400,7490,7491.
    #[arg(long, value_delimiter = ',')]
    control_ports: Option<Vec<u16>>,
    /// The cluster CA certificate (PEM): the controllers and every host must present a
    /// certificate it signed.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM, role agent, from `overlayctl cert issue`).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// This host's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Join with this token (from `overlayctl cluster join-token`) instead of
    /// --tls-cert and --tls-key: the agent gets its own certificate, keeps it in the data dir
    /// and renews it.
    #[arg(long, value_name = "TOKEN")]
    join_token: Option<String>,
    /// Talk to the controllers in plaintext, unauthenticated (only with controllers that
    /// run --insecure). No encrypted networks.
    #[arg(long)]
    insecure: bool,
    /// Serve Prometheus metrics at http://IP:PORT/metrics (plaintext, no authentication:
    /// loopback, or an address only the monitoring reaches; endpoints never can).
    /// Default: off.
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Log filter (RUST_LOG syntax), e.g. `info` or `info,overlay_agent=debug`.
    #[arg(long)]
    log: Option<String>,
    /// The unix socket the overlay-cni plugin asks to attach containers (root only;
    /// default /run/overlay/agent.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Internal: run as the data-plane daemon listening on this socket (the agent
    /// starts it itself; see `overlay_agent::dataplane`).
    #[arg(long, hide = true, requires = "dataplane_settings")]
    dataplane_daemon: Option<PathBuf>,
    /// Internal: the daemon's settings, as JSON.
    #[arg(long, hide = true)]
    dataplane_settings: Option<String>,
}

/// `controller` may be one comma-separated string or a list.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Controllers {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    underlay_ip: Option<Ipv4Addr>,
    controller: Option<Controllers>,
    data_dir: Option<PathBuf>,
    reconcile_interval: Option<f64>,
    resolv_conf: Option<PathBuf>,
    udp_port: Option<u16>,
    quic_port: Option<u16>,
    udp_queues: Option<usize>,
    control_ports: Option<Vec<u16>>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    join_token: Option<String>,
    insecure: Option<bool>,
    metrics_listen: Option<SocketAddr>,
    log: Option<String>,
    socket: Option<PathBuf>,
}

fn split_urls(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect()
}

fn load_file(args: &Args) -> Result<FileConfig, String> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    if !explicit && !Path::new(&path).exists() {
        return Ok(FileConfig::default());
    }
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

fn config(args: Args) -> Result<overlay_agent::agent::Config, String> {
    let file = load_file(&args)?;
    let name =
        args.name.or(file.name).ok_or("--name is required (or `name` in the config file)")?;
    overlay_model::names::validate_name(&name).map_err(|e| format!("--name: {e}"))?;
    let underlay_ip = args
        .underlay_ip
        .or(file.underlay_ip)
        .ok_or("--underlay-ip is required (or `underlay_ip` in the config file)")?;
    let controllers = match (args.controller, file.controller) {
        (Some(s), _) => split_urls(&s),
        (None, Some(Controllers::One(s))) => split_urls(&s),
        (None, Some(Controllers::Many(v))) => v.iter().flat_map(|s| split_urls(s)).collect(),
        (None, None) => vec![],
    };
    if controllers.is_empty() {
        return Err("--controller is required (or `controller` in the config file)".into());
    }
    let insecure = args.insecure || file.insecure.unwrap_or(false);
    for url in &controllers {
        match (url.split_once("://").map(|(scheme, _)| scheme), insecure) {
            (Some("https"), false) | (Some("http"), true) => {}
            (Some("http"), false) => {
                return Err(format!(
                    "controller URL {url} is plaintext, but the control plane speaks TLS: use https:// (or --insecure on every party)"
                ))
            }
            (Some("https"), true) => {
                return Err(format!("controller URL {url} needs TLS, but --insecure was given"))
            }
            _ => {
                return Err(format!(
                    "controller URL {url} must start with https:// (http:// with --insecure)"
                ))
            }
        }
    }
    let data_dir =
        args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let secs = args.reconcile_interval.or(file.reconcile_interval).unwrap_or(2.0);
    if !(0.05..=3600.0).contains(&secs) {
        return Err(format!("reconcile interval {secs}s is out of range (0.05–3600)"));
    }
    let udp_port = args.udp_port.or(file.udp_port).unwrap_or(DEFAULT_UDP_PORT);
    let quic_port = args.quic_port.or(file.quic_port).unwrap_or(DEFAULT_QUIC_PORT);
    for (flag, port) in [("--udp-port", udp_port), ("--quic-port", quic_port)] {
        if port == 0 {
            return Err(format!("{flag} 0 is not a usable port"));
        }
    }
    if udp_port == quic_port {
        return Err(format!("--udp-port and --quic-port are both {udp_port}; they must differ"));
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let udp_queues = args.udp_queues.or(file.udp_queues).unwrap_or(cpus.min(4));
    if !(1..=16).contains(&udp_queues) {
        return Err(format!("--udp-queues {udp_queues} is out of range (1–16)"));
    }
    let log = args.log.or(file.log);
    if let Some(filter) = &log {
        tracing_subscriber::EnvFilter::try_new(filter)
            .map_err(|e| format!("--log {filter:?} is not a valid filter: {e}"))?;
    }
    let metrics_listen = args.metrics_listen.or(file.metrics_listen);
    let socket = args.socket.or(file.socket).unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    if !socket.is_absolute() {
        return Err(format!("--socket {}: must be an absolute path", socket.display()));
    }
    let mut control_ports: std::collections::BTreeSet<u16> = args
        .control_ports
        .or(file.control_ports)
        .unwrap_or_else(|| DEFAULT_CONTROL_PORTS.to_vec())
        .into_iter()
        .collect();
    if control_ports.contains(&0) {
        return Err("--control-ports: 0 is not a usable port".into());
    }
    // This agent's own metrics port is a control port whatever the list says.
    control_ports.extend(metrics_listen.map(|a| a.port()));
    let security = security(
        insecure,
        args.tls_ca.or(file.tls_ca),
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
        args.join_token.or(file.join_token),
    )?;
    Ok(overlay_agent::agent::Config {
        name,
        underlay_ip,
        controllers,
        data_dir,
        reconcile_interval: Duration::from_secs_f64(secs),
        resolv_conf: args.resolv_conf.or(file.resolv_conf),
        udp_port,
        quic_port,
        udp_queues,
        security,
        metrics_listen,
        log,
        socket,
        control_ports,
    })
}

/// `--tls-ca` with a certificate or a join token, or `--insecure`; never both, never
/// neither.
fn security(
    insecure: bool,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    token: Option<String>,
) -> Result<Security, String> {
    if insecure {
        if ca.is_some() || cert.is_some() || key.is_some() || token.is_some() {
            return Err("--insecure and the TLS flags (--tls-ca, --tls-cert, --tls-key, --join-token) exclude each other".into());
        }
        return Ok(Security::Insecure);
    }
    let missing = "TLS is required: give --tls-ca with --tls-cert and --tls-key, or --tls-ca with --join-token (or --insecure, only with controllers that run without TLS)";
    match (ca, cert, key, token) {
        (Some(ca), Some(cert), Some(key), None) => Ok(Security::Files(TlsFiles { ca, cert, key })),
        (Some(ca), None, None, Some(token)) => Ok(Security::JoinToken { ca, token }),
        (_, Some(_), _, Some(_)) | (_, _, Some(_), Some(_)) => {
            Err("--join-token and --tls-cert/--tls-key exclude each other: give one or the other"
                .into())
        }
        (None, None, None, None) => Err(missing.into()),
        (None, ..) => Err("--tls-ca is required with --tls-cert/--tls-key or --join-token".into()),
        _ => Err("--tls-cert and --tls-key go together".into()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Logs to stderr with `filter` (the `log` setting), else `RUST_LOG`, else `info`.
fn init_tracing(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(socket) = args.dataplane_daemon.clone() {
        init_tracing(args.log.as_deref());
        return run_dataplane_daemon(socket, args.dataplane_settings.as_deref().unwrap_or(""));
    }
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(cfg.log.as_deref());
    let rt =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    let span = info_span!("agent", host = %cfg.name);
    match rt.block_on(overlay_agent::agent::run(cfg, shutdown_signal()).instrument(span)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_dataplane_daemon(socket: PathBuf, settings: &str) -> ExitCode {
    let settings = match serde_json::from_str(settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: --dataplane-settings: {e}");
            return ExitCode::from(2);
        }
    };
    match overlay_agent::dataplane::daemon::run(socket, settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("data-plane daemon: {e:#}");
            eprintln!("error: data-plane daemon: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut all = vec!["overlay-agent"];
        all.extend_from_slice(extra);
        Args::parse_from(all)
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("ov-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "name = \"h1\"\nunderlay_ip = \"192.0.2.1\"\ncontroller = \"https://192.0.2.9:7400, https://192.0.2.10:7400\"\ntls_ca = \"/ca.pem\"\njoin_token = \"t\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = config(args(&["--config", f, "--name", "h2"])).unwrap();
        assert_eq!(c.name, "h2");
        assert_eq!(c.underlay_ip, "192.0.2.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.controllers, vec!["https://192.0.2.9:7400", "https://192.0.2.10:7400"]);
        assert_eq!(
            c.security,
            Security::JoinToken { ca: PathBuf::from("/ca.pem"), token: "t".into() }
        );
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.reconcile_interval, Duration::from_secs(2));

        std::fs::write(
            &file,
            "name = \"h1\"\nunderlay_ip = \"192.0.2.1\"\ncontroller = \"http://192.0.2.9:7400\"\ninsecure = true\ncontrol_ports = [7400, 9200]\n",
        )
        .unwrap();
        assert_eq!(config(args(&["--config", f])).unwrap().control_ports, [7400, 9200].into());

        std::fs::write(&file, "name = \"h1\"\nbogus = 1\n").unwrap();
        let e = config(args(&["--config", f])).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_or_bad_values_are_named() {
        let e = config(args(&["--config", "/nonexistent/agent.toml"])).unwrap_err();
        assert!(e.contains("/nonexistent/agent.toml"), "{e}");
        let e =
            config(args(&["--config", "/dev/null", "--name", "h1", "--underlay-ip", "192.0.2.1"]))
                .unwrap_err();
        assert!(e.contains("--controller"), "{e}");
        let e = config(args(&[
            "--config",
            "/dev/null",
            "--name",
            "h1",
            "--underlay-ip",
            "192.0.2.1",
            "--controller",
            "192.0.2.9:7400",
        ]))
        .unwrap_err();
        assert!(e.contains("192.0.2.9:7400"), "{e}");
        let e = config(args(&["--config", "/dev/null", "--name", "Bad_Name"])).unwrap_err();
        assert!(e.contains("--name"), "{e}");
        let base = ["--config", "/dev/null", "--name", "h1", "--underlay-ip", "192.0.2.1"];
        let with = |extra: &[&str]| {
            let mut a = base.to_vec();
            a.extend_from_slice(&["--controller", "http://192.0.2.9:7400", "--insecure"]);
            a.extend_from_slice(extra);
            config(args(&a))
        };
        let e = with(&["--tls-cert", "/x.pem"]).unwrap_err();
        assert!(e.contains("exclude each other"), "{e}");
        let e = with(&["--udp-port", "7471"]).unwrap_err();
        assert!(e.contains("7471"), "{e}");
        let e = with(&["--udp-queues", "99"]).unwrap_err();
        assert!(e.contains("99"), "{e}");
        let e = with(&["--socket", "agent.sock"]).unwrap_err();
        assert!(e.contains("--socket agent.sock"), "{e}");
        assert_eq!(
            with(&["--socket", "/tmp/a.sock"]).unwrap().socket,
            PathBuf::from("/tmp/a.sock")
        );
        let c = with(&[]).unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/overlay/agent.sock"));
        assert_eq!((c.udp_port, c.quic_port, c.security), (7470, 7471, Security::Insecure));
        assert_eq!(c.control_ports, [7400, 7490, 7491].into());
        let c = with(&["--control-ports", "7400,9200,9100"]).unwrap();
        assert_eq!(c.control_ports, [7400, 9100, 9200].into());
        // Its own metrics port is always one.
        let c = with(&["--control-ports", "7400", "--metrics-listen", "0.0.0.0:9300"]).unwrap();
        assert_eq!(c.control_ports, [7400, 9300].into());
        let e = with(&["--control-ports", "7400,0"]).unwrap_err();
        assert!(e.contains("--control-ports"), "{e}");
    }

    #[test]
    fn tls_is_required_and_plaintext_only_with_insecure() {
        let base = ["--config", "/dev/null", "--name", "h1", "--underlay-ip", "192.0.2.1"];
        let with = |extra: &[&str]| {
            let mut a = base.to_vec();
            a.extend_from_slice(extra);
            config(args(&a))
        };
        let https = ["--controller", "https://192.0.2.9:7400"];
        let e = with(&https).unwrap_err();
        assert!(e.starts_with("TLS is required"), "{e}");
        let e = with(&["--controller", "http://192.0.2.9:7400", "--tls-ca", "/ca"]).unwrap_err();
        assert!(e.contains("http://192.0.2.9:7400 is plaintext"), "{e}");
        let e = with(&["--controller", "https://192.0.2.9:7400", "--insecure"]).unwrap_err();
        assert!(e.contains("needs TLS, but --insecure was given"), "{e}");
        let files = ["--tls-ca", "/ca", "--tls-cert", "/c", "--tls-key", "/k"];
        let c = with(&[&https[..], &files[..]].concat()).unwrap();
        assert!(matches!(c.security, Security::Files(_)));
        let e = with(&[&https[..], &files[..], &["--join-token", "t"]].concat()).unwrap_err();
        assert!(e.contains("exclude each other"), "{e}");
        let e = with(&[&https[..], &["--join-token", "t"]].concat()).unwrap_err();
        assert!(e.contains("--tls-ca is required"), "{e}");
        let e = with(&[&https[..], &["--tls-ca", "/ca", "--tls-cert", "/c"]].concat()).unwrap_err();
        assert!(e.contains("go together"), "{e}");
    }

    #[test]
    fn resolv_conf_from_flag_or_file() {
        let dir = std::env::temp_dir().join(format!("ov-agent-resolv-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        let base = "name = \"h1\"\nunderlay_ip = \"192.0.2.1\"\ncontroller = \"http://192.0.2.9:7400\"\ninsecure = true\n";
        std::fs::write(&file, base).unwrap();
        let f = file.to_str().unwrap();
        assert_eq!(config(args(&["--config", f])).unwrap().resolv_conf, None);
        std::fs::write(&file, format!("{base}resolv_conf = \"/etc/a.conf\"\n")).unwrap();
        let c = config(args(&["--config", f])).unwrap();
        assert_eq!(c.resolv_conf, Some(PathBuf::from("/etc/a.conf")));
        let c = config(args(&["--config", f, "--resolv-conf", "/etc/b.conf"])).unwrap();
        assert_eq!(c.resolv_conf, Some(PathBuf::from("/etc/b.conf")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_listen_and_log_from_flag_or_file() {
        let dir = std::env::temp_dir().join(format!("ov-agent-ops-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        let base = "name = \"h1\"\nunderlay_ip = \"192.0.2.1\"\ncontroller = \"http://192.0.2.9:7400\"\ninsecure = true\n";
        std::fs::write(&file, base).unwrap();
        let f = file.to_str().unwrap();
        let c = config(args(&["--config", f])).unwrap();
        assert_eq!((c.metrics_listen, c.log), (None, None));
        std::fs::write(
            &file,
            format!(
                "{base}metrics_listen = \"127.0.0.1:7491\"\nlog = \"info,overlay_agent=debug\"\n"
            ),
        )
        .unwrap();
        let c = config(args(&["--config", f])).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:7491".parse().unwrap()));
        assert_eq!(c.log.as_deref(), Some("info,overlay_agent=debug"));
        let c =
            config(args(&["--config", f, "--metrics-listen", "192.0.2.1:9999", "--log", "warn"]))
                .unwrap();
        assert_eq!(c.metrics_listen, Some("192.0.2.1:9999".parse().unwrap()));
        assert_eq!(c.log.as_deref(), Some("warn"));
        let e = config(args(&["--config", f, "--log", "overlay_agent=loud"])).unwrap_err();
        assert!(e.contains("--log"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
