//! `overlay-agent`: flags and config file, logging, signals; the work is in the library.
//!
//! It must never tear down the data plane on exit: SIGTERM stops the agent and leaves
//! bridges, VXLAN devices and endpoints running.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use tracing::{error, info_span, Instrument};

const DEFAULT_CONFIG: &str = "/etc/overlay/agent.toml";
const DEFAULT_DATA_DIR: &str = "/var/lib/overlay/agent";

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
    for url in &controllers {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("controller URL {url} must start with http:// or https://"));
        }
    }
    let data_dir =
        args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let secs = args.reconcile_interval.or(file.reconcile_interval).unwrap_or(2.0);
    if !(0.05..=3600.0).contains(&secs) {
        return Err(format!("reconcile interval {secs}s is out of range (0.05–3600)"));
    }
    Ok(overlay_agent::agent::Config {
        name,
        underlay_ip,
        controllers,
        data_dir,
        reconcile_interval: Duration::from_secs_f64(secs),
        resolv_conf: args.resolv_conf.or(file.resolv_conf),
    })
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

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
            "name = \"h1\"\nunderlay_ip = \"192.0.2.1\"\ncontroller = \"http://192.0.2.9:7400, http://192.0.2.10:7400\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = config(args(&["--config", f, "--name", "h2"])).unwrap();
        assert_eq!(c.name, "h2");
        assert_eq!(c.underlay_ip, "192.0.2.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.controllers, vec!["http://192.0.2.9:7400", "http://192.0.2.10:7400"]);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.reconcile_interval, Duration::from_secs(2));

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
    }

    #[test]
    fn resolv_conf_from_flag_or_file() {
        let dir = std::env::temp_dir().join(format!("ov-agent-resolv-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        let base =
            "name = \"h1\"\nunderlay_ip = \"192.0.2.1\"\ncontroller = \"http://192.0.2.9:7400\"\n";
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
}
