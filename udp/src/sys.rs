//! The few Linux calls the standard library lacks, each behind a safe function: TAP
//! queues with a vnet header, a UDP socket with GSO/GRO and batched receive, an
//! eventfd and epoll. Everything else uses `std::fs::File` on the descriptors.
//!
//! The `tun-tap` crate cannot open a TAP with `IFF_VNET_HDR` or `IFF_MULTI_QUEUE`, nor
//! set offloads, and no socket crate in the tree exposes `UDP_SEGMENT`/`UDP_GRO`
//! control messages: hence these direct ioctls and `sendmsg`/`recvmmsg` calls.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use libc::{c_int, c_void, socklen_t};

/// Most messages one [`UdpSock::recv_batch`] returns.
pub(crate) const MAX_BATCH: usize = 16;

fn cvt(rc: c_int) -> io::Result<c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 24],
}

fn ifname(name: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    let mut out = [0; libc::IFNAMSIZ];
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

/// Index of network interface `name` in the calling thread's namespace, if any.
pub(crate) fn interface_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// Opens one queue of multi-queue TAP `name` (creating the device if missing) with a
/// 10-byte vnet header and the given offloads, non-blocking.
pub(crate) fn open_tap_queue(name: &str, offloads: &[u32]) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let fd = file.as_raw_fd();
    let mut req = IfReq {
        name: ifname(name)?,
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
            as libc::c_short,
        _pad: [0; 24],
    };
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is at least that big
    // and lives across the call.
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req as *mut IfReq) })?;
    let hdr_len: c_int = crate::vnet::VNET_HDR_LEN as c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len as *const c_int) })?;
    let mut last = Ok(0);
    for &flags in offloads {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        last = cvt(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) });
        if last.is_ok() {
            break;
        }
    }
    last?;
    Ok(file)
}

/// Marks the TAP behind `tap` persistent (it outlives its descriptors) or not.
pub(crate) fn set_persist(tap: &File, on: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
    cvt(unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETPERSIST, libc::c_ulong::from(on)) })
        .map(drop)
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>().write(sin)
            };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>().write(sin6)
            };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as socklen_t)
}

fn from_sockaddr(ss: &libc::sockaddr_storage, len: usize) -> Option<SocketAddr> {
    match c_int::from(ss.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, long enough.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says the storage holds a sockaddr_in6, long enough.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

fn setsockopt<T>(fd: RawFd, level: c_int, name: c_int, value: T) -> io::Result<()> {
    // SAFETY: `value` is a live T and its exact size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const T).cast::<c_void>(),
            mem::size_of::<T>() as socklen_t,
        )
    })
    .map(drop)
}

/// What one received message was.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RecvMeta {
    /// Sender, when the kernel gave a usable address.
    pub src: Option<SocketAddr>,
    /// Bytes received.
    pub len: usize,
    /// Size of each datagram within it (GRO), the last one maybe shorter; `len` when
    /// not coalesced.
    pub segment: usize,
    /// The buffer was too small: the message is cut.
    pub truncated: bool,
}

/// A blocking UDP socket with DF set, GRO on receive and large buffers.
#[derive(Debug)]
pub(crate) struct UdpSock {
    fd: OwnedFd,
}

