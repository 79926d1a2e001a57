//! The host namespace's forwarding entries (permanent `self` FDB entries with a remote,
//! permanent IPv4 neighbours: what the vxlan devices carry, 10,000s of each with many
//! remote endpoints), kept current from rtnetlink notifications so that a pass does not
//! dump and parse all of them every second.
//!
//! [`Entries`] is plain data: a dump, then [`Change`]s applied in order. [`EntryWatch`]
//! is the I/O edge: a netlink socket subscribed to the link and neighbour groups of the
//! agent's namespace, whose messages become changes. It subscribes *before* it dumps,
//! so nothing is missed between the two; a notification that happened before the dump
//! and is applied after it is harmless, since the last change of an entry always wins.
//!
//! It dumps again (a resync) when it cannot trust what it holds: at start; when the
//! socket's buffer overflowed and notifications were lost (`ENOBUFS`, reported as an
//! overrun); when a vxlan device of ours changed (the kernel may drop its entries in
//! bulk, e.g. when it goes down); when the socket died; and every [`RESYNC_INTERVAL`]
//! as a safety net. Entries of a device index that no longer exists are never used:
//! a recreated device has a new index.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::RouteNetlinkMessage;
use overlay_model::Mac;
use tracing::{debug, warn};

use crate::desired::{Fdb, VXLAN_PREFIX};
use crate::nl::{self, Nl};

/// The longest the watch trusts notifications alone before it dumps again.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// Receive buffer of the notification socket: a pass that programs 10,000 remote
/// endpoints makes 20,000 notifications at once (an overflow only costs a resync).
const RCVBUF: usize = 32 << 20;

/// One notification, as far as the entries are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An FDB entry is (`present`) or is no longer one we keep (deleted, or replaced by
    /// one that is not permanent).
    Fdb { index: u32, entry: Fdb, present: bool },
    /// A neighbour is permanent with `mac` (`Some`), or is not (deleted, or no longer
    /// permanent).
    Neigh { index: u32, ip: Ipv4Addr, mac: Option<Mac> },
    /// The device is gone: so are its entries.
    LinkGone { index: u32 },
    /// What is held cannot be trusted: dump again.
    Resync(&'static str),
}

/// Forwarding entries by device index (plain data).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    fdb: BTreeMap<u32, BTreeSet<Fdb>>,
    neigh: BTreeMap<u32, BTreeMap<Ipv4Addr, Mac>>,
}

impl Entries {
    /// From a dump: `fdb` and `neigh` as [`Nl::fdb`] and [`Nl::neighs`] return them.
    pub fn from_dump(fdb: Vec<(u32, Fdb)>, neigh: Vec<(u32, Ipv4Addr, Mac)>) -> Entries {
        let mut e = Entries::default();
        for (index, entry) in fdb {
            e.fdb.entry(index).or_default().insert(entry);
        }
        for (index, ip, mac) in neigh {
            e.neigh.entry(index).or_default().insert(ip, mac);
        }
        e
    }

    /// Applies one change; `false` when it asks for a resync (nothing else changes).
    pub fn apply(&mut self, change: &Change) -> bool {
        match change {
            Change::Fdb { index, entry, present: true } => {
                self.fdb.entry(*index).or_default().insert(*entry);
            }
            Change::Fdb { index, entry, present: false } => {
                if let Some(set) = self.fdb.get_mut(index) {
                    set.remove(entry);
                }
            }
            Change::Neigh { index, ip, mac: Some(mac) } => {
                self.neigh.entry(*index).or_default().insert(*ip, *mac);
            }
            Change::Neigh { index, ip, mac: None } => {
                if let Some(map) = self.neigh.get_mut(index) {
                    map.remove(ip);
                }
            }
            Change::LinkGone { index } => {
                self.fdb.remove(index);
                self.neigh.remove(index);
            }
            Change::Resync(_) => return false,
        }
        true
    }

