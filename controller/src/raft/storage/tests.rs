//! Tests for `DiskStorage`: the `raft::Storage` contract, the persistence API and
//! recovery from what a crash can leave on disk.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RawNode, Storage, StorageError as RaftStorageError};

use super::{format, write_snapshot_file, DiskStorage, StorageError, LOG_FILE, SNAPSHOT_FILE};

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("entry {index} term {term}").into_bytes().into(),
        ..Default::default()
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit, ..Default::default() }
}

fn voters(ids: &[u64]) -> ConfState {
    let mut cs = ConfState::default();
    cs.set_voters(ids.to_vec());
    cs
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn all_entries(s: &DiskStorage) -> Vec<Entry> {
    Storage::entries(s, s.first_index(), s.last_index() + 1, None, ctx()).unwrap()
}

fn store_err(e: raft::Error) -> RaftStorageError {
    match e {
        raft::Error::Store(e) => e,
        other => panic!("expected a storage error, got {other:?}"),
    }
}

/// A store with entries 1..=n at term 1, all committed and synced.
fn filled(dir: &std::path::Path, n: u64) -> DiskStorage {
    let mut s = DiskStorage::open(dir, &[1]).unwrap();
    s.append(&entries(1..=n, 1)).unwrap();
    s.set_hard_state(&hard_state(1, 1, n)).unwrap();
    s.sync().unwrap();
    s
}

#[test]
fn fresh_open_initialises_membership() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
    assert!(s.is_fresh());
    assert_eq!(s.recovery_note(), None);
    let state = s.initial_state().unwrap();
    assert_eq!(state.conf_state, voters(&[1, 2, 3]));
    assert_eq!(state.hard_state, HardState::default());
    assert_eq!((s.first_index(), s.last_index()), (1, 0));
    assert_eq!(Storage::term(&s, 0).unwrap(), 0);
    assert!(s.snapshot_data().is_none());
    drop(s);

    // Voters passed on reopen are ignored: the directory is the source of truth.
    let s = DiskStorage::open(dir.path(), &[9]).unwrap();
    assert!(!s.is_fresh());
    assert_eq!(s.conf_state(), &voters(&[1, 2, 3]));
}

#[test]
fn append_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = filled(dir.path(), 5);
    assert_eq!((s.first_index(), s.last_index()), (1, 5));
    assert_eq!(all_entries(&s), entries(1..=5, 1));
    assert_eq!(Storage::entries(&s, 2, 4, None, ctx()).unwrap(), entries(2..=3, 1));
    assert_eq!(Storage::term(&s, 3).unwrap(), 1);
    assert_eq!(store_err(Storage::term(&s, 6).unwrap_err()), RaftStorageError::Unavailable);
    assert_eq!(
        store_err(Storage::entries(&s, 2, 7, None, ctx()).unwrap_err()),
        RaftStorageError::Unavailable
    );
}

#[test]
fn conflicting_suffix_is_replaced_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = DiskStorage::open(dir.path(), &[1]).unwrap();
    s.append(&entries(1..=5, 1)).unwrap();
    s.set_hard_state(&hard_state(1, 1, 2)).unwrap();
    s.sync().unwrap();
    assert!(matches!(
        s.append(&entries(2..=2, 2)),
        Err(StorageError::OverwriteCommitted { index: 2, commit: 2 })
    ));
    s.append(&entries(3..=4, 2)).unwrap();
    s.sync().unwrap();
    let expected: Vec<Entry> = entries(1..=2, 1).into_iter().chain(entries(3..=4, 2)).collect();
    assert_eq!(all_entries(&s), expected);
    assert_eq!(s.last_index(), 4);
    drop(s);

    let s = DiskStorage::open(dir.path(), &[1]).unwrap();
    assert_eq!(all_entries(&s), expected);
    assert_eq!(Storage::term(&s, 3).unwrap(), 2);
}