impl UdpSock {
    /// Binds to `addr`; `reuse_port` lets several sockets share the port (the kernel
    /// spreads senders across them by address hash).
    pub(crate) fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSock> {
        let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = cvt(unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let s = fd.as_raw_fd();
        if reuse_port {
            setsockopt(s, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1 as c_int)?;
        }
        if addr.is_ipv4() {
            setsockopt(s, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)?;
        } else {
            setsockopt(s, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_DO)?;
        }
        setsockopt(s, libc::SOL_UDP, libc::UDP_GRO, 1 as c_int)?;
        for (force, plain, size) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 8 << 20),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 4 << 20),
        ] {
            if setsockopt(s, libc::SOL_SOCKET, force, size as c_int).is_err() {
                setsockopt(s, libc::SOL_SOCKET, plain, size as c_int)?;
            }
        }
        // A send never waits long: a stuck peer path must not stall receiving.
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        setsockopt(s, libc::SOL_SOCKET, libc::SO_SNDTIMEO, timeout)?;
        let (ss, len) = to_sockaddr(&addr);
        // SAFETY: `ss` holds a sockaddr of `len` bytes and lives across the call.
        cvt(unsafe {
            libc::bind(s, (&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr>(), len)
        })?;
        Ok(UdpSock { fd })
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        // SAFETY: all-zero sockaddr_storage is valid; getsockname writes at most `len`.
        let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_storage>() as socklen_t;
        // SAFETY: `ss` and `len` are valid for writes for the call.
        cvt(unsafe {
            libc::getsockname(
                self.fd.as_raw_fd(),
                (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr>(),
                &mut len,
            )
        })?;
        from_sockaddr(&ss, len as usize).ok_or_else(|| io::ErrorKind::InvalidData.into())
    }

    /// Sends the concatenation of `parts` to `dst`: one datagram, or with `segment`
    /// non-zero, datagrams of `segment` bytes each (the last maybe shorter) cut by
    /// the kernel (`UDP_SEGMENT`).
    pub(crate) fn send(
        &self,
        dst: &SocketAddr,
        parts: &[IoSlice<'_>],
        segment: u16,
    ) -> io::Result<usize> {
        let (mut ss, len) = to_sockaddr(dst);
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = (&mut ss as *mut libc::sockaddr_storage).cast::<c_void>();
        msg.msg_namelen = len;
        // IoSlice is guaranteed ABI-compatible with iovec; sendmsg only reads them.
        msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = parts.len() as _;
        if segment != 0 {
            msg.msg_control = control.as_mut_ptr().cast::<c_void>();
            // SAFETY: CMSG_SPACE only computes a size.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as _;
            // SAFETY: the control buffer (32 bytes, 8-aligned) holds one cmsghdr with a
            // u16 payload; CMSG_FIRSTHDR returns a pointer into it.
            unsafe {
                let cm = libc::CMSG_FIRSTHDR(&msg);
                (*cm).cmsg_level = libc::SOL_UDP;
                (*cm).cmsg_type = libc::UDP_SEGMENT;
                (*cm).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
                libc::CMSG_DATA(cm).cast::<u16>().write_unaligned(segment);
            }
        }
        loop {
            // SAFETY: every pointer in `msg` refers to memory live for the call.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Receives up to `meta.len()` messages without waiting, message `i` into
    /// `buf[i * slot..][..slot]`. Returns how many arrived (`WouldBlock` if none).
    pub(crate) fn recv_batch(
        &self,
        buf: &mut [u8],
        slot: usize,
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let n = meta.len().min(MAX_BATCH).min(buf.len() / slot.max(1));
        // SAFETY: these libc structs are plain data; all-zero is a valid value.
        let mut names: [libc::sockaddr_storage; MAX_BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
        let mut control = [[0u64; 8]; MAX_BATCH];
        let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_BATCH];
        let base = buf.as_mut_ptr();
        for i in 0..n {
            // SAFETY: i * slot + slot <= buf.len(), so the offset stays inside `buf`.
            iovs[i] = libc::iovec { iov_base: unsafe { base.add(i * slot) }.cast(), iov_len: slot };
            let m = &mut hdrs[i].msg_hdr;
            m.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            m.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as socklen_t;
            m.msg_iov = &mut iovs[i];
            m.msg_iovlen = 1;
            m.msg_control = control[i].as_mut_ptr().cast();
            m.msg_controllen = mem::size_of_val(&control[i]) as _;
        }
        let got = loop {
            // SAFETY: the first `n` headers point at live, writable buffers of the
            // sizes they state; nothing else aliases them during the call.
            let rc = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    n as _,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        };
        for i in 0..got {
            let h = &hdrs[i];
            let len = h.msg_len as usize;
            let mut segment = len;
            // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG macros
            // walk only within them.
            unsafe {
                let mut cm = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !cm.is_null() {
                    if (*cm).cmsg_level == libc::SOL_UDP && (*cm).cmsg_type == libc::UDP_GRO {
                        let gso = libc::CMSG_DATA(cm).cast::<c_int>().read_unaligned();
                        if gso > 0 {
                            segment = gso as usize;
                        }
                    }
                    cm = libc::CMSG_NXTHDR(&h.msg_hdr, cm);
                }
            }
            meta[i] = RecvMeta {
                src: from_sockaddr(&names[i], h.msg_hdr.msg_namelen as usize),
                len: len.min(slot),
                segment,
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        Ok(got)
    }
}

impl AsRawFd for UdpSock {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A non-blocking eventfd: a wake-up for a worker's poll.
#[derive(Debug)]
pub(crate) struct EventFd(File);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain eventfd(2) call; the result is checked before use.
        let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        Ok(EventFd(unsafe { File::from_raw_fd(raw) }))
    }

    /// Wakes the poller.
    pub(crate) fn notify(&self) {
        // Fails only when the counter would overflow: then it is readable anyway.
        let _ = (&self.0).write(&1u64.to_ne_bytes());
    }

    /// Resets the counter.
    pub(crate) fn drain(&self) {
        let _ = (&self.0).read(&mut [0u8; 8]);
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A level-triggered epoll set of readable descriptors, each with a token.
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

/// An empty event slot for [`Epoll::wait`].
pub(crate) const NO_EVENT: libc::epoll_event = libc::epoll_event { events: 0, u64: 0 };

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1(2) call; the result is checked before use.
        let raw = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// Stops watching `fd`.
    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = NO_EVENT;
        // SAFETY: `ev` is valid for the call (ignored by EPOLL_CTL_DEL on new kernels).
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) })
            .map(drop)
    }

    /// Watches `fd` for input, reporting `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: `ev` is valid for the call; the kernel copies it.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
            .map(drop)
    }

    /// Waits up to `timeout_ms` for events; returns their tokens' count in `events`
    /// (0 on timeout or signal).
    pub(crate) fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout_ms: i32,
    ) -> io::Result<usize> {
        let max = events.len().min(i32::MAX as usize) as c_int;
        // SAFETY: `events` is writable for `max` entries during the call.
        let rc =
            unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), max, timeout_ms) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(err)
        }
    }
}