    /// The FDB entries of device `index`.
    pub fn fdb(&self, index: u32) -> Option<&BTreeSet<Fdb>> {
        self.fdb.get(&index)
    }

    /// The permanent neighbours of device `index`.
    pub fn neigh(&self, index: u32) -> Option<&BTreeMap<Ipv4Addr, Mac>> {
        self.neigh.get(&index)
    }
}

/// What one rtnetlink notification changes (`None`: nothing the entries hold).
pub fn change_of(msg: &NetlinkMessage<RouteNetlinkMessage>) -> Option<Change> {
    match &msg.payload {
        NetlinkPayload::Overrun(_) => Some(Change::Resync("notifications were lost (overrun)")),
        NetlinkPayload::InnerMessage(m) => match m {
            RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
                let new = matches!(m, RouteNetlinkMessage::NewNeighbour(_));
                if let Some((index, entry)) = nl::fdb_of(n) {
                    let present = new && nl::kept_fdb(n);
                    return Some(Change::Fdb { index, entry, present });
                }
                let (index, ip, mac) = nl::neigh_of(n)?;
                let mac = mac.filter(|_| new && nl::kept_neigh(n));
                Some(Change::Neigh { index, ip, mac })
            }
            RouteNetlinkMessage::DelLink(l) => Some(Change::LinkGone { index: l.header.index }),
            RouteNetlinkMessage::NewLink(l) => {
                let vxlan = l
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(n) if n.starts_with(VXLAN_PREFIX)));
                vxlan.then_some(Change::Resync("a vxlan device changed"))
            }
            _ => None,
        },
        _ => None,
    }
}

/// `RTNLGRP_LINK` (1) and `RTNLGRP_NEIGH` (3), as a bind mask (bit N-1 for group N).
const GROUPS: u32 = 0b101;

/// The notification socket and what it told so far (see the module documentation).
///
/// The socket is read when a pass asks ([`EntryWatch::entries`]), not by a task of its
/// own: the kernel sends the notification of a change before it acknowledges the
/// change, so whatever the previous pass applied (or anyone did before this pass asked)
/// is already queued and is seen.
pub struct EntryWatch {
    /// `None` once it failed: dumps on every pass from then on.
    socket: Option<netlink_sys::Socket>,
    buf: Vec<u8>,
    entries: Entries,
    /// When the entries were last dumped; `None`: they must be.
    synced: Option<Instant>,
    resync_interval: Duration,
    /// How many times the entries were dumped.
    dumps: u64,
}

impl std::fmt::Debug for EntryWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryWatch")
            .field("subscribed", &self.socket.is_some())
            .field("synced", &self.synced)
            .finish_non_exhaustive()
    }
}