#[test]
fn append_rejects_gaps_and_compacted_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = filled(dir.path(), 5);
    assert!(matches!(
        s.append(&entries(7..=8, 1)),
        Err(StorageError::LogGap { index: 7, last_index: 5 })
    ));
    let mut gappy = entries(6..=6, 1);
    gappy.push(entry(8, 1));
    assert!(matches!(s.append(&gappy), Err(StorageError::LogGap { index: 8, .. })));
    s.compact(5, voters(&[1]), b"state".to_vec(), 0).unwrap();
    assert!(matches!(
        s.append(&entries(5..=6, 1)),
        Err(StorageError::AppendCompacted { index: 5, first_index: 6 })
    ));
    // Nothing of the rejected batches reached memory.
    assert_eq!(s.last_index(), 5);
}

#[test]
fn reopen_recovers_entries_hard_state_and_conf_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
    s.append(&entries(1..=3, 1)).unwrap();
    s.set_hard_state(&hard_state(1, 2, 2)).unwrap();
    s.sync().unwrap();
    s.append(&entries(4..=4, 2)).unwrap();
    s.set_hard_state(&hard_state(2, 0, 3)).unwrap();
    s.set_commit(4).unwrap();
    s.sync().unwrap();
    drop(s);

    let s = DiskStorage::open(dir.path(), &[]).unwrap();
    assert!(!s.is_fresh());
    assert_eq!(s.recovery_note(), None);
    let state = s.initial_state().unwrap();
    assert_eq!(state.hard_state, hard_state(2, 0, 4));
    assert_eq!(state.conf_state, voters(&[1, 2, 3]));
    let expected: Vec<Entry> = entries(1..=3, 1).into_iter().chain(entries(4..=4, 2)).collect();
    assert_eq!(all_entries(&s), expected);
}

#[test]
fn torn_tail_is_truncated_and_the_rest_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let s = filled(dir.path(), 3);
    drop(s);
    let log = dir.path().join(LOG_FILE);
    let clean_len = fs::metadata(&log).unwrap().len();

    // Half of a record that was being appended when the machine died.
    let mut record = Vec::new();
    let start = format::begin_record(&mut record, format::Kind::Entry);
    record.extend(entry(4, 1).write_to_bytes().unwrap());
    format::finish_record(&mut record, start).unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(&record[..record.len() / 2]).unwrap();
    drop(f);

    let mut s = DiskStorage::open(dir.path(), &[1]).unwrap();
    let note = s.recovery_note().unwrap();
    assert!(note.contains(&format!("{} bytes", record.len() / 2)), "{note}");
    assert_eq!(all_entries(&s), entries(1..=3, 1));
    assert_eq!(s.hard_state(), &hard_state(1, 1, 3));
    assert_eq!(fs::metadata(&log).unwrap().len(), clean_len);

    // Appends after recovery land after the valid prefix and survive the next open.
    s.append(&entries(4..=5, 1)).unwrap();
    s.sync().unwrap();
    drop(s);
    let s = DiskStorage::open(dir.path(), &[1]).unwrap();
    assert_eq!(s.recovery_note(), None);
    assert_eq!(all_entries(&s), entries(1..=5, 1));
}

#[test]
fn zero_filled_tail_is_torn() {
    let dir = tempfile::tempdir().unwrap();
    drop(filled(dir.path(), 3));
    let log = dir.path().join(LOG_FILE);
    let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(&[0; 4096]).unwrap();
    drop(f);
    let s = DiskStorage::open(dir.path(), &[1]).unwrap();
    assert!(s.recovery_note().is_some());
    assert_eq!(all_entries(&s), entries(1..=3, 1));
}