/// The token of an event from [`Epoll::wait`].
pub(crate) fn token(ev: &libc::epoll_event) -> u64 {
    ev.u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_roundtrip() {
        for a in ["192.0.2.7:7470", "[2001:db8::1]:9"] {
            let a: SocketAddr = a.parse().expect("address");
            let (ss, len) = to_sockaddr(&a);
            assert_eq!(from_sockaddr(&ss, len as usize), Some(a));
        }
    }

    #[test]
    fn interface_names() {
        assert!(ifname("ovu-42").is_ok());
        assert!(ifname("").is_err());
        assert!(ifname("sixteen-chars-xx").is_err());
        assert!(interface_index("lo").is_some());
        assert_eq!(interface_index("ovu-nonexistent"), None);
    }

    #[test]
    fn udp_gso_and_gro_on_loopback() {
        let a = UdpSock::bind("127.0.0.1:0".parse().expect("addr"), false).expect("bind a");
        let b = UdpSock::bind("127.0.0.1:0".parse().expect("addr"), false).expect("bind b");
        let to = b.local_addr().expect("addr");
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let sent = a.send(&to, &[IoSlice::new(&data[..10]), IoSlice::new(&data[10..])], 1000);
        assert_eq!(sent.expect("send"), 3000);
        let mut buf = vec![0u8; 4 * 65536];
        let mut meta = [RecvMeta::default(); 4];
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < 3000 && std::time::Instant::now() < deadline {
            match b.recv_batch(&mut buf, 65536, &mut meta) {
                Ok(n) => {
                    for (i, m) in meta[..n].iter().enumerate() {
                        assert!(!m.truncated);
                        assert_eq!(m.src, a.local_addr().ok());
                        let msg = &buf[i * 65536..i * 65536 + m.len];
                        for d in msg.chunks(m.segment) {
                            assert!(d.len() <= 1000);
                            got.extend_from_slice(d);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        assert_eq!(got, data);
    }
}
