//! Cutting a message that does not fit one datagram into fragments (pure).
//!
//! A message is the 10-byte vnet header followed by the frame. It is cut into `count`
//! chunks of exactly `chunk` bytes, the last one shorter or equal; each goes out as one
//! datagram `header ++ chunk`. Equal sizes let the receiver place a chunk at
//! `index * chunk` and let the sender hand a run of them to the kernel in one
//! `sendmsg` with `UDP_SEGMENT` (segment size `HEADER_LEN + chunk`).

use std::ops::Range;

use thiserror::Error;

use crate::header::HEADER_LEN;

/// Most fragments one message may have (the count is one byte).
pub const MAX_FRAGMENTS: usize = 255;

/// Why a message cannot be fragmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FragError {
    /// The datagram size leaves no room after the header.
    #[error("datagrams of {0} bytes leave no room for payload")]
    DatagramTooSmall(usize),
    /// More than [`MAX_FRAGMENTS`] would be needed.
    #[error("a {len}-byte message needs more than {MAX_FRAGMENTS} fragments of {chunk} bytes")]
    TooManyFragments {
        /// Message length.
        len: usize,
        /// Chunk size.
        chunk: usize,
    },
    /// Nothing to send.
    #[error("empty message")]
    Empty,
}

/// How one message is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Payload bytes in every fragment but the last.
    pub chunk: usize,
    /// Number of fragments, 1..=255.
    pub count: usize,
    /// Message length.
    pub len: usize,
}

impl Chunking {
    /// Plans a `len`-byte message for datagrams of at most `max_datagram` bytes.
    pub fn plan(len: usize, max_datagram: usize) -> Result<Chunking, FragError> {
        let chunk = max_datagram.saturating_sub(HEADER_LEN);
        if chunk == 0 {
            return Err(FragError::DatagramTooSmall(max_datagram));
        }
        if len == 0 {
            return Err(FragError::Empty);
        }
        let count = len.div_ceil(chunk);
        if count > MAX_FRAGMENTS {
            return Err(FragError::TooManyFragments { len, chunk });
        }
        Ok(Chunking { chunk, count, len })
    }

    /// Byte range of fragment `i` within the message.
    pub fn range(&self, i: usize) -> Range<usize> {
        let start = (i * self.chunk).min(self.len);
        start..(start + self.chunk).min(self.len)
    }

    /// Runs of fragments that fit one `UDP_SEGMENT` send: at most `max_segments`
    /// datagrams and at most `max_total` payload bytes (headers included) each.
    pub fn groups(&self, max_segments: usize, max_total: usize) -> Groups {
        let per = (max_total / (HEADER_LEN + self.chunk)).min(max_segments).max(1);
        Groups { next: 0, count: self.count, per }
    }
}

/// Iterator over the fragment index ranges of [`Chunking::groups`].
#[derive(Debug, Clone)]
pub struct Groups {
    next: usize,
    count: usize,
    per: usize,
}

impl Iterator for Groups {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        if self.next >= self.count {
            return None;
        }
        let start = self.next;
        self.next = (start + self.per).min(self.count);
        Some(start..self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn full_super_frame_on_1500_underlay() {
        // 10 vnet + 65550-byte frame, 1472-byte datagrams.
        let c = Chunking::plan(65560, 1472).expect("fits");
        assert_eq!((c.chunk, c.count), (1464, 45));
        let g: Vec<_> = c.groups(64, 65507).collect();
        assert_eq!(g, vec![0..44, 44..45]);
        assert_eq!(c.range(44), 64416..65560);
    }

    #[test]
    fn refusals() {
        assert_eq!(Chunking::plan(10, 8), Err(FragError::DatagramTooSmall(8)));
        assert_eq!(Chunking::plan(0, 100), Err(FragError::Empty));
        assert_eq!(Chunking::plan(256, 9), Err(FragError::TooManyFragments { len: 256, chunk: 1 }));
        assert_eq!(Chunking::plan(255, 9).map(|c| c.count), Ok(255));
    }

    proptest! {
        #[test]
        fn ranges_tile_the_message(len in 1usize..70000, max in 9usize..9000, segs in 1usize..70, total in 1usize..70000) {
            let Ok(c) = Chunking::plan(len, max) else { return Ok(()) };
            let mut at = 0;
            for i in 0..c.count {
                let r = c.range(i);
                prop_assert_eq!(r.start, at);
                prop_assert!(!r.is_empty());
                if i + 1 < c.count { prop_assert_eq!(r.len(), c.chunk) } else { prop_assert!(r.len() <= c.chunk) }
                at = r.end;
            }
            prop_assert_eq!(at, len);
            let mut next = 0;
            for g in c.groups(segs, total) {
                prop_assert_eq!(g.start, next);
                prop_assert!(!g.is_empty() && g.len() <= segs);
                prop_assert!(g.len() == 1 || g.len() * (HEADER_LEN + c.chunk) <= total);
                next = g.end;
            }
            prop_assert_eq!(next, c.count);
        }
    }
}
