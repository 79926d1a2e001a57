//! What the agent keeps in `--data-dir`:
//!
//! * `desired.json` + `desired.log`: the last catalog it received, so a restart with
//!   every controller down rebuilds the same kernel state (persisted incrementally, see
//!   [`crate::journal`]);
//! * `namespaces.json`: the namespaces it created or took over: a cache of the marks in
//!   the kernel (see [`crate::marks`]), which say the same and survive this file.
//!
//! Every write goes to a temporary file, is synced, then renamed over the old one (the
//! directory is made again if someone removed it).
//!
//! Local state is disposable (SPEC): every file here is a cache of what the controller
//! and the kernel know. A file that cannot be parsed is set aside ([`set_aside`]: renamed
//! to `NAME.corrupt-UNIXTIME`, logged once) and rebuilt; a pass never fails forever
//! because of one.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use overlay_model::{Catalog, Change, Endpoint, Host, NameEntry, Network, Route};
use serde::{Deserialize, Serialize};

/// The catalog as JSON can hold it (route keys are tuples, so lists instead of maps).
#[derive(Serialize, Deserialize)]
struct Persisted {
    revision: u64,
    networks: Vec<Network>,
    endpoints: Vec<Endpoint>,
    routes: Vec<Route>,
    hosts: Vec<Host>,
    /// Endpoints known by name only (absent from files of older agents).
    #[serde(default)]
    names: Vec<NameEntry>,
}

impl Persisted {
    fn from_catalog(c: &Catalog) -> Persisted {
        Persisted {
            revision: c.revision,
            networks: c.networks.values().cloned().collect(),
            endpoints: c.endpoints.values().cloned().collect(),
            routes: c.routes.values().cloned().collect(),
            hosts: c.hosts.values().cloned().collect(),
            names: c
                .names
                .iter()
                .map(|(name, aliases)| NameEntry { name: name.clone(), aliases: aliases.clone() })
                .collect(),
        }
    }

    fn into_catalog(self) -> Catalog {
        Catalog {
            revision: self.revision,
            networks: self.networks.into_iter().map(|n| (n.name.clone(), n)).collect(),
            endpoints: self.endpoints.into_iter().map(|e| (e.name.clone(), e)).collect(),
            routes: self.routes.into_iter().map(|r| (r.key(), r)).collect(),
            hosts: self.hosts.into_iter().map(|h| (h.name.clone(), h)).collect(),
            names: std::sync::Arc::new(
                self.names.into_iter().map(|e| (e.name, e.aliases)).collect(),
            ),
        }
    }
}

/// Moves a file that cannot be parsed out of the way (to `NAME.corrupt-UNIXTIME`, next
/// to it), saying so once, so it is rebuilt while a human can still look at it. Returns
/// where it went.
pub fn set_aside(path: &Path, why: &dyn std::fmt::Display) -> io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = path.with_file_name(format!("{name}.corrupt-{secs}"));
    fs::rename(path, &aside)?;
    tracing::warn!(
        "{} cannot be read ({why}); set aside as {} and rebuilt from the controller and the kernel",
        path.display(),
        aside.display()
    );
    Ok(aside)
}

