//! Forwarding decisions of one network (pure): where a frame goes, and whether a
//! datagram's source may speak for the network.

use std::collections::HashMap;
use std::net::IpAddr;

/// The forwarding table of one network.
#[derive(Debug, Clone, Default)]
pub struct Fdb {
    macs: HashMap<[u8; 6], IpAddr>,
    peers: Vec<IpAddr>,
}

impl Fdb {
    /// A table from the hosts carrying the network (other than this one) and the
    /// host of every remote MAC.
    pub fn new(peers: &[IpAddr], remote_macs: &[([u8; 6], IpAddr)]) -> Fdb {
        let mut peers: Vec<IpAddr> = peers.iter().map(|p| p.to_canonical()).collect();
        peers.sort_unstable();
        peers.dedup();
        let macs = remote_macs.iter().map(|(m, ip)| (*m, ip.to_canonical())).collect();
        Fdb { macs, peers }
    }

    /// The hosts a frame for `dst` goes to: the MAC's host for a known unicast MAC,
    /// every peer for broadcast, multicast and unknown unicast.
    pub fn route(&self, dst: &[u8; 6]) -> &[IpAddr] {
        if dst[0] & 1 == 0 {
            if let Some(host) = self.macs.get(dst) {
                return std::slice::from_ref(host);
            }
        }
        &self.peers
    }

    /// True when `src` is a host carrying this network.
    pub fn is_peer(&self, src: IpAddr) -> bool {
        self.peers.binary_search(&src.to_canonical()).is_ok()
    }

    /// The hosts carrying this network.
    pub fn peers(&self) -> &[IpAddr] {
        &self.peers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn routes() {
        let known = [0x02, 0, 0, 0, 0, 1];
        let f = Fdb::new(&[ip(3), ip(2), ip(3)], &[(known, ip(2))]);
        assert_eq!(f.route(&known), &[ip(2)]);
        assert_eq!(f.route(&[0x02, 0, 0, 0, 0, 9]), &[ip(2), ip(3)]);
        assert_eq!(f.route(&[0xff; 6]), &[ip(2), ip(3)]);
        assert_eq!(f.route(&[0x01, 0, 0x5e, 0, 0, 1]), &[ip(2), ip(3)]);
        assert!(Fdb::new(&[], &[]).route(&[0xff; 6]).is_empty());
    }

    #[test]
    fn peers_only() {
        let f = Fdb::new(&[ip(2)], &[]);
        assert!(f.is_peer(ip(2)));
        assert!(!f.is_peer(ip(4)));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped());
        assert!(f.is_peer(mapped));
        assert!(!f.is_peer(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }
}
