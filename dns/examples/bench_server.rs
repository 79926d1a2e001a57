//! A server for `bench/dnsperf.sh`: serves endpoint `client` of network `bench`
//! (10.89.0.0/16) with `--names` other endpoints `ep0`, `ep1`, … at 10.89.1.0 onwards,
//! with no upstream resolvers (nothing is forwarded anywhere).
//!
//! ```text
//! bench_server [--netns /var/run/netns/NAME] [--listen 127.0.0.11:53] [--names 200] [--threads 2]
//! ```
//!
//! With `--netns` the sockets are opened inside that namespace through `bind_in_netns`,
//! as the agent does. Prints `ready` once listening; stops on SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use overlay_dns::testutil::bench_catalog;
use overlay_dns::{bind_in_netns, serve, DnsView, Upstream};
use tokio::signal::unix::{signal, SignalKind};

struct Args {
    netns: Option<PathBuf>,
    listen: SocketAddr,
    names: u32,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        netns: None,
        listen: SocketAddr::from(([127, 0, 0, 11], 53)),
        names: 200,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--netns" => args.netns = Some(value.into()),
            "--listen" => args.listen = value.parse().map_err(|e| bad(&e))?,
            "--names" => args.names = value.parse().map_err(|e| bad(&e))?,
            "--threads" => args.threads = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let (udp, tcp) = match &args.netns {
        Some(ns) => {
            bind_in_netns(ns, args.listen).map_err(|e| format!("bind in {}: {e}", ns.display()))?
        }
        None => {
            let udp = std::net::UdpSocket::bind(args.listen).map_err(|e| e.to_string())?;
            let tcp = std::net::TcpListener::bind(args.listen).map_err(|e| e.to_string())?;
            udp.set_nonblocking(true).map_err(|e| e.to_string())?;
            tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
            (udp, tcp)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|e| e.to_string())?;
        let view = Arc::new(DnsView::build(&bench_catalog(args.names)));
        let (_views, rx) = tokio::sync::watch::channel(view);
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        println!("ready");
        // spawned, as the agent does: the server task runs on a worker thread
        let server =
            serve(udp, tcp, "client".into(), rx, Arc::new(Upstream::new(Vec::new())), shutdown);
        match tokio::spawn(server).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(format!("server task: {e}")),
        }
    })
}
