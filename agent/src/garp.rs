//! Gratuitous ARP: "IP is at MAC", broadcast so that every neighbour cache that has an
//! entry for IP (stale, or still waiting for an answer) takes the new one at once.
//!
//! Why the agent sends them: the VXLAN device answers ARP for remote endpoints from
//! its neighbour table (`proxy`), and the user-space plane floods ARP only to the hosts
//! it knows. A client that asks for an endpoint its host has not programmed yet gets no
//! answer and, with the kernel's default timers, asks again only a second later. So
//! when the agent learns a remote endpoint it announces it to the local endpoints of
//! its network, and an endpoint that appears announces itself (which also teaches the
//! local bridge its port at once). Plans decide who announces what
//! ([`crate::plan::Action::Announce`]); this module builds the frame (pure) and sends
//! it on one device (the only I/O here).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use overlay_model::Mac;

/// Ethernet header (14) + ARP for IPv4 over Ethernet (28).
pub const FRAME_LEN: usize = 42;
const ETH_P_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];

/// A gratuitous ARP request (RFC 5227 "ARP announcement"): sender and target address
/// are both `ip`, sender hardware address `mac`, to the broadcast address.
pub fn frame(ip: Ipv4Addr, mac: Mac) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Hardware Ethernet (1), protocol IPv4, lengths 6 and 4, operation request (1).
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac.0);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address stays zero (unknown, as in a request).
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends `frame` out of device `dev` of the calling thread's network namespace. On a
/// veth, the frame arrives at the other end only; on an endpoint's `eth0`, it enters
/// the bridge like any frame the endpoint sends.
pub fn send(dev: &str, frame: &[u8]) -> io::Result<()> {
    Announcer::new()?.send(dev, frame)
}

/// A packet socket for sending many announcements: closing one waits for the kernel's
/// network RCU grace period (`synchronize_net`, ~10 ms), so a pass that announces to
/// dozens of endpoints keeps one open rather than one per frame.
pub struct Announcer {
    fd: OwnedFd,
}

impl Announcer {
    /// A socket in the calling thread's network namespace (it stays there).
    pub fn new() -> io::Result<Announcer> {
        // Protocol 0: this socket only sends, it receives nothing.
        // SAFETY: plain socket(2); the fd is owned right below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nothing else owns.
        Ok(Announcer { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Sends `frame` out of device `dev` of the socket's namespace.
    pub fn send(&self, dev: &str, frame: &[u8]) -> io::Result<()> {
        let name = std::ffi::CString::new(dev).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ARP.to_be();
        addr.sll_ifindex = i32::try_from(index).map_err(|_| io::ErrorKind::InvalidInput)?;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&BROADCAST);
        // SAFETY: the buffer and the address are valid for the stated lengths.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_names_the_address_twice_and_is_broadcast() {
        let mac = Mac([0x02, 0x42, 10, 0, 1, 5]);
        let f = frame(Ipv4Addr::new(10, 0, 1, 5), mac);
        let want: [u8; FRAME_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // to everyone
            0x02, 0x42, 10, 0, 1, 5, // from the endpoint's MAC
            0x08, 0x06, // ARP
            0, 1, 0x08, 0, 6, 4, 0, 1, // Ethernet/IPv4 request
            0x02, 0x42, 10, 0, 1, 5, 10, 0, 1, 5, // sender: MAC, IP
            0, 0, 0, 0, 0, 0, 10, 0, 1, 5, // target: unknown MAC, the same IP
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn sending_on_a_missing_device_fails_cleanly() {
        let f = frame(Ipv4Addr::new(10, 0, 0, 2), Mac([2, 0, 0, 0, 0, 1]));
        assert!(send("ovt-no-such-dev", &f).is_err());
        assert!(send("bad\0name", &f).is_err());
    }
}
