//! Durable raft storage for one controller member.
//!
//! raft-rs leaves persistence to the caller: [`DiskStorage`] is the `raft::Storage` the
//! driver task hands to `RawNode`, plus the write side the Ready loop needs (append,
//! hard state, sync, snapshots). It is owned by that single task, so there are no locks.
//! All log entries after the last compaction are also kept in memory for raft's reads;
//! the disk exists so a restarted member comes back with exactly what it acknowledged.
//!
//! # On-disk format
//!
//! Two files in the member's directory, all integers little endian:
//!
//! * `snapshot`: `"OVRSNP\0\x01"`, `[u32 meta_len][u64 data_len]`, a protobuf
//!   `SnapshotMetadata` (index, term, conf state), the state-machine bytes, and a
//!   `[u32 crc32]` over everything after the magic. It is only ever replaced whole
//!   (write `snapshot.tmp`, fsync, rename, fsync the directory), so any defect is
//!   corruption. A fresh member gets an index-0 snapshot holding the initial voters, so
//!   the membership is always on disk.
//! * `log`: `"OVRLOG\0\x01"`, then records `[u32 body_len][u32 crc32(body)][body]` where
//!   body is `[u8 kind][payload]`. The first record is always `Base` (index and term of
//!   the entry just before the first one kept), then any mix of `Entry` and `HardState`
//!   records. Replay is "last writer wins": an entry at index i drops every entry >= i
//!   (that is how raft overwrites a conflicting suffix), the last hard state counts.
//!   New records are appended through a buffer and fsynced once per [`DiskStorage::sync`];
//!   compaction and snapshot installation rewrite the file (tmp + rename) so it only
//!   holds the kept tail.
//!
//! A crash mid-append leaves a torn tail (short record, bad checksum on the last record,
//! zero fill); open truncates it and reports it via [`DiskStorage::recovery_note`].
//! Nothing in a torn tail was synced, so nothing acknowledged is lost. A damaged record
//! with valid data after it is [`StorageError::Corrupt`].
//!
//! Membership: the stored conf state is the one *as of the snapshot*. Conf changes after
//! it live in the log and are replayed by the driver, which is why the driver must start
//! `RawNode` with `Config::applied` equal to the snapshot index (see
//! [`DiskStorage::snapshot_metadata`]).

mod format;
#[cfg(test)]
mod tests;

use std::cmp;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};

use format::{Kind, Scan};

const LOG_FILE: &str = "log";
const SNAPSHOT_FILE: &str = "snapshot";
/// Large enough that a typical Ready batch reaches the kernel in one write.
const WRITE_BUFFER: usize = 256 * 1024;

/// Why the raft storage could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A filesystem operation failed (permissions, disk full, I/O error).
    #[error("raft storage: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file holds bytes that no crash could have produced (bit rot, foreign writer).
    #[error(
        "raft storage: {} is corrupt at byte {offset}: {reason}; this member's copy cannot \
         be trusted: move its data directory aside and re-add the member so it catches up \
         from the others",
        path.display()
    )]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    /// The files are individually valid but do not fit together (e.g. one was deleted).
    #[error(
        "raft storage: {} is inconsistent: {reason}; move the directory aside and re-add \
         the member",
        dir.display()
    )]
    Inconsistent { dir: PathBuf, reason: String },
    /// The driver tried to append past the end of the log.
    #[error("raft storage: entry {index} does not follow the last index {last_index}")]
    LogGap { index: u64, last_index: u64 },
    /// The driver tried to rewrite entries that are already compacted into the snapshot.
    #[error("raft storage: entry {index} is before the first kept index {first_index}")]
    AppendCompacted { index: u64, first_index: u64 },
    /// The driver tried to replace entries that are already committed (raft never does).
    #[error("raft storage: entry {index} is already committed (commit index {commit})")]
    OverwriteCommitted { index: u64, commit: u64 },
    /// A snapshot to install is older than the one already stored.
    #[error("raft storage: snapshot at index {index} is older than the stored one at {current}")]
    SnapshotOutOfDate { index: u64, current: u64 },
    /// Compaction asked for an index that is not committed (or not in the log).
    #[error(
        "raft storage: cannot snapshot at index {index}: only committed entries may be \
         compacted (commit {commit}, last index {last_index})"
    )]
    CompactUncommitted { index: u64, commit: u64, last_index: u64 },
    /// A record could not be encoded (it exceeds the 4 GiB record limit).
    #[error("raft storage: cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    /// An earlier write failed, so memory and disk may disagree; only a reopen is safe.
    #[error("raft storage: an earlier write failed; restart the member to recover from disk")]
    Poisoned,
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> raft::Error {
        raft::Error::Store(RaftStorageError::Other(Box::new(e)))
    }
}