#[test]
fn damage_before_the_end_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    drop(filled(dir.path(), 3));
    let log = dir.path().join(LOG_FILE);
    let mut bytes = fs::read(&log).unwrap();
    // Flip a byte inside the first entry's payload; later records are intact.
    let target = bytes.windows(7).position(|w| w == b"entry 1").unwrap();
    bytes[target] ^= 0x20;
    fs::write(&log, &bytes).unwrap();
    match DiskStorage::open(dir.path(), &[1]) {
        Err(StorageError::Corrupt { path, offset, .. }) => {
            assert_eq!(path, log);
            assert!(offset > 0 && (offset as usize) < target);
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, got a storage"),
    }
}

#[test]
fn compact_then_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = filled(dir.path(), 100);
    let log = dir.path().join(LOG_FILE);
    let before = fs::metadata(&log).unwrap().len();

    s.compact(80, voters(&[1, 2]), b"state at 80".to_vec(), 10).unwrap();
    let check = |s: &DiskStorage| {
        assert_eq!((s.first_index(), s.last_index()), (71, 100));
        let (meta, data) = s.snapshot_data().unwrap();
        assert_eq!((meta.index, meta.term), (80, 1));
        assert_eq!(data, b"state at 80");
        assert_eq!(s.conf_state(), &voters(&[1, 2]));
        assert_eq!(all_entries(s), entries(71..=100, 1));
        assert_eq!(Storage::term(s, 70).unwrap(), 1);
        assert_eq!(store_err(Storage::term(s, 69).unwrap_err()), RaftStorageError::Compacted);
        assert_eq!(
            store_err(Storage::entries(s, 70, 80, None, ctx()).unwrap_err()),
            RaftStorageError::Compacted
        );
        assert_eq!(s.hard_state(), &hard_state(1, 1, 100));
    };
    check(&s);
    let after = fs::metadata(&log).unwrap().len();
    assert!(after * 2 < before, "log did not shrink: {before} -> {after}");
    drop(s);

    let mut s = DiskStorage::open(dir.path(), &[1]).unwrap();
    assert_eq!(s.recovery_note(), None);
    check(&s);

    // A compaction at or below the current snapshot changes nothing.
    s.compact(80, voters(&[7]), b"other".to_vec(), 0).unwrap();
    s.compact(50, voters(&[7]), b"other".to_vec(), 0).unwrap();
    check(&s);
    // Only committed entries may be compacted.
    s.append(&entries(101..=101, 1)).unwrap();
    assert!(matches!(
        s.compact(101, voters(&[1]), Vec::new(), 0),
        Err(StorageError::CompactUncommitted { index: 101, .. })
    ));
}

#[test]
fn compact_without_tail_makes_the_snapshot_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = DiskStorage::open(dir.path(), &[1]).unwrap();
    s.append(&entries(1..=5, 1)).unwrap();
    s.append(&entries(6..=10, 2)).unwrap();
    s.set_hard_state(&hard_state(2, 1, 10)).unwrap();
    s.sync().unwrap();
    s.compact(8, voters(&[1]), b"s".to_vec(), 0).unwrap();
    assert_eq!(s.first_index(), 9);
    assert_eq!(Storage::term(&s, 8).unwrap(), 2);
    assert_eq!(store_err(Storage::term(&s, 7).unwrap_err()), RaftStorageError::Compacted);
    // A tail longer than the log keeps everything.
    s.compact(10, voters(&[1]), b"s".to_vec(), 1000).unwrap();
    assert_eq!(s.first_index(), 9);
}

#[test]
fn snapshot_request_index_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = filled(dir.path(), 10);
    assert_eq!(
        store_err(Storage::snapshot(&s, 1, 2).unwrap_err()),
        RaftStorageError::SnapshotTemporarilyUnavailable
    );
    s.compact(8, voters(&[1]), b"eight".to_vec(), 2).unwrap();
    for request in [0, 8] {
        let snap = Storage::snapshot(&s, request, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 8);
        assert_eq!(&snap.data[..], b"eight");
        assert_eq!(snap.get_metadata().get_conf_state(), &voters(&[1]));
    }
    assert_eq!(
        store_err(Storage::snapshot(&s, 9, 2).unwrap_err()),
        RaftStorageError::SnapshotTemporarilyUnavailable
    );
}

