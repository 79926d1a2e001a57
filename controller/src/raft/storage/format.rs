//! Byte layout of the two storage files, kept apart from the raft logic so the framing
//! rules (and what counts as a torn tail versus real corruption) can be read and tested
//! in one place. See the parent module for the file-level description.

use std::io::{self, Write};

/// First bytes of `log`. The last byte is the format version.
pub(super) const LOG_MAGIC: &[u8; 8] = b"OVRLOG\0\x01";
/// First bytes of `snapshot`. The last byte is the format version.
pub(super) const SNAP_MAGIC: &[u8; 8] = b"OVRSNP\0\x01";

/// `[u32 body_len][u32 crc32(body)]`, little endian.
const RECORD_HEADER: usize = 8;
/// `[u32 meta_len][u64 data_len]` after the snapshot magic.
const SNAP_HEADER: usize = 12;
const SNAP_TRAILER: usize = 4;

/// What a log record holds; the first byte of its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Kind {
    /// `[u64 index][u64 term]` of the entry just before the first one in the file.
    Base = 1,
    /// A protobuf `Entry`.
    Entry = 2,
    /// A protobuf `HardState`.
    HardState = 3,
}

impl Kind {
    pub(super) fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Base),
            2 => Some(Kind::Entry),
            3 => Some(Kind::HardState),
            _ => None,
        }
    }
}

/// Starts a record at the end of `out`: reserves the header and writes the kind byte.
/// The caller appends the payload, then calls [`finish_record`] with the returned start.
pub(super) fn begin_record(out: &mut Vec<u8>, kind: Kind) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER]);
    out.push(kind as u8);
    start
}

