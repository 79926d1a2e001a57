//! Checks of single values against what the kernel and the overlay can safely use.
//!
//! The controller refuses commands with them; the agent runs them again on everything
//! it receives before a value touches the kernel or the file system (a name becomes a
//! namespace and a path under `/etc/netns`, an address an FDB destination, an MTU a
//! device attribute), because a bug or a compromised controller must not be able to
//! make an agent write outside its own objects.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::ipam::MAX_PREFIX;
use crate::types::{Mac, MAX_MTU, MAX_VNI, MIN_MTU};
use crate::ModelError;

/// `Ipv4Network::new` in a constant (the inputs below are valid by construction).
const fn net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Network {
    match Ipv4Network::new_checked(Ipv4Addr::new(a, b, c, d), prefix) {
        Some(n) => n,
        None => panic!("invalid reserved range"),
    }
}

/// Ranges an overlay subnet must not touch, with how errors name them. An endpoint
/// address in one of them would be answered by the host's own stack (loopback), never
/// routed (link-local, "this network"), or is not unicast at all (multicast, class E).
pub const RESERVED: [(Ipv4Network, &str); 6] = [
    (net(0, 0, 0, 0, 0), "the whole IPv4 address space"),
    (net(0, 0, 0, 0, 8), "the \"this network\" range"),
    (net(127, 0, 0, 0, 8), "the loopback range"),
    (net(169, 254, 0, 0, 16), "the link-local range"),
    (net(224, 0, 0, 0, 4), "the multicast range"),
    (net(240, 0, 0, 0, 4), "the reserved range"),
];

/// True when the two networks share at least one address.
pub fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    let (a0, a1) = (u32::from(a.network()), u32::from(a.broadcast()));
    let (b0, b1) = (u32::from(b.network()), u32::from(b.broadcast()));
    a0 <= b1 && b0 <= a1
}

/// A subnet an overlay network can have: host bits zero, room for a gateway and an
/// endpoint, and clear of every [`RESERVED`] range (`0.0.0.0/0` is named as the whole
/// address space, not as one of the ranges it contains).
pub fn check_subnet(subnet: Ipv4Network) -> Result<(), ModelError> {
    if subnet.ip() != subnet.network() {
        return Err(ModelError::InvalidCidr(subnet.to_string()));
    }
    let hit = if subnet.prefix() == 0 {
        RESERVED.first()
    } else {
        RESERVED[1..].iter().find(|(range, _)| overlaps(subnet, *range))
    };
    if let Some((range, what)) = hit {
        return Err(ModelError::ReservedSubnet { subnet, what, range: *range });
    }
    if subnet.prefix() > MAX_PREFIX {
        return Err(ModelError::SubnetTooSmall { subnet });
    }
    Ok(())
}

/// An address usable as an endpoint's or gateway's in `subnet`: inside it and neither its
/// network nor its broadcast address.
pub fn check_host_address(ip: Ipv4Addr, subnet: Ipv4Network) -> Result<(), ModelError> {
    if subnet.contains(ip) && ip != subnet.network() && ip != subnet.broadcast() {
        Ok(())
    } else {
        Err(ModelError::GatewayOutsideSubnet { gateway: ip, subnet })
    }
}

/// An address a host can own on the underlay (peers send encapsulated frames there).
pub fn check_underlay_ip(ip: Ipv4Addr) -> Result<(), ModelError> {
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        Err(ModelError::InvalidIp(ip.to_string()))
    } else {
        Ok(())
    }
}

pub fn check_mtu(mtu: u32) -> Result<(), ModelError> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(ModelError::InvalidMtu(mtu))
    }
}

pub fn check_vni(vni: u32) -> Result<(), ModelError> {
    if (1..=MAX_VNI).contains(&vni) {
        Ok(())
    } else {
        Err(ModelError::InvalidVni(vni))
    }
}

/// A MAC an endpoint interface can carry: unicast and not all zeros (the all-zero MAC
/// is the VXLAN flood list's key).
pub fn check_unicast_mac(mac: Mac) -> Result<(), ModelError> {
    if mac.0[0] & 1 == 0 && mac.0 != [0; 6] {
        Ok(())
    } else {
        Err(ModelError::InvalidMac(mac.to_string()))
    }
}

