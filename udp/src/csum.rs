//! Finishing a transport checksum the kernel left for the device (pure).
//!
//! A frame read from the TAP with `F_NEEDS_CSUM` carries, at `start + offset`, the
//! (uncomplemented) pseudo-header sum; the Internet checksum over `start..` is to be
//! computed and stored there, as the kernel's `skb_checksum_help` does. Plain frames
//! cross the overlay without their vnet header, so the sender finishes the checksum.

use thiserror::Error;

/// Why a checksum could not be finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("checksum field at {start}+{offset} lies outside a {len}-byte frame")]
pub struct CsumError {
    /// `csum_start` as given.
    pub start: usize,
    /// `csum_offset` as given.
    pub offset: usize,
    /// Frame length.
    pub len: usize,
}

/// Computes the checksum over `frame[start..]` and stores it at `start + offset`
/// (0 is sent as 0xFFFF, as the kernel does).
pub fn finish(frame: &mut [u8], start: usize, offset: usize) -> Result<(), CsumError> {
    let at = start.checked_add(offset).filter(|at| at.saturating_add(2) <= frame.len());
    let Some(at) = at else {
        return Err(CsumError { start, offset, len: frame.len() });
    };
    let sum = !fold(sum_ne(&frame[start..]));
    let sum = if sum == 0 { 0xFFFF } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_ne_bytes());
    Ok(())
}

/// Ones'-complement sum of `data` taken as native-endian 16-bit words (an odd last
/// byte padded with zero), in 64-bit steps, not yet folded.
fn sum_ne(data: &[u8]) -> u64 {
    let mut acc: u64 = 0;
    let add = |acc: u64, w: u64| {
        let (s, carry) = acc.overflowing_add(w);
        s + u64::from(carry)
    };
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        acc = add(acc, u64::from_ne_bytes(b));
    }
    let rest = words.remainder();
    let mut b = [0u8; 8];
    b[..rest.len()].copy_from_slice(rest);
    add(acc, u64::from_ne_bytes(b))
}

/// Folds a 64-bit ones'-complement sum to 16 bits (end-around carries).
fn fold(mut s: u64) -> u16 {
    while s > 0xFFFF {
        s = (s & 0xFFFF) + (s >> 16);
    }
    s as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 word by word, big endian.
    fn reference(frame: &mut [u8], start: usize, offset: usize) {
        let mut s: u32 = 0;
        for pair in frame[start..].chunks(2) {
            let w = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            s += u32::from(w);
            s = (s & 0xFFFF) + (s >> 16);
        }
        let c = !(s as u16);
        let c = if c == 0 { 0xFFFF } else { c };
        frame[start + offset..start + offset + 2].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn known_ipv4_header() {
        // RFC 1071 example-like IPv4 header with a zeroed checksum field at 10.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        finish(&mut h, 0, 10).expect("in range");
        assert_eq!(&h[10..12], &[0xb8, 0x61]);
    }

    #[test]
    fn out_of_range() {
        let mut f = [0u8; 10];
        assert!(finish(&mut f, 4, 5).is_err());
        assert!(finish(&mut f, usize::MAX, 1).is_err());
        assert!(finish(&mut f, 4, 4).is_ok());
    }

    proptest! {
        #[test]
        fn matches_reference(data in proptest::collection::vec(any::<u8>(), 2..3000), start in 0usize..64, offset in 0usize..64) {
            let start = start.min(data.len() - 2);
            let offset = offset.min(data.len() - 2 - start);
            let mut a = data.clone();
            let mut b = data;
            finish(&mut a, start, offset).expect("in range");
            reference(&mut b, start, offset);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn verifies_to_zero(mut data in proptest::collection::vec(any::<u8>(), 2..600), offset in 0usize..300) {
            let offset = (offset.min(data.len() - 2)) & !1;
            data[offset] = 0;
            data[offset + 1] = 0;
            finish(&mut data, 0, offset).expect("in range");
            // A correct checksum makes the whole sum 0xFFFF (negative zero).
            prop_assert_eq!(fold(sum_ne(&data)), 0xFFFF);
        }
    }
}
