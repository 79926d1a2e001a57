//! The 8-byte overlay header in front of every datagram (pure).
//!
//! ```text
//!  byte 0    1    2    3    4    5    6    7
//!  +----+---------+----+--------------+----+
//!  |flag|frame id |idx |     VNI      |cnt |
//!  +----+---------+----+--------------+----+
//! ```
//!
//! * `flag`: `0x08` (I, VNI present) is required; `0x01` (F) marks a fragment of a
//!   message that did not fit one datagram. No other bit may be set.
//! * without F the header is byte-for-byte a VXLAN header (bytes 1–3 and 7 zero on
//!   send, ignored on receipt), and the payload is one Ethernet frame;
//! * with F, bytes 1–2 are the sender's frame id (big endian), byte 3 the fragment
//!   index and byte 7 the fragment count (1–255, index < count).

use thiserror::Error;

/// Length of the header.
pub const HEADER_LEN: usize = 8;
/// Flag: the VNI field is valid (always set).
pub const FLAG_VNI: u8 = 0x08;
/// Flag: the datagram is a fragment.
pub const FLAG_FRAGMENT: u8 = 0x01;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00FF_FFFF;

/// Where one fragment belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frag {
    /// Sender-chosen id shared by all fragments of one message.
    pub id: u16,
    /// Position of this fragment, `0..count`.
    pub index: u8,
    /// Number of fragments of the message, at least 1.
    pub count: u8,
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Network identifier (24 bits).
    pub vni: u32,
    /// Set for fragments.
    pub frag: Option<Frag>,
}

/// Why a datagram's header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// Fewer than 8 bytes.
    #[error("datagram shorter than the 8-byte header")]
    Short,
    /// The I flag is missing.
    #[error("VNI flag not set")]
    NoVni,
    /// A flag bit this version does not know.
    #[error("unknown flag bits {0:#04x}")]
    UnknownFlags(u8),
    /// Fragment count 0 or index not below count.
    #[error("fragment {index} of {count} is out of range")]
    BadFragment {
        /// Fragment index as sent.
        index: u8,
        /// Fragment count as sent.
        count: u8,
    },
}

impl Header {
    /// A header for an unfragmented frame.
    pub fn plain(vni: u32) -> Header {
        Header { vni, frag: None }
    }

    /// The 8 bytes on the wire. The VNI is truncated to 24 bits.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let v = (self.vni & MAX_VNI).to_be_bytes();
        match self.frag {
            None => [FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0],
            Some(f) => {
                let id = f.id.to_be_bytes();
                [FLAG_VNI | FLAG_FRAGMENT, id[0], id[1], f.index, v[1], v[2], v[3], f.count]
            }
        }
    }

    /// Splits a datagram into its header and payload.
    pub fn parse(datagram: &[u8]) -> Result<(Header, &[u8]), HeaderError> {
        let Some((h, payload)) = datagram.split_first_chunk::<HEADER_LEN>() else {
            return Err(HeaderError::Short);
        };
        let flags = h[0];
        if flags & FLAG_VNI == 0 {
            return Err(HeaderError::NoVni);
        }
        let unknown = flags & !(FLAG_VNI | FLAG_FRAGMENT);
        if unknown != 0 {
            return Err(HeaderError::UnknownFlags(unknown));
        }
        let vni = u32::from_be_bytes([0, h[4], h[5], h[6]]);
        let frag = if flags & FLAG_FRAGMENT != 0 {
            let (index, count) = (h[3], h[7]);
            if count == 0 || index >= count {
                return Err(HeaderError::BadFragment { index, count });
            }
            Some(Frag { id: u16::from_be_bytes([h[1], h[2]]), index, count })
        } else {
            None
        };
        Ok((Header { vni, frag }, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_header_is_vxlan() {
        assert_eq!(Header::plain(0x123456).encode(), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
    }

    #[test]
    fn fragment_layout() {
        let h = Header { vni: 7, frag: Some(Frag { id: 0xABCD, index: 3, count: 9 }) };
        assert_eq!(h.encode(), [0x09, 0xAB, 0xCD, 3, 0, 0, 7, 9]);
    }

    #[test]
    fn refusals() {
        assert_eq!(Header::parse(&[8, 0, 0]), Err(HeaderError::Short));
        assert_eq!(Header::parse(&[0; 8]), Err(HeaderError::NoVni));
        assert_eq!(
            Header::parse(&[0x48, 0, 0, 0, 0, 0, 1, 0]),
            Err(HeaderError::UnknownFlags(0x40))
        );
        assert_eq!(
            Header::parse(&[0x09, 0, 0, 2, 0, 0, 1, 2]),
            Err(HeaderError::BadFragment { index: 2, count: 2 })
        );
        assert_eq!(
            Header::parse(&[0x09, 0, 0, 0, 0, 0, 1, 0]),
            Err(HeaderError::BadFragment { index: 0, count: 0 })
        );
    }

    #[test]
    fn plain_ignores_reserved_bytes() {
        let (h, rest) = Header::parse(&[0x08, 1, 2, 3, 0, 0, 5, 4, 0xEE]).expect("valid");
        assert_eq!(h, Header::plain(5));
        assert_eq!(rest, &[0xEE]);
    }

    proptest! {
        #[test]
        fn roundtrip(vni in 0..=MAX_VNI, frag in proptest::option::of((any::<u16>(), 1u8..=255, any::<u8>())), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            let frag = frag.map(|(id, count, i)| Frag { id, count, index: i % count });
            let h = Header { vni, frag };
            let mut d = h.encode().to_vec();
            d.extend_from_slice(&tail);
            let (back, rest) = Header::parse(&d).expect("encoded header parses");
            prop_assert_eq!(back, h);
            prop_assert_eq!(rest, &tail[..]);
        }

        #[test]
        fn parse_never_panics(d in proptest::collection::vec(any::<u8>(), 0..24)) {
            if let Ok((h, rest)) = Header::parse(&d) {
                prop_assert!(h.vni <= MAX_VNI);
                prop_assert_eq!(rest.len(), d.len() - HEADER_LEN);
            }
        }
    }
}