impl EntryWatch {
    /// Subscribes to the link and neighbour notifications of the calling thread's
    /// network namespace.
    pub fn open() -> std::io::Result<EntryWatch> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
        socket.bind(&netlink_sys::SocketAddr::new(0, GROUPS))?;
        socket.set_non_blocking(true)?;
        if let Err(e) = force_rcvbuf(&socket, RCVBUF) {
            debug!("notification socket keeps its default buffer ({e}): bursts may overflow it");
        }
        Ok(EntryWatch {
            socket: Some(socket),
            buf: vec![0; 1 << 16],
            entries: Entries::default(),
            synced: None,
            resync_interval: RESYNC_INTERVAL,
            dumps: 0,
        })
    }

    /// Reads every queued notification: applied to the entries until a resync is due
    /// (then only read, to empty the queue); returns why one is due, if it is.
    fn drain(&mut self, mut why: Option<&'static str>) -> Option<&'static str> {
        let Some(socket) = &self.socket else { return Some("no notifications") };
        loop {
            let mut slice = &mut self.buf[..];
            let n = match socket.recv(&mut slice, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return why,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    why = Some("notifications were lost (socket buffer full)");
                    continue;
                }
                Err(e) => {
                    warn!("the netlink notification socket failed ({e}): forwarding entries are dumped on every pass from now on");
                    self.socket = None;
                    return Some("no notifications");
                }
            };
            // A dump follows anyway: the rest of the queue is only emptied, not parsed
            // (after a pass that programmed 10,000 entries, 20,000 notifications).
            if why.is_some() {
                continue;
            }
            let mut at = 0;
            while let Some(rest) = self.buf.get(at..n).filter(|r| r.len() >= 16) {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let Some(bytes) = rest.get(..len).filter(|_| len >= 16) else {
                    why = Some("a notification could not be read");
                    break;
                };
                match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
                    Ok(msg) => {
                        if let Some(change) = change_of(&msg) {
                            if !self.entries.apply(&change) {
                                if let Change::Resync(reason) = change {
                                    why = Some(reason);
                                }
                            }
                        }
                    }
                    // One the parser does not know (a newer kernel's) may have been
                    // about an entry.
                    Err(e) => {
                        debug!("unreadable rtnetlink notification: {e}");
                        why = Some("a notification could not be read");
                    }
                }
                if why.is_some() {
                    break;
                }
                at += (len + 3) & !3;
            }
        }
    }

    /// The entries as they are now: the notifications queued since the last call
    /// applied, or a fresh dump through `nl` when they cannot be trusted.
    pub async fn entries(&mut self, nl: &Nl) -> Result<&Entries> {
        let due = match self.synced {
            None => Some("start"),
            Some(t) if t.elapsed() >= self.resync_interval => Some("safety net"),
            Some(_) => None,
        };
        if let Some(why) = self.drain(due) {
            let fdb = nl.fdb().await?;
            let neigh = nl.neighs().await?;
            debug!(why, fdb = fdb.len(), neigh = neigh.len(), "dumped forwarding entries");
            self.entries = Entries::from_dump(fdb, neigh);
            self.synced = Some(Instant::now());
            self.dumps += 1;
        }
        Ok(&self.entries)
    }

    /// How many times the entries were dumped so far.
    pub fn dumps(&self) -> u64 {
        self.dumps
    }
}