/// Fills in the header of the record begun at `start`. Fails only if the body does not
/// fit the u32 length field.
pub(super) fn finish_record(out: &mut [u8], start: usize) -> Result<(), usize> {
    let body = &out[start + RECORD_HEADER..];
    let len = u32::try_from(body.len()).map_err(|_| body.len())?;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

pub(super) fn encode_base(out: &mut Vec<u8>, index: u64, term: u64) {
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
}

pub(super) fn decode_base(payload: &[u8]) -> Option<(u64, u64)> {
    let index = payload.get(0..8)?.try_into().ok()?;
    let term = payload.get(8..16)?.try_into().ok()?;
    (payload.len() == 16).then(|| (u64::from_le_bytes(index), u64::from_le_bytes(term)))
}

/// Where in a snapshot file a defect was found, and what it is.
pub(super) type SnapshotDefect = (u64, &'static str);

/// Outcome of reading the record that starts at some offset of the log.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Scan<'a> {
    /// A well-framed record with a valid checksum; the next one starts at `next`.
    Record { kind: u8, payload: &'a [u8], next: usize },
    /// Clean end of file.
    End,
    /// The rest of the file is an unfinished write: a crash hit before it was synced.
    Torn,
    /// A damaged record with more data after it: not explainable by a crash.
    Corrupt(&'static str),
}

/// Reads the record at `pos`. The torn-versus-corrupt rule: a crash mid-write can leave
/// a short header, a body cut off by end of file, a last record whose checksum fails, or
/// zeros the filesystem allocated but never filled. Any of those means "drop from here".
/// A bad record followed by more non-zero bytes cannot come from an interrupted append,
/// so it is reported as corruption rather than silently discarding what follows.
pub(super) fn next_record(buf: &[u8], pos: usize) -> Scan<'_> {
    let Some(rest) = buf.get(pos..) else {
        return Scan::Torn;
    };
    if rest.is_empty() {
        return Scan::End;
    }
    let all_zero = || rest.iter().all(|&b| b == 0);
    let (Some(len), Some(crc)) = (read_u32(rest, 0), read_u32(rest, 4)) else {
        return Scan::Torn;
    };
    if len == 0 {
        // A body always holds at least the kind byte; zero length is unwritten space.
        return if all_zero() { Scan::Torn } else { Scan::Corrupt("record with zero length") };
    }
    let end = match RECORD_HEADER.checked_add(len as usize) {
        Some(end) if end <= rest.len() => end,
        _ => return Scan::Torn,
    };
    let body = &rest[RECORD_HEADER..end];
    if crc32fast::hash(body) != crc {
        return if end == rest.len() || all_zero() {
            Scan::Torn
        } else {
            Scan::Corrupt("record checksum mismatch")
        };
    }
    Scan::Record { kind: body[0], payload: &body[1..], next: pos + end }
}

/// Writes a complete snapshot file body: magic, lengths, metadata, data, checksum.
/// The checksum is streamed so the (possibly large) data is not copied.
pub(super) fn write_snapshot(w: &mut impl Write, meta: &[u8], data: &[u8]) -> io::Result<()> {
    let meta_len = u32::try_from(meta.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "snapshot metadata too large"))?;
    let mut header = [0u8; SNAP_HEADER];
    header[..4].copy_from_slice(&meta_len.to_le_bytes());
    header[4..].copy_from_slice(&(data.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(meta);
    crc.update(data);
    w.write_all(SNAP_MAGIC)?;
    w.write_all(&header)?;
    w.write_all(meta)?;
    w.write_all(data)?;
    w.write_all(&crc.finalize().to_le_bytes())
}

/// Splits a snapshot file into (metadata bytes, data bytes). The file is replaced by
/// rename, never appended to, so any defect is corruption: the error is (offset, reason).
pub(super) fn decode_snapshot(buf: &[u8]) -> Result<(&[u8], &[u8]), SnapshotDefect> {
    if buf.get(..SNAP_MAGIC.len()) != Some(&SNAP_MAGIC[..]) {
        return Err((0, "not an overlay raft snapshot (bad magic or version)"));
    }
    let body = &buf[SNAP_MAGIC.len()..];
    let (Some(meta_len), Some(data_len)) = (read_u32(body, 0), read_u64(body, 4)) else {
        return Err((SNAP_MAGIC.len() as u64, "truncated snapshot header"));
    };
    let expected = (SNAP_HEADER as u64)
        .checked_add(u64::from(meta_len))
        .and_then(|n| n.checked_add(data_len))
        .and_then(|n| n.checked_add(SNAP_TRAILER as u64));
    if expected != Some(body.len() as u64) {
        return Err((SNAP_MAGIC.len() as u64, "snapshot length does not match its header"));
    }
    let (covered, trailer) = body.split_at(body.len() - SNAP_TRAILER);
    if read_u32(trailer, 0) != Some(crc32fast::hash(covered)) {
        return Err((buf.len() as u64 - SNAP_TRAILER as u64, "snapshot checksum mismatch"));
    }
    let (meta, data) = covered[SNAP_HEADER..].split_at(meta_len as usize);
    Ok((meta, data))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let start = begin_record(&mut out, kind);
        out.extend_from_slice(payload);
        assert_eq!(finish_record(&mut out, start), Ok(()));
        out
    }

    #[test]
    fn record_round_trip_and_end() {
        let mut buf = record(Kind::Entry, b"abc");
        let second = buf.len();
        buf.extend(record(Kind::HardState, b""));
        assert_eq!(
            next_record(&buf, 0),
            Scan::Record { kind: Kind::Entry as u8, payload: b"abc", next: second }
        );
        assert_eq!(
            next_record(&buf, second),
            Scan::Record { kind: Kind::HardState as u8, payload: b"", next: buf.len() }
        );
        assert_eq!(next_record(&buf, buf.len()), Scan::End);
    }

    #[test]
    fn torn_shapes_are_torn() {
        let full = record(Kind::Entry, b"payload");
        // Every strict prefix of a record is an interrupted write.
        for cut in 1..full.len() {
            assert_eq!(next_record(&full[..cut], 0), Scan::Torn, "cut at {cut}");
        }
        // Last record with a damaged body.
        let mut bad = full.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert_eq!(next_record(&bad, 0), Scan::Torn);
        // Allocated but unwritten space.
        assert_eq!(next_record(&[0u8; 64], 0), Scan::Torn);
    }

    #[test]
    fn damage_before_more_data_is_corrupt() {
        let mut buf = record(Kind::Entry, b"payload");
        buf.extend(record(Kind::Entry, b"more"));
        buf[RECORD_HEADER + 2] ^= 0xff;
        assert_eq!(next_record(&buf, 0), Scan::Corrupt("record checksum mismatch"));
    }

    #[test]
    fn snapshot_round_trip_and_damage() {
        let mut file = Vec::new();
        assert!(write_snapshot(&mut file, b"meta", b"data!").is_ok());
        assert_eq!(decode_snapshot(&file), Ok((&b"meta"[..], &b"data!"[..])));
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            assert!(decode_snapshot(&bad).is_err(), "flip at {i} not detected");
        }
        assert!(decode_snapshot(&file[..file.len() - 1]).is_err());
    }

    #[test]
    fn base_round_trip() {
        let mut out = Vec::new();
        encode_base(&mut out, 7, 3);
        assert_eq!(decode_base(&out), Some((7, 3)));
        assert_eq!(decode_base(&out[..15]), None);
    }
}