type Result<T, E = StorageError> = std::result::Result<T, E>;

/// The durable raft log, hard state and latest snapshot of one member.
///
/// Invariants: `entries[k].index == base_index + 1 + k`; `base_index <= snapshot index
/// <= hard_state.commit <= last_index()`.
pub struct DiskStorage {
    dir: PathBuf,
    log_path: PathBuf,
    snapshot_path: PathBuf,
    log: BufWriter<File>,
    /// Records were written since the last fsync.
    dirty: bool,
    /// A write failed part-way; see [`StorageError::Poisoned`].
    poisoned: bool,
    /// Metadata plus data; its data is reference counted, so handing it to raft is cheap.
    snapshot: Snapshot,
    /// The entry just before `entries[0]`. Differs from the snapshot index when
    /// compaction keeps a tail of already-snapshotted entries for lagging followers.
    base_index: u64,
    base_term: u64,
    entries: Vec<Entry>,
    hard_state: HardState,
    fresh: bool,
    recovery_note: Option<String>,
    /// Reused encode buffer, so appends do not allocate per record.
    scratch: Vec<u8>,
}

impl DiskStorage {
    /// Opens (or creates) the storage in `dir`. `voters` is the initial membership and is
    /// only used when `dir` holds no prior state; an existing directory is recovered as is.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<DiskStorage> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let log_path = dir.join(LOG_FILE);
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        // Left behind by a crash before their rename; never authoritative.
        remove_if_exists(&tmp_path(&log_path))?;
        remove_if_exists(&tmp_path(&snapshot_path))?;