/// `SO_RCVBUFFORCE` (root may exceed `net.core.rmem_max`), else `SO_RCVBUF`.
fn force_rcvbuf(socket: &netlink_sys::Socket, size: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    socket.set_rx_buf_sz(size)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use netlink_packet_route::link::LinkMessage;
    use netlink_packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    };
    use netlink_packet_route::AddressFamily;

    const VX: u32 = 7;

    fn fdb(n: u8) -> Fdb {
        Fdb { mac: Mac::from_counter(u64::from(n)), dst: Ipv4Addr::new(192, 0, 2, n) }
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    fn neighbour(family: AddressFamily, state: NeighbourState, own: bool) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        m.header.ifindex = VX;
        m.header.state = state;
        if own {
            m.header.flags = NeighbourFlags::Own;
        }
        m
    }

    /// The FDB notification `bridge fdb append` makes (or a deletion of it).
    fn fdb_msg(new: bool, e: Fdb, state: NeighbourState) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut m = neighbour(AddressFamily::Bridge, state, true);
        m.attributes.push(NeighbourAttribute::LinkLocalAddress(e.mac.0.to_vec()));
        m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(e.dst)));
        let payload = if new {
            RouteNetlinkMessage::NewNeighbour(m)
        } else {
            RouteNetlinkMessage::DelNeighbour(m)
        };
        NetlinkMessage::from(payload)
    }

    fn neigh_msg(new: bool, n: u8, state: NeighbourState) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut m = neighbour(AddressFamily::Inet, state, false);
        m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip(n))));
        m.attributes.push(NeighbourAttribute::LinkLocalAddress(vec![2, 0, 0, 0, 0, n]));
        let payload = if new {
            RouteNetlinkMessage::NewNeighbour(m)
        } else {
            RouteNetlinkMessage::DelNeighbour(m)
        };
        NetlinkMessage::from(payload)
    }

    fn link_msg(new: bool, index: u32, name: &str) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l.attributes.push(LinkAttribute::IfName(name.into()));
        let payload =
            if new { RouteNetlinkMessage::NewLink(l) } else { RouteNetlinkMessage::DelLink(l) };
        NetlinkMessage::from(payload)
    }

    #[test]
    fn notifications_become_changes() {
        use NeighbourState::{Permanent, Reachable};
        let c = |m| change_of(&m);
        assert_eq!(
            c(fdb_msg(true, fdb(2), Permanent)),
            Some(Change::Fdb { index: VX, entry: fdb(2), present: true })
        );
        // Deleted, or no longer permanent: not ours any more.
        for m in [fdb_msg(false, fdb(2), Permanent), fdb_msg(true, fdb(2), Reachable)] {
            assert_eq!(c(m), Some(Change::Fdb { index: VX, entry: fdb(2), present: false }));
        }
        let mac = Mac([2, 0, 0, 0, 0, 3]);
        assert_eq!(
            c(neigh_msg(true, 3, Permanent)),
            Some(Change::Neigh { index: VX, ip: ip(3), mac: Some(mac) })
        );
        for m in [neigh_msg(false, 3, Permanent), neigh_msg(true, 3, Reachable)] {
            assert_eq!(c(m), Some(Change::Neigh { index: VX, ip: ip(3), mac: None }));
        }
        assert_eq!(c(link_msg(false, 9, "ovv-x")), Some(Change::LinkGone { index: 9 }));
        assert!(matches!(c(link_msg(true, VX, "ovx-4096")), Some(Change::Resync(_))));
        // Other devices changing (a veth plugged in, a bridge's port state) touch no
        // entry.
        assert_eq!(c(link_msg(true, 9, "ovb-4096")), None);
        assert_eq!(c(link_msg(true, 9, "eth0")), None);
        let overrun = NetlinkMessage::new(
            netlink_packet_core::NetlinkHeader::default(),
            NetlinkPayload::<RouteNetlinkMessage>::Overrun(Vec::new()),
        );
        assert!(matches!(c(overrun), Some(Change::Resync(_))));
    }

    #[test]
    fn changes_keep_the_entries_a_dump_would_show() {
        let mac = |n: u8| Mac([2, 0, 0, 0, 0, n]);
        let mut e = Entries::from_dump(vec![(VX, fdb(1))], vec![(VX, ip(1), mac(1))]);
        let changes = [
            Change::Fdb { index: VX, entry: fdb(2), present: true },
            Change::Neigh { index: VX, ip: ip(2), mac: Some(mac(2)) },
            // Deleted by hand.
            Change::Fdb { index: VX, entry: fdb(1), present: false },
            Change::Neigh { index: VX, ip: ip(1), mac: None },
            // Another device's entries come and go with it.
            Change::Fdb { index: 9, entry: fdb(3), present: true },
            Change::LinkGone { index: 9 },
            // A replaced neighbour.
            Change::Neigh { index: VX, ip: ip(2), mac: Some(mac(9)) },
        ];
        for change in &changes {
            assert!(e.apply(change));
        }
        let want = Entries::from_dump(vec![(VX, fdb(2))], vec![(VX, ip(2), mac(9))]);
        assert_eq!(e.fdb(VX), want.fdb(VX));
        assert_eq!(e.neigh(VX), want.neigh(VX));
        assert_eq!(e.fdb(9).map(BTreeSet::len), None);
        // Notifications from before a dump delivered after it: replayed in order on top
        // of the dump, they end where it is.
        let before = e.clone();
        for change in &changes[3..] {
            assert!(e.apply(change));
        }
        assert_eq!(e, before);
        // A resync request leaves the entries for the dump to replace.
        assert!(!e.apply(&Change::Resync("test")));
        assert_eq!(e, before);
    }
}