#[test]
fn entries_respects_max_size() {
    let dir = tempfile::tempdir().unwrap();
    let s = filled(dir.path(), 10);
    let one = u64::from(entry(1, 1).compute_size());
    let two_and_a_bit = one * 2 + one / 2;
    assert_eq!(Storage::entries(&s, 1, 11, two_and_a_bit, ctx()).unwrap(), entries(1..=2, 1));
    // At least one entry even when it alone exceeds the limit.
    assert_eq!(Storage::entries(&s, 1, 11, 0, ctx()).unwrap(), entries(1..=1, 1));
    assert_eq!(Storage::entries(&s, 1, 11, raft::NO_LIMIT, ctx()).unwrap().len(), 10);
}

fn leader_snapshot(index: u64, term: u64, data: &[u8]) -> Snapshot {
    let mut snap = Snapshot { data: data.to_vec().into(), ..Default::default() };
    let meta = snap.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(voters(&[1, 2, 3]));
    snap
}

#[test]
fn apply_snapshot_then_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
    s.append(&entries(1..=5, 1)).unwrap();
    s.set_hard_state(&hard_state(2, 3, 3)).unwrap();
    s.sync().unwrap();
    s.apply_snapshot(leader_snapshot(20, 3, b"leader state")).unwrap();
    let check = |s: &DiskStorage| {
        assert_eq!((s.first_index(), s.last_index()), (21, 20));
        assert_eq!(Storage::term(s, 20).unwrap(), 3);
        assert_eq!(s.hard_state(), &hard_state(3, 3, 20));
        assert_eq!(s.snapshot_data().unwrap().1, b"leader state");
    };
    check(&s);
    drop(s);

    let mut s = DiskStorage::open(dir.path(), &[]).unwrap();
    check(&s);
    s.append(&entries(21..=22, 3)).unwrap();
    s.sync().unwrap();
    assert!(matches!(
        s.apply_snapshot(leader_snapshot(10, 3, b"old")),
        Err(StorageError::SnapshotOutOfDate { index: 10, current: 20 })
    ));
    drop(s);
    let s = DiskStorage::open(dir.path(), &[]).unwrap();
    assert_eq!(all_entries(&s), entries(21..=22, 3));
}

#[test]
fn crash_between_snapshot_and_log_rewrite_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = filled(dir.path(), 5);
    drop(s);
    // apply_snapshot writes the snapshot file first; simulate dying right after.
    write_snapshot_file(&dir.path().join(SNAPSHOT_FILE), dir.path(), &leader_snapshot(20, 3, b"x"))
        .unwrap();
    let mut s = DiskStorage::open(dir.path(), &[]).unwrap();
    assert!(s.recovery_note().is_some());
    assert_eq!((s.first_index(), s.last_index()), (21, 20));
    assert_eq!(s.hard_state().commit, 20);
    // The rewritten log accepts the entries that follow the snapshot.
    s.append(&entries(21..=21, 3)).unwrap();
    s.sync().unwrap();
    drop(s);
    let s = DiskStorage::open(dir.path(), &[]).unwrap();
    assert_eq!(s.recovery_note(), None);
    assert_eq!(all_entries(&s), entries(21..=21, 3));
}

#[test]
fn missing_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    drop(filled(dir.path(), 3));
    fs::remove_file(dir.path().join(SNAPSHOT_FILE)).unwrap();
    assert!(matches!(DiskStorage::open(dir.path(), &[1]), Err(StorageError::Inconsistent { .. })));
}

#[test]
fn errors_convert_to_raft_errors() {
    let e: raft::Error = StorageError::Poisoned.into();
    assert!(matches!(e, raft::Error::Store(RaftStorageError::Other(_))));
}

