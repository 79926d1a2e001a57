//! The per-network IPv4 address allocator: a pure data structure.
//!
//! Free addresses are kept as a map of disjoint, non-adjacent ranges (`start -> end`,
//! inclusive), not as a bitmap or a set of used addresses, because a network can hold
//! hundreds of thousands of endpoints and the controller allocates for every create:
//! every operation is O(log r) in the number of free ranges, and a freshly created or
//! densely used subnet is a handful of ranges however large it is. Releasing merges with
//! the neighbouring ranges, so equal sets of free addresses always have equal
//! representations — which keeps replicas byte-identical whatever order things were
//! freed in.
//!
//! Allocation is serial, as Swarm's and podman's: a cursor walks up the subnet and the
//! next automatic allocation takes the lowest free address at or after it, wrapping to
//! the bottom of the subnet only when nothing above is free. So a freed address is not
//! handed out again while unused ones remain, and peers' ARP and FDB caches for it have
//! every chance to expire before it belongs to someone else. The cursor is part of the
//! replicated state: two replicas applying the same commands pick the same address.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The smallest subnet that still has room for a gateway and one endpoint.
pub const MAX_PREFIX: u8 = 30;

/// Why an address cannot be taken. The state machine turns these into `ModelError`s
/// that also name the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IpamError {
    #[error("{ip} is not a usable address in {subnet}")]
    Unusable { ip: Ipv4Addr, subnet: Ipv4Network },
    #[error("{0} is already in use")]
    InUse(Ipv4Addr),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipam {
    subnet: Ipv4Network,
    gateway: Ipv4Addr,
    /// Free addresses as disjoint, non-adjacent inclusive ranges `start -> end`.
    free: BTreeMap<u32, u32>,
    /// Kept alongside `free` so counting never walks the ranges.
    free_count: u32,
    /// Serial allocation: the next automatic allocation takes the lowest free address
    /// at or after this one (wrapping). It moves past every automatically allocated
    /// address; explicit requests and releases leave it alone.
    next: u32,
}

/// The allocator as snapshots of format 1 stored it (lowest-free allocation, no
/// cursor); [`IpamV1::upgrade`] gives it the cursor of format 2.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct IpamV1 {
    subnet: Ipv4Network,
    gateway: Ipv4Addr,
    free: BTreeMap<u32, u32>,
    free_count: u32,
}

impl IpamV1 {
    /// The same free addresses, with the cursor just past `last_used` (the highest
    /// address attached in the network), or at the bottom of the subnet when nothing is
    /// attached.
    pub(crate) fn upgrade(self, last_used: Option<Ipv4Addr>) -> Ipam {
        let mut ipam = Ipam {
            subnet: self.subnet,
            gateway: self.gateway,
            free: self.free,
            free_count: self.free_count,
            next: 0,
        };
        ipam.next = match last_used {
            Some(ip) => u32::from(ip).saturating_add(1),
            None => ipam.first_usable(),
        };
        ipam
    }
}

impl Ipam {
    /// An allocator with every usable address free except the gateway.
    ///
    /// A subnet smaller than a /30 (see [`MAX_PREFIX`]) yields an allocator with nothing
    /// free rather than a panic: the state machine refuses such subnets before it gets
    /// here, and a gateway outside the subnet is simply not reserved for the same reason.
    /// Host bits in `subnet` are ignored.
    pub fn new(subnet: Ipv4Network, gateway: Ipv4Addr) -> Ipam {
        let subnet = Ipv4Network::new_checked(subnet.network(), subnet.prefix()).unwrap_or(subnet);
        let mut ipam = Ipam { subnet, gateway, free: BTreeMap::new(), free_count: 0, next: 0 };
        ipam.next = ipam.first_usable();
        if subnet.prefix() <= MAX_PREFIX {
            let first = u32::from(subnet.network()) + 1;
            let last = u32::from(subnet.broadcast()) - 1;
            ipam.free.insert(first, last);
            ipam.free_count = last - first + 1;
            // The gateway answers on every host, so no endpoint may ever get it.
            if ipam.is_usable(gateway) {
                ipam.take(u32::from(gateway));
            }
        }
        ipam
    }

