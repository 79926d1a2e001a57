//! Hand-made packets for the tests that play an attacker on the underlay: an Ethernet
//! frame carrying IPv4/UDP, and the same wrapped as a VXLAN payload. Only ever sent to
//! addresses inside the lab's namespaces.

use std::net::Ipv4Addr;

/// The source MAC of every crafted frame (locally administered, never assigned).
pub const FORGED_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];

/// The IPv4 header checksum of `header`.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame from [`FORGED_MAC`] to `dst_mac` carrying IPv4/UDP
/// `src_ip:4444 -> dst_ip:dst_port` with `payload` (UDP checksum 0, which IPv4 allows).
pub fn udp_frame(
    dst_mac: [u8; 6],
    dst_ip: Ipv4Addr,
    src_ip: Ipv4Addr,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&FORGED_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src_ip.octets());
    ip.extend_from_slice(&dst_ip.octets());
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4444u16.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A VXLAN payload (RFC 7348: flags with the I bit, 24-bit VNI) around `frame`: what a
/// UDP datagram to port 4789 carries.
pub fn vxlan(vni: u32, frame: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut d = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    d.extend_from_slice(frame);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_well_formed() {
        let f = udp_frame(
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 9),
            9999,
            b"hi",
        );
        assert_eq!(f.len(), 14 + 20 + 8 + 2);
        // A correct header sums (with its checksum) to 0xffff, i.e. checksums to 0.
        assert_eq!(ipv4_checksum(&f[14..34]), 0);
        assert_eq!(&f[36..38], &9999u16.to_be_bytes());
        let v = vxlan(0x00_12_34_56, &f);
        assert_eq!(&v[..8], &[0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        assert_eq!(&v[8..], &f[..]);
    }
}