        let has_log = exists(&log_path)?;
        let has_snapshot = exists(&snapshot_path)?;
        match (has_snapshot, has_log) {
            (false, false) => Self::init(dir, voters),
            (true, false) => {
                // Initialisation writes the snapshot first; an index-0 snapshot without a
                // log is a crash during it, so start over. Anything later means lost data.
                if read_snapshot(&snapshot_path)?.get_metadata().index == 0 {
                    Self::init(dir, voters)
                } else {
                    Err(inconsistent(dir, "the snapshot exists but the log is missing"))
                }
            }
            (false, true) => Err(inconsistent(
                dir,
                "the log exists but the snapshot (which holds the membership) is missing",
            )),
            (true, true) => Self::recover(dir, log_path, snapshot_path),
        }
    }

    /// True when `dir` holds a member's state that [`open`](Self::open) recovers (its log
    /// exists: initialisation writes the log last).
    pub fn has_state(dir: &Path) -> Result<bool> {
        exists(&dir.join(LOG_FILE))
    }

    /// Initialises `dir`, which must hold no state, from `snapshot` taken by another
    /// member (index > 0): the log starts after it and everything up to it counts as
    /// committed. This is how a member started with `--join`, or one that lost its data
    /// dir, starts. Durable on return.
    pub fn open_joined(dir: &Path, snapshot: Snapshot) -> Result<DiskStorage> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        if Self::has_state(dir)? {
            return Err(inconsistent(dir, "it already holds a raft log; a member joins only once"));
        }
        let (index, term) = (snapshot.get_metadata().index, snapshot.get_metadata().term);
        if index == 0 {
            return Err(inconsistent(dir, "the snapshot to join with is empty (index 0)"));
        }
        let hard_state = HardState { term, commit: index, ..Default::default() };
        Self::init_with(dir, snapshot, hard_state)
    }

    fn init(dir: &Path, voters: &[u64]) -> Result<DiskStorage> {
        let mut conf_state = ConfState::default();
        conf_state.set_voters(voters.to_vec());
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().set_conf_state(conf_state);
        Self::init_with(dir, snapshot, HardState::default())
    }

    /// Writes `snapshot`, then a log that starts right after it (the log's rename is what
    /// makes the directory count as initialised).
    fn init_with(dir: &Path, snapshot: Snapshot, hard_state: HardState) -> Result<DiskStorage> {
        let (base_index, base_term) = (snapshot.get_metadata().index, snapshot.get_metadata().term);
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let log_path = dir.join(LOG_FILE);
        write_snapshot_file(&snapshot_path, dir, &snapshot)?;
        let mut scratch = Vec::new();
        let file = write_log_file(
            &log_path,
            dir,
            (base_index, base_term),
            &[],
            &hard_state,
            &mut scratch,
        )?;
        Ok(DiskStorage {
            dir: dir.to_path_buf(),
            log_path,
            snapshot_path,
            log: BufWriter::with_capacity(WRITE_BUFFER, file),
            dirty: false,
            poisoned: false,
            snapshot,
            base_index,
            base_term,
            entries: Vec::new(),
            hard_state,
            fresh: true,
            recovery_note: None,
            scratch,
        })
    }

    fn recover(dir: &Path, log_path: PathBuf, snapshot_path: PathBuf) -> Result<DiskStorage> {
        let snapshot = read_snapshot(&snapshot_path)?;
        let buf = fs::read(&log_path).map_err(io_err("read", &log_path))?;
        let replayed = replay_log(&log_path, &buf)?;
        let mut notes = Vec::new();

        let file =
            OpenOptions::new().append(true).open(&log_path).map_err(io_err("open", &log_path))?;
        if replayed.valid_len < buf.len() {
            // Appending after the garbage would make the next replay stop at it again.
            file.set_len(replayed.valid_len as u64).map_err(io_err("truncate", &log_path))?;
            file.sync_all().map_err(io_err("fsync", &log_path))?;
            notes.push(format!(
                "dropped a torn tail of {} bytes at offset {} of {} (an unsynced write \
                 interrupted by a crash)",
                buf.len() - replayed.valid_len,
                replayed.valid_len,
                log_path.display()
            ));
        }

        let mut storage = DiskStorage {
            dir: dir.to_path_buf(),
            log_path,
            snapshot_path,
            log: BufWriter::with_capacity(WRITE_BUFFER, file),
            dirty: false,
            poisoned: false,
            snapshot,
            base_index: replayed.base_index,
            base_term: replayed.base_term,
            entries: replayed.entries,
            hard_state: replayed.hard_state,
            fresh: false,
            recovery_note: None,
            scratch: Vec::new(),
        };
        storage.reconcile_with_snapshot(&mut notes)?;
        if !notes.is_empty() {
            storage.recovery_note = Some(notes.join("; "));
        }
        Ok(storage)
    }

    /// The snapshot file is replaced before the log is rewritten, so a crash in between
    /// leaves a snapshot newer than the log's base. Finish that interrupted step here.
    fn reconcile_with_snapshot(&mut self, notes: &mut Vec<String>) -> Result<()> {
        let (snap_index, snap_term) = {
            let meta = self.snapshot.get_metadata();
            (meta.index, meta.term)
        };
        if self.base_index > snap_index {
            return Err(inconsistent(
                &self.dir,
                format!(
                    "the log starts after index {} but the snapshot only covers up to {}",
                    self.base_index, snap_index
                ),
            ));
        }
        if snap_index > self.base_index && self.term_at(snap_index) != Some(snap_term) {
            // The log does not contain the snapshot's entry, so nothing in it can be
            // trusted to follow the snapshot (same as installing one from the leader).
            self.entries.clear();
            self.base_index = snap_index;
            self.base_term = snap_term;
            self.hard_state.commit = cmp::max(self.hard_state.commit, snap_index);
            self.hard_state.term = cmp::max(self.hard_state.term, snap_term);
            self.rewrite_log()?;
            notes.push(format!(
                "finished installing the snapshot at index {snap_index} (the log was older)"
            ));
        }
        // Everything up to the snapshot is committed by definition, whatever the last
        // hard state record managed to say.
        self.hard_state.commit = cmp::max(self.hard_state.commit, snap_index);
        if self.hard_state.commit > self.last_index() {
            return Err(inconsistent(
                &self.dir,
                format!(
                    "the commit index {} is beyond the last log entry {}",
                    self.hard_state.commit,
                    self.last_index()
                ),
            ));
        }
        Ok(())
    }

    /// True when this open found no prior state and initialised the directory (empty, or
    /// from a joined snapshot).
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// What recovery had to repair on open (a torn tail, an interrupted snapshot
    /// install), for the caller to log. `None` when the files were clean.
    pub fn recovery_note(&self) -> Option<&str> {
        self.recovery_note.as_deref()
    }

    #[cfg(test)]
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Membership as of the latest snapshot (conf changes after it are in the log).
    pub fn conf_state(&self) -> &ConfState {
        self.snapshot.get_metadata().get_conf_state()
    }

    /// First index readable through `entries()`.
    pub fn first_index(&self) -> u64 {
        self.base_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.base_index + self.entries.len() as u64
    }

    /// Index, term and membership of the latest snapshot (index 0 before the first
    /// compaction). The driver starts `RawNode` with `Config::applied` set to this index.
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        self.snapshot.get_metadata()
    }

    /// The latest snapshot, to restore the state machine from on start. `None` until
    /// the first compaction or snapshot install (index 0 means "empty state").
    pub fn snapshot_data(&self) -> Option<(&SnapshotMetadata, &[u8])> {
        let meta = self.snapshot.get_metadata();
        (meta.index > 0).then(|| (meta, &self.snapshot.data[..]))
    }

    /// Writes `entries` (buffered, not synced). An entry at index i replaces any stored
    /// entries from i on, as raft requires when a leader overwrites a conflicting suffix.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        self.check_poisoned()?;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.base_index {
            return Err(StorageError::AppendCompacted {
                index: first.index,
                first_index: self.first_index(),
            });
        }
        // Raft only overwrites uncommitted suffixes; refusing here keeps a driver bug
        // from producing a log whose replay contradicts its own commit index.
        if first.index <= self.hard_state.commit {
            return Err(StorageError::OverwriteCommitted {
                index: first.index,
                commit: self.hard_state.commit,
            });
        }
        // Check the whole batch before writing: a gap on disk would fail the next replay.
        let start = cmp::min(first.index, self.last_index() + 1);
        for (expected, e) in (start..).zip(entries) {
            if e.index != expected {
                return Err(StorageError::LogGap { index: e.index, last_index: expected - 1 });
            }
        }
        for e in entries {
            self.write_record(Kind::Entry, |buf| {
                e.write_to_vec(buf).map_err(|err| encode_err("entry", err))
            })?;
        }
        self.entries.truncate((first.index - self.base_index - 1) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Writes the hard state (buffered, not synced).
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<()> {
        self.check_poisoned()?;
        self.write_record(Kind::HardState, |buf| {
            hs.write_to_vec(buf).map_err(|err| encode_err("hard state", err))
        })?;
        self.hard_state = hs.clone();
        Ok(())
    }

    /// Records a commit index from a `LightReady` (buffered; the next `sync` makes it
    /// durable). Losing it is harmless, raft re-learns the commit index from the leader,
    /// but persisting it lets a restart re-apply everything it had applied.
    pub fn set_commit(&mut self, commit: u64) -> Result<()> {
        if commit == self.hard_state.commit {
            return Ok(());
        }
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Makes everything written so far durable with one fsync. Call once per Ready,
    /// after `append`/`set_hard_state` and before sending persisted messages or
    /// acknowledging clients.
    pub fn sync(&mut self) -> Result<()> {
        self.check_poisoned()?;
        if !self.dirty {
            return Ok(());
        }
        let result = self
            .log
            .flush()
            .and_then(|()| self.log.get_ref().sync_data())
            .map_err(io_err("write and fsync", &self.log_path));
        self.poison_on_err(result)?;
        self.dirty = false;
        Ok(())
    }

    /// Installs a snapshot received from the leader: durably stores it, discards the
    /// whole log (raft restarts the log after the snapshot) and moves the commit index to
    /// it. Durable on return; no `sync` needed.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        self.check_poisoned()?;
        let (index, term) = {
            let meta = snapshot.get_metadata();
            (meta.index, meta.term)
        };
        let current = self.snapshot.get_metadata().index;
        if index < current {
            return Err(StorageError::SnapshotOutOfDate { index, current });
        }
        let result = write_snapshot_file(&self.snapshot_path, &self.dir, &snapshot);
        self.poison_on_err(result)?;
        self.snapshot = snapshot;
        self.entries.clear();
        self.base_index = index;
        self.base_term = term;
        self.hard_state.commit = index;
        self.hard_state.term = cmp::max(self.hard_state.term, term);
        self.rewrite_log()
    }

    /// Stores `data`, the state machine after applying everything up to `applied_index`
    /// with membership `conf_state`, as the snapshot; then drops log entries up to
    /// `applied_index - keep_entries` and rewrites the log so disk use stays bounded. The
    /// kept tail lets slightly lagging followers catch up from the log instead of a full
    /// snapshot. Durable on return. A no-op if `applied_index` is not past the current
    /// snapshot.
    pub fn compact(
        &mut self,
        applied_index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
        keep_entries: u64,
    ) -> Result<()> {
        self.check_poisoned()?;
        if applied_index <= self.snapshot.get_metadata().index {
            return Ok(());
        }
        let uncommitted = || StorageError::CompactUncommitted {
            index: applied_index,
            commit: self.hard_state.commit,
            last_index: self.last_index(),
        };
        if applied_index > self.hard_state.commit {
            return Err(uncommitted());
        }
        let term = self.term_at(applied_index).ok_or_else(uncommitted)?;

        let mut snapshot = Snapshot { data: data.into(), ..Default::default() };
        let meta = snapshot.mut_metadata();
        meta.index = applied_index;
        meta.term = term;
        meta.set_conf_state(conf_state);
        let result = write_snapshot_file(&self.snapshot_path, &self.dir, &snapshot);
        self.poison_on_err(result)?;
        self.snapshot = snapshot;

        let new_base = cmp::max(applied_index.saturating_sub(keep_entries), self.base_index);
        if let Some(new_base_term) = self.term_at(new_base) {
            self.entries.drain(..(new_base - self.base_index) as usize);
            self.base_index = new_base;
            self.base_term = new_base_term;
        }
        // Rewrite even if the base did not move: it also drops overwritten suffixes and
        // superseded hard states.
        self.rewrite_log()
    }

    /// Term of `index` if it is the base or a kept entry.
    fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            return Some(self.base_term);
        }
        let offset = index.checked_sub(self.base_index + 1)?;
        self.entries.get(offset as usize).map(|e| e.term)
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned {
            Err(StorageError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Any failed write leaves disk and memory possibly out of step; refuse further
    /// writes so the driver stops and a reopen recovers from what is really on disk.
    fn poison_on_err<T>(&mut self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Frames one record in the scratch buffer and hands it to the buffered writer.
    fn write_record(
        &mut self,
        kind: Kind,
        payload: impl FnOnce(&mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        self.scratch.clear();
        encode_record(&mut self.scratch, kind, payload)?;
        let result = self.log.write_all(&self.scratch).map_err(io_err("write to", &self.log_path));
        self.poison_on_err(result)?;
        self.dirty = true;
        Ok(())
    }

    /// Replaces the log file with one holding exactly the in-memory state.
    fn rewrite_log(&mut self) -> Result<()> {
        let result = write_log_file(
            &self.log_path,
            &self.dir,
            (self.base_index, self.base_term),
            &self.entries,
            &self.hard_state,
            &mut self.scratch,
        );
        let file = self.poison_on_err(result)?;
        let old = std::mem::replace(&mut self.log, BufWriter::with_capacity(WRITE_BUFFER, file));
        // Whatever the old writer still buffers is already in the new file; flushing it
        // into the replaced inode would only waste a write.
        let _ = old.into_parts();
        self.dirty = false;
        Ok(())
    }
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state().clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.base_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        // raft never asks for this; MemStorage panics, we refuse instead.
        if high > self.last_index() + 1 || low > high {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let lo = (low - self.base_index - 1) as usize;
        let hi = (high - self.base_index - 1) as usize;
        let mut entries = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.base_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        self.term_at(idx).ok_or(raft::Error::Store(RaftStorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(DiskStorage::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(DiskStorage::last_index(self))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

/// What a log replay produced; `valid_len` is where a torn tail (if any) starts.
struct Replayed {
    base_index: u64,
    base_term: u64,
    entries: Vec<Entry>,
    hard_state: HardState,
    valid_len: usize,
}

fn replay_log(path: &Path, buf: &[u8]) -> Result<Replayed> {
    let corrupt = |offset: usize, reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    if buf.get(..format::LOG_MAGIC.len()) != Some(&format::LOG_MAGIC[..]) {
        // The file only ever appears by rename after an fsync, so a bad header is damage.
        return Err(corrupt(0, "not an overlay raft log (bad magic or version)".into()));
    }
    let mut pos = format::LOG_MAGIC.len();
    let mut base: Option<(u64, u64)> = None;
    let mut entries: Vec<Entry> = Vec::new();
    let mut hard_state = HardState::default();
    loop {
        let (kind, payload, next) = match format::next_record(buf, pos) {
            Scan::End | Scan::Torn => break,
            Scan::Corrupt(reason) => return Err(corrupt(pos, reason.into())),
            Scan::Record { kind, payload, next } => (kind, payload, next),
        };
        let kind = Kind::from_byte(kind)
            .ok_or_else(|| corrupt(pos, format!("unknown record kind {kind}")))?;
        match (kind, base) {
            (Kind::Base, None) => {
                base = Some(
                    format::decode_base(payload)
                        .ok_or_else(|| corrupt(pos, "malformed base record".into()))?,
                );
            }
            (Kind::Base, Some(_)) => return Err(corrupt(pos, "second base record".into())),
            (_, None) => {
                return Err(corrupt(pos, "the log does not start with a base record".into()))
            }
            (Kind::Entry, Some((base_index, _))) => {
                let entry = Entry::parse_from_bytes(payload)
                    .map_err(|e| corrupt(pos, format!("undecodable entry: {e}")))?;
                let last = base_index + entries.len() as u64;
                if entry.index <= base_index || entry.index > last + 1 {
                    return Err(corrupt(
                        pos,
                        format!(
                            "entry {} does not fit a log holding {}..={}",
                            entry.index,
                            base_index + 1,
                            last
                        ),
                    ));
                }
                entries.truncate((entry.index - base_index - 1) as usize);
                entries.push(entry);
            }
            (Kind::HardState, Some(_)) => {
                hard_state = HardState::parse_from_bytes(payload)
                    .map_err(|e| corrupt(pos, format!("undecodable hard state: {e}")))?;
            }
        }
        pos = next;
    }
    let Some((base_index, base_term)) = base else {
        return Err(corrupt(pos, "the log has no base record".into()));
    };
    Ok(Replayed { base_index, base_term, entries, hard_state, valid_len: pos })
}

fn encode_record(
    out: &mut Vec<u8>,
    kind: Kind,
    payload: impl FnOnce(&mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let start = format::begin_record(out, kind);
    payload(out)?;
    format::finish_record(out, start).map_err(|len| StorageError::Encode {
        what: "log record",
        reason: format!("{len} bytes exceeds the 4 GiB record limit"),
    })
}

/// Writes a complete log (magic, base, entries, hard state) to `log.tmp`, fsyncs it and
/// renames it over `log`. Returns the open file, positioned at its end for appends.
fn write_log_file(
    log_path: &Path,
    dir: &Path,
    (base_index, base_term): (u64, u64),
    entries: &[Entry],
    hard_state: &HardState,
    scratch: &mut Vec<u8>,
) -> Result<File> {
    let tmp = tmp_path(log_path);
    let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, file);
    let write_err = io_err("write to", &tmp);
    w.write_all(format::LOG_MAGIC).map_err(&write_err)?;
    scratch.clear();
    encode_record(scratch, Kind::Base, |buf| {
        format::encode_base(buf, base_index, base_term);
        Ok(())
    })?;
    w.write_all(scratch).map_err(&write_err)?;
    for e in entries {
        scratch.clear();
        encode_record(scratch, Kind::Entry, |buf| {
            e.write_to_vec(buf).map_err(|err| encode_err("entry", err))
        })?;
        w.write_all(scratch).map_err(&write_err)?;
    }
    scratch.clear();
    encode_record(scratch, Kind::HardState, |buf| {
        hard_state.write_to_vec(buf).map_err(|err| encode_err("hard state", err))
    })?;
    w.write_all(scratch).map_err(&write_err)?;
    let file = w.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, log_path).map_err(io_err("rename into place", log_path))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Replaces the snapshot file atomically and durably.
fn write_snapshot_file(path: &Path, dir: &Path, snapshot: &Snapshot) -> Result<()> {
    let meta = snapshot
        .get_metadata()
        .write_to_bytes()
        .map_err(|err| encode_err("snapshot metadata", err))?;
    let tmp = tmp_path(path);
    let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, file);
    format::write_snapshot(&mut w, &meta, &snapshot.data).map_err(io_err("write to", &tmp))?;
    let file = w.into_inner().map_err(|e| io_err("write to", &tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    sync_dir(dir)
}

fn read_snapshot(path: &Path) -> Result<Snapshot> {
    let buf = fs::read(path).map_err(io_err("read", path))?;
    let corrupt = |offset: u64, reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let (meta, data) =
        format::decode_snapshot(&buf).map_err(|(offset, reason)| corrupt(offset, reason.into()))?;
    let meta = SnapshotMetadata::parse_from_bytes(meta)
        .map_err(|e| corrupt(0, format!("undecodable snapshot metadata: {e}")))?;
    let mut snapshot = Snapshot::default();
    snapshot.set_metadata(meta);
    snapshot.data = data.to_vec().into();
    Ok(snapshot)
}

/// A rename is only durable once the directory entry itself is synced.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", dir))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn exists(path: &Path) -> Result<bool> {
    path.try_exists().map_err(io_err("check", path))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl Fn(io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io { op, path: path.clone(), source }
}

fn encode_err(what: &'static str, err: protobuf::ProtobufError) -> StorageError {
    StorageError::Encode { what, reason: err.to_string() }
}

fn inconsistent(dir: &Path, reason: impl Into<String>) -> StorageError {
    StorageError::Inconsistent { dir: dir.to_path_buf(), reason: reason.into() }
}