    pub fn subnet(&self) -> Ipv4Network {
        self.subnet
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Inside the subnet and neither its network nor its broadcast address. The gateway
    /// is usable (it is a valid host address) but never free.
    pub fn is_usable(&self, ip: Ipv4Addr) -> bool {
        self.subnet.prefix() <= MAX_PREFIX
            && self.subnet.contains(ip)
            && ip != self.subnet.network()
            && ip != self.subnet.broadcast()
    }

    pub fn is_free(&self, ip: Ipv4Addr) -> bool {
        self.range_containing(u32::from(ip)).is_some()
    }

    /// The address the next [`allocate`](Self::allocate) would return, so callers can
    /// validate a whole command before changing anything: the lowest free address at or
    /// after the cursor, else (wrapping) the lowest free address.
    pub fn next_free(&self) -> Option<Ipv4Addr> {
        let at_or_after = match self.range_containing(self.next) {
            Some(_) => Some(self.next),
            None => self.free.range(self.next..).next().map(|(&start, _)| start),
        };
        at_or_after.or_else(|| self.free.keys().next().copied()).map(Ipv4Addr::from)
    }

    /// The lowest free address (what a wrapped cursor would take).
    pub fn lowest_free(&self) -> Option<Ipv4Addr> {
        self.free.keys().next().map(|&start| Ipv4Addr::from(start))
    }

    /// Where the cursor stands: the next allocation looks here first.
    pub fn cursor(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.next)
    }

    pub fn free_count(&self) -> u32 {
        self.free_count
    }

    /// Usable addresses other than the gateway that are currently handed out.
    pub fn allocated_count(&self) -> u32 {
        self.usable_count().saturating_sub(self.free_count).saturating_sub(self.gateway_reserved())
    }

