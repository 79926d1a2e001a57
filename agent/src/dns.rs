//! One overlay-dns server per local endpoint, at 127.0.0.11:53 inside its namespace.
//!
//! The records come from a [`DnsView`] published on a watch channel whenever the
//! catalog changes; every server reads the latest one. Servers are started after the
//! reconcile pass created the namespace (and brought `lo` up), and stopped *before* a
//! pass deletes it: an open socket keeps a namespace, and its veth, alive.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use overlay_dns::{DnsView, Upstream};
use overlay_model::Catalog;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::netns;

/// The resolvers names that are not ours are forwarded to: the `nameserver`s of
/// `resolv_conf` when one is configured, else the host's ([`Upstream::from_system`]).
/// A configured file that cannot be read is logged, and forwards then get SERVFAIL at
/// once; the overlay's own names are answered either way.
pub fn upstream(resolv_conf: Option<&Path>) -> Upstream {
    let up = match resolv_conf {
        None => Upstream::from_system(),
        Some(path) => Upstream::from_resolv_conf(path).unwrap_or_else(|e| {
            warn!("{e}; names that are not the overlay's will get SERVFAIL");
            Upstream::new(Vec::new())
        }),
    };
    info!(servers = ?up.servers(), "dns forwards other names to these resolvers");
    up
}

struct Server {
    /// The namespace the sockets live in; a recreated namespace needs a new server.
    inode: u64,
    task: JoinHandle<()>,
}

pub struct DnsServers {
    addr: SocketAddr,
    view: watch::Sender<Arc<DnsView>>,
    revision: Option<u64>,
    upstream: Arc<Upstream>,
    servers: BTreeMap<String, Server>,
}

impl Drop for DnsServers {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

impl DnsServers {
    pub fn new(upstream: Upstream) -> DnsServers {
        let (view, _) = watch::channel(Arc::new(DnsView::build(&Catalog::default())));
        DnsServers {
            addr: SocketAddr::from(([127, 0, 0, 11], 53)),
            view,
            revision: None,
            upstream: Arc::new(upstream),
            servers: BTreeMap::new(),
        }
    }

    /// Publishes the records of `catalog` (once per revision).
    pub fn publish(&mut self, catalog: &Catalog) {
        if self.revision != Some(catalog.revision) {
            self.revision = Some(catalog.revision);
            self.view.send_replace(Arc::new(DnsView::build(catalog)));
        }
    }

    /// Stops the servers of endpoints not in `wanted`, and those whose namespace is gone
    /// or was replaced.
    pub fn stop_unwanted(&mut self, wanted: &BTreeSet<String>) {
        self.servers.retain(|name, s| {
            let keep = wanted.contains(name)
                && netns::inode(name) == Some(s.inode)
                && !s.task.is_finished();
            if !keep {
                s.task.abort();
                info!(endpoint = %name, "dns server stopped");
            }
            keep
        });
    }

    /// Starts a server for every endpoint in `wanted` whose namespace exists and that
    /// has none yet.
    pub fn start_missing(&mut self, wanted: &BTreeSet<String>) {
        for name in wanted {
            if self.servers.contains_key(name) {
                continue;
            }
            let Some(inode) = netns::inode(name) else { continue };
            match self.start(name) {
                Ok(task) => {
                    info!(endpoint = %name, "dns server listening on {}", self.addr);
                    self.servers.insert(name.clone(), Server { inode, task });
                }
                Err(e) => warn!(endpoint = %name, "cannot start dns server: {e}"),
            }
        }
    }

    fn start(&self, name: &str) -> std::io::Result<JoinHandle<()>> {
        let (udp, tcp) = overlay_dns::bind_in_netns(&netns::path(name), self.addr)?;
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let view = self.view.subscribe();
        let upstream = self.upstream.clone();
        let asker = name.to_string();
        Ok(tokio::spawn(async move {
            let r = overlay_dns::serve(
                udp,
                tcp,
                asker.clone(),
                view,
                upstream,
                std::future::pending::<()>(),
            )
            .await;
            if let Err(e) = r {
                warn!(endpoint = %asker, "dns server failed: {e}");
            }
        }))
    }

    pub fn running(&self) -> usize {
        self.servers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_reads_the_configured_file() {
        let dir = std::env::temp_dir().join(format!("ov-agent-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "nameserver 127.0.0.53\nnameserver 192.0.2.53\n").expect("write");
        let want: Vec<SocketAddr> = vec!["192.0.2.53:53".parse().expect("addr")];
        assert_eq!(*upstream(Some(&path)).servers(), *want);
        assert!(upstream(Some(&dir.join("missing"))).servers().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
