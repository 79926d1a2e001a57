//! The containers this agent attached through CNI, kept in `DATA_DIR/cni.json` so a DEL
//! after an agent restart still finds its container, and the rule that keeps the
//! reconcile loop's hands off a container's namespace until it is ready (pure).
//!
//! A container's endpoint lives in the runtime's network namespace, which the agent makes
//! visible as `/run/netns/NAME` with a bind mount (see `netns::adopt`). The reconcile loop
//! must then neither create a fresh namespace under that name (before the mount exists,
//! or after the container's namespace is gone) nor realise the endpoint in a namespace
//! that is not the container's: [`loop_view`] says which endpoints it holds back and
//! which mounted namespaces it takes over as its own.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::write_atomic;

/// Where a container's attachment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Being attached: the namespace may be mounted, the endpoint may not exist yet.
    Attaching,
    /// The endpoint exists; the reconcile loop realises it in the container's namespace.
    Attached,
    /// Its last network is being detached: the loop tears it down locally.
    Detaching,
}

/// One container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub container_id: String,
    /// Its endpoint (= the name of the bind mount under `/run/netns`).
    pub endpoint: String,
    /// `CNI_NETNS` as the runtime passed it at the first ADD.
    pub netns: String,
    /// Inode of the container's network namespace: the bind mount must show this one.
    pub inode: u64,
    /// Interface inside (`CNI_IFNAME`) -> network.
    pub interfaces: BTreeMap<String, String>,
    pub phase: Phase,
}

/// All records, by container ID, and the file they live in.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    records: BTreeMap<String, Record>,
}

impl Registry {
    /// Loads `DATA_DIR/cni.json` (empty when there is none). An unreadable file is an
    /// error: forgetting containers would leave their endpoints behind.
    pub fn open(data_dir: &Path) -> io::Result<Registry> {
        let path = data_dir.join("cni.json");
        let records = match std::fs::read(&path) {
            Ok(bytes) => {
                let list: Vec<Record> = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
                })?;
                list.into_iter().map(|r| (r.container_id.clone(), r)).collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Registry { path, records })
    }

    pub fn get(&self, container_id: &str) -> Option<&Record> {
        self.records.get(container_id)
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    /// The record whose endpoint is `endpoint`, if any.
    pub fn by_endpoint(&self, endpoint: &str) -> Option<&Record> {
        self.records.values().find(|r| r.endpoint == endpoint)
    }

    /// Changes (or inserts, or with `None` removes) a record and writes the file.
    pub fn set(&mut self, container_id: &str, record: Option<Record>) -> io::Result<()> {
        let before = self.records.clone();
        match record {
            Some(r) => self.records.insert(container_id.to_string(), r),
            None => self.records.remove(container_id),
        };
        let list: Vec<&Record> = self.records.values().collect();
        let written = serde_json::to_vec_pretty(&list)
            .map_err(io::Error::other)
            .and_then(|bytes| write_atomic(&self.path, &bytes));
        if written.is_err() {
            // Memory and file stay the same.
            self.records = before;
        }
        written
    }
}

/// What the reconcile loop does with the containers' endpoints in one pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoopView {
    /// Endpoints to leave out of the desired state: not ready, being detached, or whose
    /// namespace is not (or no longer) the container's.
    pub hold_back: BTreeSet<String>,
    /// Mounted container namespaces to record as the agent's own, so the loop realises
    /// the endpoint there (and unmounts it, never destroys it, when it is removed).
    pub adopt: BTreeSet<String>,
    /// Containers (by ID) whose detaching is over here: the endpoint left this host's
    /// desired state and its mount is gone (a DEL that could not reach a controller,
    /// finished by `overlayctl endpoint rm`). Their records go, freeing the name.
    pub forget: BTreeSet<String>,
}

