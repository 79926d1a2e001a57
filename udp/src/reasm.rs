//! Reassembling fragmented messages (pure: time is passed in).
//!
//! A bounded table of slots, each with one preallocated message buffer (allocated on
//! first use, then reused: no allocation per packet). A slot is keyed by (source host,
//! VNI, frame id). All fragments but the last have the same size `seg`, so fragment
//! `i` lands at `i * seg`. A last fragment that arrives before `seg` is known waits at
//! the very end of the buffer and moves into place once it is. When every slot is busy
//! the oldest message is given up; so is one older than the timeout when its id comes
//! round again. Memory is `slots × MAX_MESSAGE`, whatever peers send.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::header::Frag;

/// Largest reassembled message: vnet header + a 64 KiB IP packet + Ethernet/VLAN
/// headers, with room to spare.
pub const MAX_MESSAGE: usize = 65536 + 1024;
/// Default number of messages in flight per table.
pub const DEFAULT_SLOTS: usize = 32;
/// Default time after which an incomplete message is given up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// Identifies one message in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Sending host.
    pub src: IpAddr,
    /// Network.
    pub vni: u32,
    /// The sender's frame id.
    pub id: u16,
}

/// What a fragment did.
#[derive(Debug, PartialEq, Eq)]
pub enum Push<'a> {
    /// Stored (or a duplicate); the message is not complete yet.
    Pending,
    /// The message is complete: here it is (valid until the next push).
    Complete(&'a [u8]),
    /// Inconsistent with the fragments seen before (sizes, count): the message was
    /// dropped.
    Malformed,
}

#[derive(Debug)]
struct Slot {
    key: Option<Key>,
    count: usize,
    /// Size of every fragment but the last; 0 until one was seen.
    seg: usize,
    /// Size of the last fragment; 0 until it was seen.
    tail_len: usize,
    have: [u64; 4],
    received: usize,
    started: Instant,
    buf: Vec<u8>,
}

impl Slot {
    fn new(now: Instant) -> Slot {
        Slot {
            key: None,
            count: 0,
            seg: 0,
            tail_len: 0,
            have: [0; 4],
            received: 0,
            started: now,
            buf: Vec::new(),
        }
    }

    fn reset(&mut self, key: Key, count: usize, now: Instant, cap: usize) {
        self.key = Some(key);
        self.count = count;
        self.seg = 0;
        self.tail_len = 0;
        self.have = [0; 4];
        self.received = 0;
        self.started = now;
        if self.buf.len() != cap {
            self.buf.resize(cap, 0);
        }
    }

    /// Stores one fragment; `Some(total)` once the message is complete.
    fn accept(&mut self, index: usize, payload: &[u8]) -> Result<Option<usize>, ()> {
        let (len, cap, count) = (payload.len(), self.buf.len(), self.count);
        if len == 0 || index >= count {
            return Err(());
        }
        let (word, bit) = (index / 64, 1u64 << (index % 64));
        if self.have[word] & bit != 0 {
            return Ok(None);
        }
        if index + 1 < count {
            if self.seg == 0 {
                let need = (count - 1).checked_mul(len).ok_or(())? + self.tail_len.max(1);
                if need > cap || self.tail_len > len {
                    return Err(());
                }
                self.seg = len;
                if self.tail_len > 0 {
                    let from = cap - self.tail_len;
                    self.buf.copy_within(from..cap, (count - 1) * len);
                }
            } else if len != self.seg {
                return Err(());
            }
            let at = index * self.seg;
            self.buf[at..at + len].copy_from_slice(payload);
        } else {
            let at = if self.seg == 0 {
                cap.checked_sub(len).ok_or(())?
            } else {
                if len > self.seg {
                    return Err(());
                }
                (count - 1) * self.seg
            };
            self.buf[at..at + len].copy_from_slice(payload);
            self.tail_len = len;
        }
        self.have[word] |= bit;
        self.received += 1;
        if self.received == count {
            let total = if count == 1 { len } else { (count - 1) * self.seg + self.tail_len };
            Ok(Some(total))
        } else {
            Ok(None)
        }
    }
}

/// A bounded reassembly table.
#[derive(Debug)]
pub struct Reassembler {
    slots: Vec<Slot>,
    timeout: Duration,
    cap: usize,
    last: usize,
    evicted: Option<u32>,
}