/// Writes `data` to `path` atomically (making its directory if it is gone).
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> io::Result<Store> {
        fs::create_dir_all(dir)?;
        Ok(Store { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn catalog_path(&self) -> PathBuf {
        self.dir.join("desired.json")
    }

    fn namespaces_path(&self) -> PathBuf {
        self.dir.join("namespaces.json")
    }

    /// The persisted catalog (`desired.json` and the log after it); `Ok(None)` when
    /// there is none yet.
    pub fn load_catalog(&self) -> io::Result<Option<Catalog>> {
        let mut catalog = match fs::read(self.catalog_path()) {
            Ok(bytes) => serde_json::from_slice::<Persisted>(&bytes)
                .map(Persisted::into_catalog)
                .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.catalog_path().display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        crate::journal::replay(&self.dir, &mut catalog)?;
        Ok(Some(catalog))
    }

    /// Rewrites the whole catalog (and empties the log).
    pub fn save_catalog(&self, catalog: &Catalog) -> io::Result<()> {
        let bytes =
            serde_json::to_vec(&Persisted::from_catalog(catalog)).map_err(io::Error::other)?;
        write_atomic(&self.catalog_path(), &bytes)?;
        crate::journal::clear(&self.dir)
    }

    /// Persists `catalog` after a batch that made `changes` to it: one appended line,
    /// or a rewrite when the log has grown larger than the catalog. `None`: the catalog
    /// was replaced (a snapshot), rewrite it.
    pub fn persist_catalog(&self, catalog: &Catalog, changes: Option<&[Change]>) -> io::Result<()> {
        let Some(changes) = changes else { return self.save_catalog(catalog) };
        if !self.catalog_path().exists() {
            return self.save_catalog(catalog);
        }
        let log_bytes = crate::journal::append(&self.dir, catalog.revision, changes)?;
        if crate::journal::should_compact(&self.dir, log_bytes) {
            self.save_catalog(catalog)?;
        }
        Ok(())
    }

    pub fn cluster_id_path(&self) -> PathBuf {
        self.dir.join("cluster-id")
    }

    /// The cluster this agent belongs to, once a controller named it.
    pub fn cluster_id(&self) -> Option<String> {
        let text = fs::read_to_string(self.cluster_id_path()).ok()?;
        let id = text.trim();
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    }

    pub fn save_cluster_id(&self, id: &str) -> io::Result<()> {
        write_atomic(&self.cluster_id_path(), format!("{id}\n").as_bytes())
    }

    /// Namespaces the agent created (or took over). A record that cannot be parsed is
    /// set aside and starts empty: the kernel's marks fill it again (see
    /// [`crate::marks::Claimer`]).
    pub fn owned_namespaces(&self) -> io::Result<BTreeSet<String>> {
        let path = self.namespaces_path();
        match fs::read(&path) {
            Ok(bytes) => match parse_namespaces(&bytes) {
                Some(set) => Ok(set),
                None => {
                    let why = "not a JSON list of namespace names";
                    match set_aside(&path, &why) {
                        Ok(_) => Ok(BTreeSet::new()),
                        // Gone meanwhile (another pass set it aside): start empty too.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
                        Err(e) => Err(e),
                    }
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(e),
        }
    }

    fn save_namespaces(&self, set: &BTreeSet<String>) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(set).map_err(io::Error::other)?;
        write_atomic(&self.namespaces_path(), &bytes)
    }

    /// Records `name` as ours (before creating it, so a crash never orphans one).
    pub fn record_namespace(&self, name: &str) -> io::Result<()> {
        let mut set = self.owned_namespaces()?;
        if set.insert(name.to_string()) {
            self.save_namespaces(&set)?;
        }
        Ok(())
    }

    /// Forgets `name` (after deleting it).
    pub fn forget_namespace(&self, name: &str) -> io::Result<()> {
        let mut set = self.owned_namespaces()?;
        if set.remove(name) {
            self.save_namespaces(&set)?;
        }
        Ok(())
    }
}

/// The record's names, if it is a list of valid namespace names (names become paths:
/// anything else means the file is not ours to trust).
fn parse_namespaces(bytes: &[u8]) -> Option<BTreeSet<String>> {
    let set: BTreeSet<String> = serde_json::from_slice(bytes).ok()?;
    set.iter().all(|n| overlay_model::names::is_dns_label(n)).then_some(set)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn catalog_and_namespaces_round_trip() {
        let dir = std::env::temp_dir().join(format!("ov-agent-store-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.load_catalog().unwrap(), None);
        let cat = crate::desired::tests::catalog();
        store.save_catalog(&cat).unwrap();
        assert_eq!(store.load_catalog().unwrap(), Some(cat.clone()));
        // Incremental: the log on top of the file.
        let mut next = cat.clone();
        let gone = Change::DeleteEndpoint("db".into());
        next.apply_change(&gone);
        next.revision += 1;
        store.persist_catalog(&next, Some(&[gone])).unwrap();
        assert_eq!(store.load_catalog().unwrap(), Some(next.clone()));
        // Endpoints known by name only, through the log and through a rewrite.
        let named = Change::PutNames(vec![NameEntry { name: "far".into(), aliases: vec![] }]);
        next.apply_change(&named);
        next.revision += 1;
        store.persist_catalog(&next, Some(&[named])).unwrap();
        assert_eq!(store.load_catalog().unwrap(), Some(next.clone()));
        assert!(next.names.contains_key("far"));
        store.persist_catalog(&next, None).unwrap();
        assert!(!dir.join(crate::journal::LOG_FILE).exists(), "a rewrite empties the log");
        assert_eq!(store.load_catalog().unwrap(), Some(next));
        store.record_namespace("b").unwrap();
        store.record_namespace("a").unwrap();
        store.forget_namespace("b").unwrap();
        assert_eq!(store.owned_namespaces().unwrap(), BTreeSet::from(["a".to_string()]));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 15: a damaged record is set aside and starts empty; a deleted data dir is
    /// made again on the next write.
    #[test]
    fn a_damaged_record_is_set_aside_and_a_lost_dir_comes_back() {
        let dir = std::env::temp_dir().join(format!("ov-agent-store-bad-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        for garbage in [&b"\x00\xffgarbage"[..], b"[\"ok\", \"../etc\"]", b"[\"trunc"] {
            fs::write(dir.join("namespaces.json"), garbage).unwrap();
            assert_eq!(store.owned_namespaces().unwrap(), BTreeSet::new());
            assert!(!dir.join("namespaces.json").exists());
            let aside = fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("namespaces.json.corrupt-"))
                .count();
            assert!(aside >= 1);
            store.record_namespace("a").unwrap();
            assert_eq!(store.owned_namespaces().unwrap(), BTreeSet::from(["a".to_string()]));
            fs::remove_file(dir.join("namespaces.json")).unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
        store.record_namespace("b").unwrap();
        assert_eq!(store.owned_namespaces().unwrap(), BTreeSet::from(["b".to_string()]));
        fs::remove_dir_all(&dir).unwrap();
    }
}
