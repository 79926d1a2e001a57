//! How the agent persists its replica of the desired state incrementally:
//! `desired.json` is a whole catalog (the format every earlier agent wrote), and
//! `desired.log` holds what happened since, one JSON line per batch of watch messages
//! (`{"revision":R,"changes":[...]}`, the changes as the replica applied them, garbage
//! collection included). A batch costs one append and one fsync, not a rewrite of the
//! whole catalog; when the log outgrows the catalog (or a snapshot replaced the
//! catalog) `desired.json` is rewritten and the log emptied.
//!
//! Replaying a line is idempotent (every change sets or removes one object), so a crash
//! between rewriting `desired.json` and emptying the log loses nothing. A torn last line
//! (a crash mid-append) is ignored; an unreadable line before it makes the whole cache
//! unreadable (the caller sets it aside and rebuilds from the controller).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use overlay_model::{Catalog, Change};
use serde::{Deserialize, Serialize};

/// The log is compacted once it is larger than this and than the catalog file.
const MIN_COMPACT_BYTES: u64 = 256 * 1024;

pub const CATALOG_FILE: &str = "desired.json";
pub const LOG_FILE: &str = "desired.log";

#[derive(Serialize, Deserialize)]
struct Line {
    revision: u64,
    changes: Vec<Change>,
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join(LOG_FILE)
}

/// Applies the log's lines to `catalog` (loaded from `desired.json`).
pub fn replay(dir: &Path, catalog: &mut Catalog) -> io::Result<()> {
    let text = match fs::read(log_path(dir)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    apply_lines(&text, catalog).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", log_path(dir).display()))
    })
}

/// The pure part of [`replay`].
fn apply_lines(text: &[u8], catalog: &mut Catalog) -> Result<(), String> {
    let mut lines = text.split(|b| *b == b'\n').peekable();
    let mut number = 0;
    while let Some(line) = lines.next() {
        number += 1;
        let last = lines.peek().is_none();
        if line.is_empty() {
            continue;
        }
        let parsed: Line = match serde_json::from_slice(line) {
            Ok(l) => l,
            // Cut short by a crash while appending: what it held was never published.
            Err(_) if last => return Ok(()),
            Err(e) => return Err(format!("line {number}: {e}")),
        };
        // Older than the catalog file: already in it (replaying would be harmless).
        if parsed.revision < catalog.revision {
            continue;
        }
        for c in &parsed.changes {
            catalog.apply_change(c);
        }
        catalog.revision = parsed.revision;
    }
    Ok(())
}

/// Appends one batch; returns the log's size afterwards.
pub fn append(dir: &Path, revision: u64, changes: &[Change]) -> io::Result<u64> {
    let mut line = serde_json::to_vec(&LineRef { revision, changes }).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut f = OpenOptions::new().create(true).append(true).open(log_path(dir))?;
    f.write_all(&line)?;
    f.sync_data()?;
    Ok(f.metadata()?.len())
}

#[derive(Serialize)]
struct LineRef<'a> {
    revision: u64,
    changes: &'a [Change],
}

/// Whether a log of `log_bytes` should be folded into the catalog file.
pub fn should_compact(dir: &Path, log_bytes: u64) -> bool {
    let catalog_bytes = fs::metadata(dir.join(CATALOG_FILE)).map(|m| m.len()).unwrap_or(0);
    log_bytes > MIN_COMPACT_BYTES && log_bytes > catalog_bytes
}

/// Empties the log (after the catalog file was rewritten).
pub fn clear(dir: &Path) -> io::Result<()> {
    match fs::remove_file(log_path(dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn line(revision: u64, changes: Vec<Change>) -> Vec<u8> {
        let mut v = serde_json::to_vec(&Line { revision, changes }).unwrap();
        v.push(b'\n');
        v
    }

    #[test]
    fn lines_replay_in_order_and_a_torn_tail_is_ignored() {
        let base = crate::desired::tests::catalog();
        let mut text = line(base.revision + 1, vec![Change::DeleteEndpoint("db".into())]);
        text.extend(line(base.revision + 2, vec![]));
        text.extend_from_slice(b"{\"revision\":99,\"chan");
        let mut c = base.clone();
        apply_lines(&text, &mut c).unwrap();
        assert_eq!(c.revision, base.revision + 2);
        assert!(!c.endpoints.contains_key("db"));
        // Replaying again changes nothing.
        let again = c.clone();
        apply_lines(&text, &mut c).unwrap();
        assert_eq!(c, again);
        // A bad line in the middle is corruption.
        let mut bad = b"nonsense\n".to_vec();
        bad.extend(line(base.revision + 1, vec![]));
        assert!(apply_lines(&bad, &mut base.clone()).unwrap_err().contains("line 1"));
    }
}