impl Reassembler {
    /// A table of `slots` messages of up to [`MAX_MESSAGE`] bytes.
    pub fn new(slots: usize, timeout: Duration) -> Reassembler {
        Self::with_capacity(slots, timeout, MAX_MESSAGE)
    }

    fn with_capacity(slots: usize, timeout: Duration, cap: usize) -> Reassembler {
        let now = Instant::now();
        Reassembler {
            slots: (0..slots.max(1)).map(|_| Slot::new(now)).collect(),
            timeout,
            cap,
            last: 0,
            evicted: None,
        }
    }

    /// The VNI of an incomplete message the last [`push`](Self::push) gave up, if any.
    pub fn take_evicted(&mut self) -> Option<u32> {
        self.evicted.take()
    }

    /// Adds one fragment.
    pub fn push<'a>(
        &'a mut self,
        now: Instant,
        key: Key,
        frag: Frag,
        payload: &'a [u8],
    ) -> Push<'a> {
        let count = usize::from(frag.count);
        if count == 1 {
            return Push::Complete(payload);
        }
        let i = match self.find(now, key) {
            Some(i) if self.slots[i].count == count => i,
            Some(i) => {
                self.slots[i].key = None;
                return Push::Malformed;
            }
            None => self.claim(now, key, count),
        };
        self.last = i;
        let slot = &mut self.slots[i];
        match slot.accept(usize::from(frag.index), payload) {
            Err(()) => {
                slot.key = None;
                Push::Malformed
            }
            Ok(None) => Push::Pending,
            Ok(Some(total)) => {
                slot.key = None;
                Push::Complete(&slot.buf[..total])
            }
        }
    }

    /// The slot holding `key`, unless it is stale (then it is given up).
    fn find(&mut self, now: Instant, key: Key) -> Option<usize> {
        let hit = |s: &Slot| s.key == Some(key);
        let i = if hit(&self.slots[self.last]) {
            self.last
        } else {
            self.slots.iter().position(hit)?
        };
        if now.saturating_duration_since(self.slots[i].started) > self.timeout {
            self.evicted = Some(key.vni);
            self.slots[i].key = None;
            return None;
        }
        Some(i)
    }

    /// A slot for a new message: a free one, else the oldest (given up).
    fn claim(&mut self, now: Instant, key: Key, count: usize) -> usize {
        let i = match self.slots.iter().position(|s| s.key.is_none()) {
            Some(i) => i,
            None => {
                let (i, old) = self
                    .slots
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.started)
                    .unwrap_or((0, &self.slots[0]));
                self.evicted = old.key.map(|k| k.vni);
                i
            }
        };
        self.slots[i].reset(key, count, now, self.cap);
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frag::Chunking;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn key(id: u16) -> Key {
        Key { src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), vni: 42, id }
    }

    fn frag(id: u16, index: usize, count: usize) -> Frag {
        Frag { id, index: index as u8, count: count as u8 }
    }

    /// Pushes all fragments of `msg` in `order`; returns the completed message.
    fn run(
        r: &mut Reassembler,
        id: u16,
        msg: &[u8],
        max: usize,
        order: &[usize],
    ) -> Option<Vec<u8>> {
        let c = Chunking::plan(msg.len(), max).expect("plannable");
        let now = Instant::now();
        let mut out = None;
        for &i in order {
            match r.push(now, key(id), frag(id, i, c.count), &msg[c.range(i)]) {
                Push::Complete(m) => out = Some(m.to_vec()),
                Push::Pending => {}
                Push::Malformed => panic!("malformed"),
            }
        }
        out
    }

    #[test]
    fn last_first_then_rest() {
        let msg: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut r = Reassembler::new(4, DEFAULT_TIMEOUT);
        // 1000-byte chunks: 5 fragments.
        assert_eq!(run(&mut r, 1, &msg, 1008, &[4, 2, 0, 1, 3]), Some(msg));
    }

    #[test]
    fn inconsistent_sizes_are_malformed() {
        let mut r = Reassembler::new(4, DEFAULT_TIMEOUT);
        let now = Instant::now();
        assert_eq!(r.push(now, key(1), frag(1, 0, 3), &[1; 100]), Push::Pending);
        assert_eq!(r.push(now, key(1), frag(1, 1, 3), &[1; 99]), Push::Malformed);
        // A last fragment longer than the others.
        assert_eq!(r.push(now, key(2), frag(2, 0, 3), &[1; 100]), Push::Pending);
        assert_eq!(r.push(now, key(2), frag(2, 2, 3), &[1; 101]), Push::Malformed);
        // Count changes under the same id.
        assert_eq!(r.push(now, key(3), frag(3, 0, 3), &[1; 100]), Push::Pending);
        assert_eq!(r.push(now, key(3), frag(3, 1, 4), &[1; 100]), Push::Malformed);
        // Too big for the buffer.
        let mut small = Reassembler::with_capacity(2, DEFAULT_TIMEOUT, 1000);
        assert_eq!(small.push(now, key(4), frag(4, 0, 3), &[1; 600]), Push::Malformed);
        assert_eq!(small.push(now, key(5), frag(5, 2, 3), &[1; 1001]), Push::Malformed);
        assert_eq!(small.push(now, key(6), frag(6, 2, 3), &[1; 500]), Push::Pending);
        assert_eq!(small.push(now, key(6), frag(6, 0, 3), &[1; 400]), Push::Malformed);
    }

    #[test]
    fn full_table_evicts_oldest_and_stale_ids_restart() {
        let mut r = Reassembler::new(2, Duration::from_millis(100));
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(1);
        assert_eq!(r.push(t0, key(1), frag(1, 0, 2), &[1; 10]), Push::Pending);
        assert_eq!(r.push(t1, key(2), frag(2, 0, 2), &[2; 10]), Push::Pending);
        assert_eq!(r.take_evicted(), None);
        assert_eq!(r.push(t1, key(3), frag(3, 0, 2), &[3; 10]), Push::Pending);
        assert_eq!(r.take_evicted(), Some(42));
        // id 2 survives and completes.
        assert_eq!(r.push(t1, key(2), frag(2, 1, 2), &[2; 3]), Push::Complete(&[2; 13][..]));
        // id 3 is stale 200 ms later: its fragment starts a new message.
        let late = t1 + Duration::from_millis(200);
        assert_eq!(r.push(late, key(3), frag(3, 1, 2), &[9; 3]), Push::Pending);
        assert_eq!(r.take_evicted(), Some(42));
        assert_eq!(
            r.push(late, key(3), frag(3, 0, 2), &[8; 4]),
            Push::Complete(&[8, 8, 8, 8, 9, 9, 9][..])
        );
    }

    #[test]
    fn single_fragment_passes_through() {
        let mut r = Reassembler::new(1, DEFAULT_TIMEOUT);
        let p = [7u8; 30];
        assert_eq!(r.push(Instant::now(), key(1), frag(1, 0, 1), &p), Push::Complete(&p[..]));
    }

    proptest! {
        #[test]
        fn any_order_with_duplicates(
            len in 1usize..MAX_MESSAGE - 2000,
            max in 200usize..9000,
            seed in any::<u64>(),
            dups in proptest::collection::vec(any::<u16>(), 0..5),
        ) {
            let msg: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(seed | 1).rotate_left(13) as u8).collect();
            let Ok(c) = Chunking::plan(len, max) else { return Ok(()) };
            let mut order: Vec<usize> = (0..c.count).collect();
            // Deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            // Duplicates before the last one.
            let last = order.pop().expect("at least one fragment");
            for d in dups { order.push(order.get(usize::from(d) % order.len().max(1)).copied().unwrap_or(last)); }
            order.push(last);
            let mut r = Reassembler::new(2, DEFAULT_TIMEOUT);
            prop_assert_eq!(run(&mut r, 7, &msg, max, &order), Some(msg));
        }

        #[test]
        fn garbage_never_panics(frags in proptest::collection::vec((any::<u8>(), 1u8..=255, 0u8..4, proptest::collection::vec(any::<u8>(), 0..3000)), 0..60)) {
            let mut r = Reassembler::with_capacity(3, DEFAULT_TIMEOUT, 8000);
            let now = Instant::now();
            for (i, count, id, payload) in frags {
                let f = Frag { id: u16::from(id), index: i % count, count };
                if let Push::Complete(m) = r.push(now, key(f.id), f, &payload) {
                    prop_assert!(m.len() <= 8000.max(payload.len()));
                }
            }
        }
    }
}