/// An interface name inside an endpoint namespace: what Linux accepts (1–15 bytes, no
/// `/`, `:` or whitespace, not `.` or `..`), restricted to `a-z A-Z 0-9 - _ .`, and
/// never `lo`, which every namespace already has.
pub fn check_interface(name: &str) -> Result<(), ModelError> {
    let ok = (1..=15).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name != "."
        && name != ".."
        && name != "lo";
    if ok {
        Ok(())
    } else {
        Err(ModelError::InvalidInterface(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn n(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn reserved_ranges_are_refused_by_name() {
        for (subnet, range, what) in [
            ("0.0.0.0/0", "0.0.0.0/0", "the whole IPv4 address space"),
            ("0.0.0.0/16", "0.0.0.0/8", "the \"this network\" range"),
            ("127.0.0.0/8", "127.0.0.0/8", "the loopback range"),
            ("127.1.2.0/24", "127.0.0.0/8", "the loopback range"),
            ("126.0.0.0/7", "127.0.0.0/8", "the loopback range"),
            ("169.254.0.0/16", "169.254.0.0/16", "the link-local range"),
            ("169.254.3.0/24", "169.254.0.0/16", "the link-local range"),
            ("224.0.0.0/4", "224.0.0.0/4", "the multicast range"),
            ("239.1.0.0/16", "224.0.0.0/4", "the multicast range"),
            ("240.0.0.0/24", "240.0.0.0/4", "the reserved range"),
        ] {
            let err = check_subnet(n(subnet)).unwrap_err();
            assert_eq!(
                err,
                ModelError::ReservedSubnet { subnet: n(subnet), what, range: n(range) }
            );
            assert!(err
                .to_string()
                .starts_with(&format!("subnet {subnet} overlaps {what} ({range})")));
        }
        assert_eq!(
            check_subnet(n("127.0.0.0/8")).unwrap_err().to_string(),
            "subnet 127.0.0.0/8 overlaps the loopback range (127.0.0.0/8): overlay networks \
             need private unicast addresses, such as 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
        );
    }

    #[test]
    fn ordinary_subnets_pass() {
        for ok in ["10.0.0.0/8", "10.1.2.0/24", "172.16.0.0/12", "192.168.0.0/30", "100.64.0.0/10"]
        {
            assert_eq!(check_subnet(n(ok)), Ok(()), "{ok}");
        }
        assert_eq!(
            check_subnet(n("10.0.0.0/31")),
            Err(ModelError::SubnetTooSmall { subnet: n("10.0.0.0/31") })
        );
        assert_eq!(
            check_subnet("10.0.0.5/24".parse().unwrap()),
            Err(ModelError::InvalidCidr("10.0.0.5/24".into()))
        );
    }

    #[test]
    fn overlap_is_symmetric_and_exact() {
        assert!(overlaps(n("10.0.0.0/24"), n("10.0.0.128/25")));
        assert!(overlaps(n("10.0.0.128/25"), n("10.0.0.0/16")));
        assert!(!overlaps(n("10.0.0.0/24"), n("10.0.1.0/24")));
        assert!(overlaps(n("0.0.0.0/0"), n("10.0.1.0/24")));
    }

    #[test]
    fn scalars() {
        assert_eq!(check_mtu(575), Err(ModelError::InvalidMtu(575)));
        assert_eq!(check_mtu(9001), Err(ModelError::InvalidMtu(9001)));
        assert_eq!(check_mtu(1450), Ok(()));
        assert_eq!(check_vni(0), Err(ModelError::InvalidVni(0)));
        assert_eq!(check_vni(MAX_VNI + 1), Err(ModelError::InvalidVni(MAX_VNI + 1)));
        assert_eq!(check_vni(4096), Ok(()));
        assert_eq!(check_unicast_mac(Mac::from_counter(1)), Ok(()));
        assert!(check_unicast_mac(Mac([0; 6])).is_err());
        assert!(check_unicast_mac(Mac([0xff; 6])).is_err());
        assert!(check_unicast_mac(Mac([0x01, 0, 0x5e, 0, 0, 1])).is_err());
        for ip in ["0.0.0.0", "255.255.255.255", "224.0.0.1"] {
            assert_eq!(
                check_underlay_ip(ip.parse().unwrap()),
                Err(ModelError::InvalidIp(ip.into()))
            );
        }
        assert_eq!(check_underlay_ip("192.0.2.1".parse().unwrap()), Ok(()));
        let s = n("10.0.0.0/24");
        assert_eq!(check_host_address("10.0.0.1".parse().unwrap(), s), Ok(()));
        for bad in ["10.0.0.0", "10.0.0.255", "10.0.1.1"] {
            assert!(check_host_address(bad.parse().unwrap(), s).is_err(), "{bad}");
        }
    }

    #[test]
    fn interface_names() {
        for ok in ["eth0", "eth15", "net1", "a", "x_y-z.1", "abcdefghijklmno"] {
            assert_eq!(check_interface(ok), Ok(()), "{ok}");
        }
        for bad in ["", "lo", ".", "..", "a/b", "../../etc", "a b", "eth0:1", "abcdefghijklmnop"] {
            assert_eq!(
                check_interface(bad),
                Err(ModelError::InvalidInterface(bad.into())),
                "{bad}"
            );
        }
    }
}