/// Decides [`LoopView`] from the records, the endpoints this host should have, and the
/// inode each name under `/run/netns` shows now (`mounted`).
pub fn loop_view<'a>(
    records: impl Iterator<Item = &'a Record>,
    desired: &BTreeSet<String>,
    mounted: impl Fn(&str) -> Option<u64>,
) -> LoopView {
    let mut view = LoopView::default();
    for r in records {
        let ours = mounted(&r.endpoint) == Some(r.inode);
        if r.phase == Phase::Detaching && !ours && !desired.contains(&r.endpoint) {
            view.forget.insert(r.container_id.clone());
        }
        if r.phase == Phase::Attached && ours {
            if desired.contains(&r.endpoint) {
                view.adopt.insert(r.endpoint.clone());
            }
        } else {
            view.hold_back.insert(r.endpoint.clone());
        }
    }
    view
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(id: &str, endpoint: &str, inode: u64, phase: Phase) -> Record {
        Record {
            container_id: id.into(),
            endpoint: endpoint.into(),
            netns: format!("/run/netns/netns-{id}"),
            inode,
            interfaces: BTreeMap::from([("eth0".to_string(), "web".to_string())]),
            phase,
        }
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_loop_takes_over_only_ready_mounted_container_namespaces() {
        let records = [
            record("a", "ready", 10, Phase::Attached),
            record("b", "attaching", 11, Phase::Attaching),
            record("c", "detaching", 12, Phase::Detaching),
            record("d", "gone", 13, Phase::Attached),
            record("e", "replaced", 14, Phase::Attached),
            record("f", "removed-upstream", 15, Phase::Attached),
        ];
        let mounted = |name: &str| match name {
            "ready" => Some(10),
            "attaching" => Some(11),
            "detaching" => Some(12),
            "replaced" => Some(99),
            "removed-upstream" => Some(15),
            _ => None,
        };
        let desired = names(&["ready", "attaching", "detaching", "gone", "replaced", "bare"]);
        let view = loop_view(records.iter(), &desired, mounted);
        assert_eq!(view.adopt, names(&["ready"]));
        assert_eq!(view.hold_back, names(&["attaching", "detaching", "gone", "replaced"]));
        // An endpoint removed upstream is neither: the loop unmounts it as garbage.
        assert!(view.forget.is_empty());
        // Detaching is over once the endpoint left the desired state and is unmounted.
        let done =
            [record("g", "done", 16, Phase::Detaching), record("h", "still", 17, Phase::Detaching)];
        let view = loop_view(done.iter(), &names(&["still"]), |_| None);
        assert_eq!(view.forget, names(&["g"]));
    }

    #[test]
    fn records_survive_a_restart_and_a_failed_write_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("ov-cni-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut reg = Registry::open(&dir).unwrap();
        assert!(reg.get("a").is_none());
        reg.set("a", Some(record("a", "web1", 7, Phase::Attached))).unwrap();
        reg.set("b", Some(record("b", "web2", 8, Phase::Attaching))).unwrap();
        reg.set("b", None).unwrap();
        let again = Registry::open(&dir).unwrap();
        assert_eq!(again.get("a"), Some(&record("a", "web1", 7, Phase::Attached)));
        assert_eq!(again.by_endpoint("web1").map(|r| r.container_id.as_str()), Some("a"));
        assert!(again.get("b").is_none());

        std::fs::write(dir.join("cni.json"), b"{").unwrap();
        assert!(Registry::open(&dir).unwrap_err().to_string().contains("cni.json"));
        let _ = std::fs::remove_dir_all(&dir);

        // Under a file, where no directory can be made.
        let file =
            std::env::temp_dir().join(format!("ov-cni-registry-file-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        let mut broken = Registry { path: file.join("cni.json"), records: BTreeMap::new() };
        assert!(broken.set("a", Some(record("a", "web1", 7, Phase::Attached))).is_err());
        assert!(broken.get("a").is_none());
        let _ = std::fs::remove_file(&file);
    }
}
