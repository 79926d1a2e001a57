//! One overlay-dns server per local endpoint, at 127.0.0.11:53 inside its namespace.
//!
//! The records come from a [`DnsView`] published on a watch channel whenever the
//! catalog changes; every server reads the latest one. Servers are started after the
//! reconcile pass created the namespace (and brought `lo` up), and stopped *before* a
//! pass deletes it: an open socket keeps a namespace, and its veth, alive. An endpoint
//! with no network left keeps its namespace and so its server, which then answers
//! NXDOMAIN for every overlay name.
//!
//! The upstream resolvers are read from a resolv.conf ([`UpstreamSource`]) and read
//! again whenever that file changes (a DHCP lease, a VPN, an administrator): checked
//! with one `stat` per pass.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use overlay_dns::{DnsView, Upstream};

use crate::dataplane::client::DnsAnswer;
use crate::dataplane::protocol::{DnsChanges, DnsRecords, DnsTables};
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
    let up = Upstream::new(servers_from(resolv_conf));
    info!(servers = ?up.servers(), "dns forwards other names to these resolvers");
    up
}

/// The resolvers `resolv_conf` names (the host's when `None`), with a warning when a
/// configured file cannot be read or names none.
fn servers_from(resolv_conf: Option<&Path>) -> Vec<SocketAddr> {
    match resolv_conf {
        None => Upstream::from_system().servers().to_vec(),
        Some(path) => match Upstream::from_resolv_conf(path) {
            Ok(up) if up.servers().is_empty() => {
                warn!(
                    "{} names no usable nameserver; names that are not the overlay's will get SERVFAIL",
                    path.display()
                );
                Vec::new()
            }
            Ok(up) => up.servers().to_vec(),
            Err(e) => {
                warn!("{e}; names that are not the overlay's will get SERVFAIL");
                Vec::new()
            }
        },
    }
}