    /// The [`next_free`](Self::next_free) address, now taken; the cursor moves past it.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let ip = self.next_free()?;
        let n = u32::from(ip);
        self.take(n);
        // Past the top of the subnet the next lookup finds nothing at or after the
        // cursor and wraps, so the cursor needs no bound of its own.
        self.next = n.saturating_add(1);
        Some(ip)
    }

    /// Takes `ip` if it is usable and free.
    pub fn allocate_specific(&mut self, ip: Ipv4Addr) -> Result<(), IpamError> {
        if !self.is_usable(ip) {
            return Err(IpamError::Unusable { ip, subnet: self.subnet });
        }
        if self.take(u32::from(ip)) {
            Ok(())
        } else {
            Err(IpamError::InUse(ip))
        }
    }

    /// Returns `ip` to the pool. Releasing the gateway, an address outside the subnet or
    /// an address already free does nothing (and returns false), so a release can be
    /// repeated safely.
    pub fn release(&mut self, ip: Ipv4Addr) -> bool {
        if !self.is_usable(ip) || ip == self.gateway || self.is_free(ip) {
            return false;
        }
        let n = u32::from(ip);
        let mut start = n;
        let mut end = n;
        // `n` is never 0 or u32::MAX here: those are always a network or broadcast address.
        if let Some((&s, &e)) = self.free.range(..n).next_back() {
            if e.checked_add(1) == Some(n) {
                self.free.remove(&s);
                start = s;
            }
        }
        if let Some(next) = n.checked_add(1) {
            if let Some(e) = self.free.remove(&next) {
                end = e;
            }
        }
        self.free.insert(start, end);
        self.free_count += 1;
        true
    }

    /// The free ranges, lowest first (inclusive bounds); for inspection and tests.
    pub fn free_ranges(&self) -> impl Iterator<Item = (Ipv4Addr, Ipv4Addr)> + '_ {
        self.free.iter().map(|(&s, &e)| (Ipv4Addr::from(s), Ipv4Addr::from(e)))
    }

    /// The subnet's first host address (where a fresh cursor starts).
    fn first_usable(&self) -> u32 {
        u32::from(self.subnet.network()).saturating_add(1)
    }

    fn usable_count(&self) -> u32 {
        if self.subnet.prefix() > MAX_PREFIX {
            return 0;
        }
        u32::from(self.subnet.broadcast()) - u32::from(self.subnet.network()) - 1
    }

    fn gateway_reserved(&self) -> u32 {
        u32::from(self.is_usable(self.gateway))
    }

    fn range_containing(&self, n: u32) -> Option<(u32, u32)> {
        let (&start, &end) = self.free.range(..=n).next_back()?;
        (n <= end).then_some((start, end))
    }

    /// Removes `n` from the free ranges; false if it was not free.
    fn take(&mut self, n: u32) -> bool {
        let Some((start, end)) = self.range_containing(n) else {
            return false;
        };
        self.free.remove(&start);
        if start < n {
            self.free.insert(start, n - 1);
        }
        if n < end {
            self.free.insert(n + 1, end);
        }
        self.free_count -= 1;
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn new_reserves_network_broadcast_and_gateway() {
        let ipam = Ipam::new(net("10.0.1.0/24"), ip("10.0.1.1"));
        assert_eq!(
            ipam.free_ranges().collect::<Vec<_>>(),
            vec![(ip("10.0.1.2"), ip("10.0.1.254"))]
        );
        assert_eq!(ipam.free_count(), 253);
        assert_eq!(ipam.allocated_count(), 0);
        for reserved in ["10.0.1.0", "10.0.1.1", "10.0.1.255"] {
            assert!(!ipam.is_free(ip(reserved)), "{reserved}");
        }
        assert!(ipam.is_usable(ip("10.0.1.1")));
        assert!(!ipam.is_usable(ip("10.0.1.0")));
        assert!(!ipam.is_usable(ip("10.0.1.255")));
        assert!(!ipam.is_usable(ip("10.0.2.1")));
    }

    #[test]
    fn gateway_in_the_middle_splits_the_range() {
        let ipam = Ipam::new(net("10.0.1.0/29"), ip("10.0.1.4"));
        assert_eq!(
            ipam.free_ranges().collect::<Vec<_>>(),
            vec![(ip("10.0.1.1"), ip("10.0.1.3")), (ip("10.0.1.5"), ip("10.0.1.6"))]
        );
    }

    #[test]
    fn slash_30_has_exactly_one_endpoint_address() {
        let mut ipam = Ipam::new(net("10.0.0.0/30"), ip("10.0.0.1"));
        assert_eq!(ipam.allocate(), Some(ip("10.0.0.2")));
        assert_eq!(ipam.allocate(), None);
        assert_eq!(ipam.allocated_count(), 1);
    }

    #[test]
    fn too_small_or_odd_inputs_never_panic() {
        let mut ipam = Ipam::new(net("10.0.0.0/31"), ip("10.0.0.1"));
        assert_eq!(ipam.allocate(), None);
        assert!(!ipam.is_usable(ip("10.0.0.1")));
        assert_eq!(
            ipam.allocate_specific(ip("10.0.0.1")),
            Err(IpamError::Unusable { ip: ip("10.0.0.1"), subnet: net("10.0.0.0/31") })
        );
        let whole = Ipam::new(net("0.0.0.0/0"), ip("0.0.0.1"));
        assert_eq!(whole.free_count(), u32::MAX - 2);
        assert_eq!(whole.lowest_free(), Some(ip("0.0.0.2")));
        // Host bits are ignored; a gateway outside is not reserved.
        let ipam = Ipam::new(net("10.0.1.77/24"), ip("192.168.0.1"));
        assert_eq!(ipam.subnet(), net("10.0.1.0/24"));
        assert_eq!(ipam.lowest_free(), Some(ip("10.0.1.1")));
    }

    #[test]
    fn allocation_is_serial_and_wraps() {
        let mut ipam = Ipam::new(net("10.0.1.0/29"), ip("10.0.1.1"));
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.2")));
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.3")));
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.4")));
        // A freed address is not handed out while unused ones remain above the cursor.
        assert!(ipam.release(ip("10.0.1.3")));
        assert_eq!(ipam.next_free(), Some(ip("10.0.1.5")));
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.5")));
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.6")));
        // Nothing above: wrap to the lowest free address.
        assert_eq!(ipam.cursor(), ip("10.0.1.7"));
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.3")));
        assert_eq!(ipam.allocate(), None);
        assert!(ipam.release(ip("10.0.1.2")));
        assert!(ipam.release(ip("10.0.1.6")));
        // The cursor stands just past .3: .6 comes before the older .2.
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.6")));
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.2")));
    }

    #[test]
    fn explicit_requests_leave_the_cursor_alone() {
        let mut ipam = Ipam::new(net("10.0.1.0/24"), ip("10.0.1.1"));
        assert_eq!(ipam.allocate_specific(ip("10.0.1.3")), Ok(()));
        assert_eq!(ipam.allocate_specific(ip("10.0.1.200")), Ok(()));
        assert_eq!(ipam.cursor(), ip("10.0.1.1"));
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.2")));
        // The taken .3 is skipped, not an obstacle.
        assert_eq!(ipam.allocate(), Some(ip("10.0.1.4")));
    }

    #[test]
    fn a_format_1_allocator_upgrades_with_its_cursor_past_the_last_used_address() {
        let mut old = Ipam::new(net("10.0.1.0/24"), ip("10.0.1.1"));
        for _ in 0..4 {
            old.allocate();
        }
        old.release(ip("10.0.1.3"));
        let v1 = IpamV1 {
            subnet: old.subnet,
            gateway: old.gateway,
            free: old.free.clone(),
            free_count: old.free_count,
        };
        let mut up = v1.clone().upgrade(Some(ip("10.0.1.5")));
        assert_eq!(up.free_ranges().collect::<Vec<_>>(), old.free_ranges().collect::<Vec<_>>());
        assert_eq!(up.allocate(), Some(ip("10.0.1.6")));
        let mut empty = v1.upgrade(None);
        assert_eq!(empty.cursor(), ip("10.0.1.1"));
        assert_eq!(empty.allocate(), Some(ip("10.0.1.3")));
    }

    #[test]
    fn allocate_specific_distinguishes_unusable_from_in_use() {
        let mut ipam = Ipam::new(net("10.0.1.0/24"), ip("10.0.1.1"));
        assert_eq!(ipam.allocate_specific(ip("10.0.1.50")), Ok(()));
        assert_eq!(ipam.allocate_specific(ip("10.0.1.50")), Err(IpamError::InUse(ip("10.0.1.50"))));
        assert_eq!(ipam.allocate_specific(ip("10.0.1.1")), Err(IpamError::InUse(ip("10.0.1.1"))));
        for bad in ["10.0.1.0", "10.0.1.255", "10.0.2.5"] {
            assert_eq!(
                ipam.allocate_specific(ip(bad)),
                Err(IpamError::Unusable { ip: ip(bad), subnet: net("10.0.1.0/24") })
            );
        }
        assert_eq!(
            ipam.free_ranges().collect::<Vec<_>>(),
            vec![(ip("10.0.1.2"), ip("10.0.1.49")), (ip("10.0.1.51"), ip("10.0.1.254"))]
        );
    }

    #[test]
    fn release_is_a_no_op_for_reserved_and_free_addresses() {
        let mut ipam = Ipam::new(net("10.0.1.0/24"), ip("10.0.1.1"));
        let before = ipam.clone();
        for ip_ in ["10.0.1.0", "10.0.1.1", "10.0.1.255", "10.0.1.9", "8.8.8.8"] {
            assert!(!ipam.release(ip(ip_)), "{ip_}");
        }
        assert_eq!(ipam, before);
    }

    #[test]
    fn release_merges_so_representation_is_canonical() {
        let mut a = Ipam::new(net("10.0.1.0/28"), ip("10.0.1.1"));
        let fresh = a.clone();
        let got: Vec<_> = std::iter::from_fn(|| a.allocate()).collect();
        assert_eq!(got.len(), 13);
        for i in [5, 3, 4, 14, 2, 8, 6, 7, 13, 9, 11, 10, 12] {
            assert!(a.release(Ipv4Addr::new(10, 0, 1, i)));
        }
        // Same free set, same ranges; only the cursor remembers the history.
        assert_eq!(a.free, fresh.free);
        assert_eq!(a.free_count, fresh.free_count);
    }

    #[test]
    fn hundred_thousand_allocations_stay_compact() {
        let mut ipam = Ipam::new(net("10.0.0.0/14"), ip("10.0.0.1"));
        for _ in 0..100_000 {
            assert!(ipam.allocate().is_some());
        }
        assert_eq!(ipam.free_ranges().count(), 1);
        assert_eq!(ipam.allocated_count(), 100_000);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate,
        Specific(u8),
        Release(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Allocate),
            1 => any::<u8>().prop_map(Op::Specific),
            3 => any::<u8>().prop_map(Op::Release),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The range map behaves exactly like a plain set of used addresses with a serial
        /// cursor.
        #[test]
        fn matches_a_set_model(gw in 1u8..63, ops in proptest::collection::vec(op(), 0..200)) {
            // 10.0.0.0/26 plus addresses outside it (the u8 goes up to 255).
            let subnet = net("10.0.0.0/26");
            let gateway = Ipv4Addr::new(10, 0, 0, gw);
            let mut ipam = Ipam::new(subnet, gateway);
            let mut used: BTreeSet<u8> = BTreeSet::new();
            let mut cursor: u8 = 1;
            let usable = |n: u8| (1..63).contains(&n);
            for op in ops {
                match op {
                    Op::Allocate => {
                        let free = |n: &u8| *n != gw && !used.contains(n);
                        let want = (cursor..63).find(free).or_else(|| (1u8..63).find(free));
                        let got = ipam.allocate();
                        prop_assert_eq!(got, want.map(|n| Ipv4Addr::new(10, 0, 0, n)));
                        if let Some(n) = want {
                            used.insert(n);
                            cursor = n + 1;
                        }
                    }
                    Op::Specific(n) => {
                        let a = Ipv4Addr::new(10, 0, 0, n);
                        let want = if !usable(n) {
                            Err(IpamError::Unusable { ip: a, subnet })
                        } else if n == gw || used.contains(&n) {
                            Err(IpamError::InUse(a))
                        } else {
                            used.insert(n);
                            Ok(())
                        };
                        prop_assert_eq!(ipam.allocate_specific(a), want);
                    }
                    Op::Release(n) => {
                        let released = ipam.release(Ipv4Addr::new(10, 0, 0, n));
                        prop_assert_eq!(released, used.remove(&n));
                    }
                }
                for n in 0..=255u8 {
                    let free = usable(n) && n != gw && !used.contains(&n);
                    prop_assert_eq!(ipam.is_free(Ipv4Addr::new(10, 0, 0, n)), free);
                }
                prop_assert_eq!(ipam.allocated_count() as usize, used.len());
                prop_assert_eq!(ipam.free_count() as usize, 61 - used.len());
                // Canonical: no two ranges touch.
                let ranges: Vec<_> = ipam.free_ranges().map(|(s, e)| (u32::from(s), u32::from(e))).collect();
                for w in ranges.windows(2) {
                    prop_assert!(w[0].1 + 1 < w[1].0);
                }
            }
        }
    }
}