/// Drives `node` until it has nothing more to do, following the raft-rs Ready order, and
/// returns the data of the normal entries applied.
fn run_ready_loop(node: &mut RawNode<DiskStorage>) -> Vec<Vec<u8>> {
    let mut applied = Vec::new();
    let mut apply = |entries: Vec<Entry>| {
        applied.extend(entries.into_iter().filter(|e| !e.data.is_empty()).map(|e| e.data.to_vec()));
    };
    while node.has_ready() {
        let mut rd = node.ready();
        assert!(rd.messages().is_empty(), "single node sends nothing");
        if !rd.snapshot().is_empty() {
            node.mut_store().apply_snapshot(rd.snapshot().clone()).unwrap();
        }
        apply(rd.take_committed_entries());
        let store = node.mut_store();
        store.append(rd.entries()).unwrap();
        if let Some(hs) = rd.hs() {
            store.set_hard_state(hs).unwrap();
        }
        store.sync().unwrap();
        assert!(rd.persisted_messages().is_empty());
        let mut light = node.advance(rd);
        if let Some(commit) = light.commit_index() {
            node.mut_store().set_commit(commit).unwrap();
        }
        apply(light.take_committed_entries());
        node.advance_apply();
    }
    applied
}

fn new_node(store: DiskStorage) -> RawNode<DiskStorage> {
    let config = raft::Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 3,
        applied: store.snapshot_metadata().index,
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    RawNode::new(&config, store, &logger).unwrap()
}

#[test]
fn raw_node_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = new_node(DiskStorage::open(dir.path(), &[1]).unwrap());
    node.campaign().unwrap();
    run_ready_loop(&mut node);
    assert_eq!(node.raft.state, raft::StateRole::Leader);
    let mut applied = Vec::new();
    for i in 0..5 {
        node.propose(vec![], format!("cmd {i}").into_bytes()).unwrap();
        applied.extend(run_ready_loop(&mut node));
    }
    assert_eq!(applied.len(), 5);
    // Snapshot the "state machine" after cmd 2, keeping a one-entry tail.
    let cmd2 =
        all_entries(node.store()).into_iter().find(|e| &e.data[..] == b"cmd 2").unwrap().index;
    let conf = node.raft.prs().conf().to_conf_state();
    node.mut_store().compact(cmd2, conf, b"cmd 0..=2".to_vec(), 1).unwrap();
    let committed = node.store().hard_state().commit;
    drop(node);

    let store = DiskStorage::open(dir.path(), &[1]).unwrap();
    assert_eq!(store.hard_state().commit, committed);
    assert_eq!(store.snapshot_data().unwrap().1, b"cmd 0..=2");
    let mut node = new_node(store);
    // The restarted member re-applies only what the snapshot does not cover.
    let replayed = run_ready_loop(&mut node);
    assert_eq!(replayed, vec![b"cmd 3".to_vec(), b"cmd 4".to_vec()]);
    node.campaign().unwrap();
    run_ready_loop(&mut node);
    node.propose(vec![], b"after restart".to_vec()).unwrap();
    assert_eq!(run_ready_loop(&mut node), vec![b"after restart".to_vec()]);
}

#[test]
fn batched_appends_are_fast_enough() {
    // One fsync per 100-entry batch; a regression to per-entry fsync or whole-log
    // rewrites would show up as a much slower run.
    let dir = tempfile::tempdir().unwrap();
    let mut s = DiskStorage::open(dir.path(), &[1]).unwrap();
    let started = std::time::Instant::now();
    for batch in 0..50u64 {
        let first = batch * 100 + 1;
        s.append(&entries(first..=first + 99, 1)).unwrap();
        s.set_hard_state(&hard_state(1, 1, first + 99)).unwrap();
        s.sync().unwrap();
    }
    let elapsed = started.elapsed();
    assert_eq!(s.last_index(), 5000);
    drop(s);
    let s = DiskStorage::open(dir.path(), &[1]).unwrap();
    assert_eq!(s.last_index(), 5000);
    assert!(elapsed < std::time::Duration::from_secs(10), "5000 entries took {elapsed:?}");
}
