//! The 10-byte `virtio_net_hdr` a TAP device with `IFF_VNET_HDR` puts in front of every
//! frame (pure). It says whether the frame is a GSO super-frame (and how the kernel is
//! to segment it) and whether its transport checksum is still to be finished.
//!
//! The TAP writes it in the host's byte order (legacy virtio), which is little endian
//! on every host this crate targets; it travels on the wire as the TAP produced it.

/// Length of the header.
pub const VNET_HDR_LEN: usize = 10;
/// `flags`: the checksum over `csum_start..` must still be computed and stored at
/// `csum_start + csum_offset`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a GSO frame.
pub const GSO_NONE: u8 = 0;
/// `gso_type` bit: the TCP stream uses ECN (combined with a type).
pub const GSO_ECN: u8 = 0x80;
/// A header meaning "plain frame, checksum complete".
pub const ZERO: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// A decoded `virtio_net_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` and friends.
    pub flags: u8,
    /// `GSO_NONE`, TCPv4 (1), UDP (3), TCPv6 (4), UDP_L4 (5), maybe `| GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers to copy into every segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts, from the start of the frame.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Decodes the first [`VNET_HDR_LEN`] bytes; `None` if there are fewer.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.first_chunk()?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in
            [self.hdr_len, self.gso_size, self.csum_start, self.csum_offset].into_iter().enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// True for a GSO super-frame (the kernel segments it on its way out).
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }

    /// True when the transport checksum is still to be finished.
    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 0x81,
            hdr_len: 66,
            gso_size: 1386,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(h.encode(), [1, 0x81, 66, 0, 0x6A, 0x05, 34, 0, 16, 0]);
        assert!(h.is_gso() && h.needs_csum());
        assert!(!VnetHdr { gso_type: GSO_ECN, ..h }.is_gso());
        assert_eq!(VnetHdr::parse(&[0; 9]), None);
    }

    proptest! {
        #[test]
        fn roundtrip(b in proptest::array::uniform10(any::<u8>())) {
            let h = VnetHdr::parse(&b).expect("10 bytes");
            prop_assert_eq!(h.encode(), b);
        }
    }
}