/// Identity and version of a file: it changed when any of these did.
type Stamp = (u64, u64, u64, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Where the upstream resolvers come from, and what that file looked like when read.
#[derive(Debug)]
pub struct UpstreamSource {
    /// The configured resolv.conf; `None`: the host's.
    configured: Option<PathBuf>,
    stamp: Option<Stamp>,
}

impl UpstreamSource {
    pub fn new(configured: Option<&Path>) -> UpstreamSource {
        let mut source =
            UpstreamSource { configured: configured.map(Path::to_path_buf), stamp: None };
        source.stamp = source.current();
        source
    }

    /// The file whose changes matter: the configured one, or the host's resolv.conf.
    fn watched(&self) -> &Path {
        self.configured.as_deref().unwrap_or(Path::new(overlay_dns::upstream::RESOLV_CONF))
    }

    fn current(&self) -> Option<Stamp> {
        stamp(self.watched())
    }

    /// The servers to use now, if the file changed since it was last read.
    pub fn changed(&mut self) -> Option<Vec<SocketAddr>> {
        let now = self.current();
        if now == self.stamp {
            return None;
        }
        self.stamp = now;
        Some(servers_from(self.configured.as_deref()))
    }
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
    /// In the data-plane daemon: the records the view was built from, which
    /// [`DnsChanges`] apply to.
    records: Option<Catalog>,
    upstream: Arc<Upstream>,
    source: Option<UpstreamSource>,
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
    /// Servers that forward to `upstream`, a fixed list.
    pub fn new(upstream: Upstream) -> DnsServers {
        let (view, _) = watch::channel(Arc::new(DnsView::build(&Catalog::default())));
        DnsServers {
            addr: SocketAddr::from(([127, 0, 0, 11], 53)),
            view,
            revision: None,
            records: None,
            upstream: Arc::new(upstream),
            source: None,
            servers: BTreeMap::new(),
        }
    }

    /// Servers that forward to the resolvers `resolv_conf` names (the host's when
    /// `None`), read again when the file changes (see [`Self::refresh_upstream`]).
    pub fn from_resolv_conf(resolv_conf: Option<&Path>) -> DnsServers {
        let source = UpstreamSource::new(resolv_conf);
        let mut dns = DnsServers::new(upstream(resolv_conf));
        dns.source = Some(source);
        dns
    }

    /// Reads the resolvers again if their file changed; every server uses the new list
    /// for its next forward.
    pub fn refresh_upstream(&mut self) {
        let Some(servers) = self.source.as_mut().and_then(UpstreamSource::changed) else {
            return;
        };
        if *self.upstream.servers() != *servers {
            info!(servers = ?servers, "dns forwards other names to these resolvers now");
            self.upstream.set_servers(servers);
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
    /// has none yet; says which endpoints are served and which could not be.
    pub fn start_missing(&mut self, wanted: &BTreeSet<String>) -> crate::status::DnsOutcome {
        let mut outcome = crate::status::DnsOutcome::default();
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
                Err(e) => {
                    warn!(endpoint = %name, "cannot start dns server: {e}");
                    outcome.failed.insert(name.clone(), e.to_string());
                }
            }
        }
        outcome.served = self.servers.keys().filter(|n| wanted.contains(*n)).cloned().collect();
        outcome
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

    // --- In the data-plane daemon (issue 15) ---

    /// Forwards to `servers` from now on.
    pub fn set_upstream(&mut self, servers: Vec<SocketAddr>) {
        if *self.upstream.servers() != *servers {
            info!(servers = ?servers, "dns forwards other names to these resolvers");
            self.upstream.set_servers(servers);
        }
    }

    /// Stops the servers whose namespace was deleted or replaced (by anyone: the agent
    /// may be down), so that no socket keeps a deleted namespace, and its veth, alive.
    pub fn prune(&mut self) {
        let wanted: BTreeSet<String> = self.servers.keys().cloned().collect();
        self.stop_unwanted(&wanted);
    }

    /// The revision of the records served (`None` before any).
    pub fn revision(&self) -> Option<u64> {
        self.revision
    }

    /// Serves exactly `dns.serve` from `dns.records` or the records held with
    /// `dns.changes` applied (if given, and if they apply to them), and `dns.upstream`.
    pub fn set(&mut self, dns: &DnsTables) -> crate::status::DnsOutcome {
        if let Some(records) = &dns.records {
            let records = records.to_catalog();
            self.publish(&records);
            self.records = Some(records);
        } else if let Some(changes) = &dns.changes {
            if let Some(records) = self.records.as_mut() {
                let same = changes.only_revision(records);
                if changes.apply_to(records) {
                    if same {
                        // The view stays as it is: building it walks every endpoint.
                        self.revision = Some(records.revision);
                    } else {
                        let records = records.clone();
                        self.publish(&records);
                    }
                }
            }
        }
        self.set_upstream(dns.upstream.clone());
        let wanted: BTreeSet<String> = dns.serve.iter().cloned().collect();
        self.stop_unwanted(&wanted);
        self.start_missing(&wanted)
    }
}

/// The agent's side of the DNS (issue 15): the data-plane daemon serves every endpoint's
/// DNS, so lookups survive the agent; the agent tells it which endpoints, from which
/// records, forwarding to which resolvers (read again when the resolv.conf changes).
pub struct DnsFeed {
    source: UpstreamSource,
    servers: Vec<SocketAddr>,
    /// What the daemon last said it serves.
    served: BTreeSet<String>,
    /// The revision of the records the daemon holds, as it last said.
    daemon_revision: Option<u64>,
    /// The catalog whose records the daemon holds (it said so), which changes are
    /// computed from.
    held: Option<Arc<Catalog>>,
    /// The catalog of the last [`DnsFeed::serve`].
    asked: Option<Arc<Catalog>>,
}

impl DnsFeed {
    pub fn from_resolv_conf(resolv_conf: Option<&Path>) -> DnsFeed {
        let source = UpstreamSource::new(resolv_conf);
        let servers = upstream(resolv_conf).servers().to_vec();
        DnsFeed {
            source,
            servers,
            served: BTreeSet::new(),
            daemon_revision: None,
            held: None,
            asked: None,
        }
    }

    /// Reads the resolvers again if their file changed.
    pub fn refresh_upstream(&mut self) {
        if let Some(servers) = self.source.changed() {
            if servers != self.servers {
                info!(servers = ?servers, "dns forwards other names to these resolvers now");
                self.servers = servers;
            }
        }
    }

    /// Before a pass: stops the servers of endpoints not in `wanted` (an open socket
    /// keeps a namespace alive, so this goes before the pass deletes any); `None` when
    /// nothing is to stop.
    pub fn stop_unwanted(&self, wanted: &BTreeSet<String>) -> Option<DnsTables> {
        if self.served.is_subset(wanted) {
            return None;
        }
        let serve = self.served.intersection(wanted).cloned().collect();
        Some(DnsTables { records: None, changes: None, upstream: self.servers.clone(), serve })
    }

    /// After a pass: serve `ours` from `catalog`. When the daemon has another revision,
    /// what changed since the catalog it holds goes along, or all the records when
    /// that catalog is not known (the agent or the daemon just started).
    pub fn serve(&mut self, catalog: &Arc<Catalog>, ours: &BTreeSet<String>) -> DnsTables {
        let mut tables = DnsTables {
            records: None,
            changes: None,
            upstream: self.servers.clone(),
            serve: ours.iter().cloned().collect(),
        };
        if self.daemon_revision != Some(catalog.revision) {
            match &self.held {
                Some(held) if self.daemon_revision == Some(held.revision) => {
                    tables.changes = Some(DnsChanges::between(held, catalog));
                }
                _ => tables.records = Some(DnsRecords::from_catalog(catalog)),
            }
        }
        self.asked = Some(catalog.clone());
        tables
    }

    /// What the daemon answered (or why it could not be asked), as the pass's outcome.
    pub fn answered(
        &mut self,
        answer: anyhow::Result<DnsAnswer>,
        asked: &BTreeSet<String>,
    ) -> crate::status::DnsOutcome {
        match answer {
            Ok(a) => {
                self.daemon_revision = a.revision;
                let sent = self.asked.take();
                self.held = sent.filter(|c| a.revision == Some(c.revision));
                self.served = a.served.iter().cloned().collect();
                crate::status::DnsOutcome {
                    served: self.served.intersection(asked).cloned().collect(),
                    failed: a.failed.into_iter().collect(),
                    unavailable: None,
                }
            }
            Err(e) => {
                // Unknown: asked again in full next time.
                self.daemon_revision = None;
                self.held = None;
                crate::status::DnsOutcome {
                    unavailable: Some(format!("the data-plane daemon that serves it: {e:#}")),
                    ..Default::default()
                }
            }
        }
    }

    /// Whether the daemon holds the records of `revision`.
    pub fn current(&self, revision: u64) -> bool {
        self.daemon_revision == Some(revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(revision: u64) -> anyhow::Result<DnsAnswer> {
        Ok(DnsAnswer { revision: Some(revision), served: vec![], failed: vec![] })
    }

    #[test]
    fn the_daemon_gets_all_records_once_then_what_changed() {
        let mut feed = DnsFeed::from_resolv_conf(Some(Path::new("/nonexistent")));
        let ours = BTreeSet::new();
        let first = Arc::new(crate::desired::tests::catalog());
        let t = feed.serve(&first, &ours);
        assert!(t.records.is_some() && t.changes.is_none());
        feed.answered(answer(first.revision), &ours);
        // Nothing new: neither.
        let t = feed.serve(&first, &ours);
        assert!(t.records.is_none() && t.changes.is_none());
        feed.answered(answer(first.revision), &ours);
        // A new endpoint: only it.
        let mut next = (*first).clone();
        next.revision += 1;
        let e = crate::desired::tests::ep("new", "h1", &[("front", "10.1.0.20", 50)]);
        next.endpoints.insert(e.name.clone(), e);
        let next = Arc::new(next);
        let t = feed.serve(&next, &ours);
        let changes = t.changes.as_ref().expect("changes");
        assert!(t.records.is_none());
        assert_eq!((changes.base, changes.revision), (first.revision, next.revision));
        assert_eq!(changes.endpoints.len(), 1);
        // The daemon did not take them (it holds something else): all records again.
        feed.answered(answer(3), &ours);
        assert!(!feed.current(next.revision));
        let t = feed.serve(&next, &ours);
        assert!(t.records.is_some() && t.changes.is_none());
    }

    #[test]
    fn the_daemon_applies_changes_to_the_records_it_holds_only() {
        let mut servers = DnsServers::new(Upstream::new(Vec::new()));
        let old = crate::desired::tests::catalog();
        let mut new = old.clone();
        new.revision += 1;
        new.endpoints.remove("db");
        let changes = DnsChanges::between(&old, &new);
        let tables =
            |records, changes| DnsTables { records, changes, upstream: vec![], serve: vec![] };
        // Nothing held yet: changes cannot apply.
        servers.set(&tables(None, Some(changes.clone())));
        assert_eq!(servers.revision(), None);
        servers.set(&tables(Some(DnsRecords::from_catalog(&old)), None));
        assert_eq!(servers.revision(), Some(old.revision));
        servers.set(&tables(None, Some(changes.clone())));
        assert_eq!(servers.revision(), Some(new.revision));
        assert!(servers.view.borrow().revision() == new.revision);
        // Changes from another base are ignored.
        servers.set(&tables(None, Some(changes)));
        assert_eq!(servers.revision(), Some(new.revision));
        // Only the revision moves: the view is kept.
        let mut later = new.clone();
        later.revision += 5;
        servers.set(&tables(None, Some(DnsChanges::between(&new, &later))));
        assert_eq!(servers.revision(), Some(later.revision));
        assert!(servers.view.borrow().revision() == new.revision);
    }

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

    #[test]
    fn a_changed_resolv_conf_is_read_again() {
        let dir = std::env::temp_dir().join(format!("ov-agent-resolv2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("resolv.conf");
        // As a file caught half-written would read: no servers yet.
        std::fs::write(&path, "").expect("write");
        let mut dns = DnsServers::from_resolv_conf(Some(&path));
        assert!(dns.upstream.servers().is_empty());
        dns.refresh_upstream();
        assert!(dns.upstream.servers().is_empty());
        std::fs::write(&path, "nameserver 192.0.2.53\n").expect("write");
        dns.refresh_upstream();
        let want: Vec<SocketAddr> = vec!["192.0.2.53:53".parse().expect("addr")];
        assert_eq!(*dns.upstream.servers(), *want);
        // Gone: nothing to forward to (SERVFAIL at once) until it is back.
        std::fs::remove_file(&path).expect("rm");
        dns.refresh_upstream();
        assert!(dns.upstream.servers().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
