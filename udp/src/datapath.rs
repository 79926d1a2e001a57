//! What happens to one frame or datagram: the per-packet path shared by the worker
//! threads and [`Engine::deliver`](crate::Engine::deliver). No allocation: callers
//! pass their preallocated buffers.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::counters::LiveCounters;
use crate::frag::{Chunking, MAX_FRAGMENTS};
use crate::fwd::Fdb;
#[cfg(test)]
use crate::header::FLAG_VNI;
use crate::header::{Frag, Header, HEADER_LEN};
use crate::reasm::{Key, Push, Reassembler};
use crate::sys::UdpSock;
use crate::vnet::{self, VnetHdr, F_NEEDS_CSUM, VNET_HDR_LEN};
use crate::{csum, SecureTransport};

/// Ethernet header length: the shortest frame we carry.
const ETH_LEN: usize = 14;
/// Most datagrams one `UDP_SEGMENT` send may carry (the kernel's historic limit).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most payload bytes one `UDP_SEGMENT` send may carry (64 KiB IPv4 packet).
const MAX_GSO_BYTES: usize = 65535 - 20 - 8;

/// The TAP queues of one network's device.
#[derive(Debug)]
pub(crate) struct Tap {
    pub name: String,
    /// Interface index when opened: a device recreated under the same name differs.
    pub index: u32,
    pub queues: Vec<File>,
}

/// One network as the data path sees it.
#[derive(Debug)]
pub(crate) struct Net {
    pub vni: u32,
    pub encrypted: bool,
    pub fdb: Fdb,
    pub tap: Arc<Tap>,
    pub counters: Arc<LiveCounters>,
}

/// Everything the data path looks up, swapped as a whole on reconfiguration.
#[derive(Default)]
pub(crate) struct Tables {
    pub nets: HashMap<u32, Arc<Net>>,
    pub secure: Option<Arc<dyn SecureTransport>>,
}

/// Engine-wide state the data path needs.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// Destination port of every peer (ours).
    pub port: u16,
    /// Underlay MTU.
    pub mtu: usize,
    pub next_id: AtomicU32,
    pub unknown_vni: AtomicU64,
    pub malformed: AtomicU64,
}

impl Ctx {
    /// Largest UDP payload to `peer` that leaves the host unfragmented.
    fn max_udp_payload(&self, peer: IpAddr) -> usize {
        let ip = if peer.is_ipv4() { 20 } else { 40 };
        self.mtu.saturating_sub(ip + 8)
    }
}

/// Where a frame's datagrams go.
enum Link<'a> {
    Udp(&'a UdpSock),
    Secure(&'a dyn SecureTransport),
}

/// Sends one message read from a TAP (`msg` = vnet header + frame) to the hosts its
/// destination MAC maps to. `scratch` builds datagrams for the secure transport.
pub(crate) fn transmit(
    ctx: &Ctx,
    tables: &Tables,
    net: &Net,
    sock: &UdpSock,
    msg: &mut [u8],
    scratch: &mut Vec<u8>,
) {
    let c = &net.counters;
    let Some(vh) = VnetHdr::parse(msg) else {
        LiveCounters::add(&c.dropped_malformed, 1);
        return;
    };
    let Some(dst) = msg.get(VNET_HDR_LEN..VNET_HDR_LEN + 6) else {
        LiveCounters::add(&c.dropped_malformed, 1);
        return;
    };
    let mut dst_mac = [0u8; 6];
    dst_mac.copy_from_slice(dst);
    if msg.len() < VNET_HDR_LEN + ETH_LEN {
        LiveCounters::add(&c.dropped_malformed, 1);
        return;
    }
    let targets = net.fdb.route(&dst_mac);
    let link = match (&tables.secure, net.encrypted) {
        (_, false) => Link::Udp(sock),
        (Some(s), true) => Link::Secure(s.as_ref()),
        (None, true) => {
            LiveCounters::add(&c.dropped_no_route, 1);
            return;
        }
    };
    if targets.is_empty() {
        LiveCounters::add(&c.dropped_no_route, 1);
        return;
    }
    if !vh.is_gso() && vh.needs_csum() {
        // Plain frames cross without their vnet header: finish the checksum here and
        // say so in the header, should the frame still be fragmented.
        let (start, off) = (usize::from(vh.csum_start), usize::from(vh.csum_offset));
        if csum::finish(&mut msg[VNET_HDR_LEN..], start, off).is_err() {
            LiveCounters::add(&c.dropped_malformed, 1);
            return;
        }
        msg[0] &= !F_NEEDS_CSUM;
    }
    let frame_len = msg.len() - VNET_HDR_LEN;
    let mut id = None;
    for &peer in targets {
        let max = match link {
            Link::Udp(_) => Some(ctx.max_udp_payload(peer)),
            Link::Secure(s) => s.max_datagram(peer),
        };
        let Some(max) = max else {
            LiveCounters::add(&c.dropped_no_route, 1);
            continue;
        };
        let ok = if !vh.is_gso() && HEADER_LEN + frame_len <= max {
            send_plain(ctx, &link, net.vni, peer, &msg[VNET_HDR_LEN..], scratch)
        } else {
            let id = *id.get_or_insert_with(|| ctx.next_id.fetch_add(1, Ordering::Relaxed) as u16);
            send_fragments(ctx, &link, net.vni, id, peer, msg, max, scratch)
        };
        match ok {
            Ok(()) => {
                LiveCounters::add(&c.tx_frames, 1);
                LiveCounters::add(&c.tx_bytes, frame_len as u64);
            }
            Err(Failure::Malformed) => LiveCounters::add(&c.dropped_malformed, 1),
            Err(Failure::Send) => LiveCounters::add(&c.errors, 1),
        }
    }
}

enum Failure {
    Malformed,
    Send,
}

fn send_plain(
    ctx: &Ctx,
    link: &Link<'_>,
    vni: u32,
    peer: IpAddr,
    frame: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), Failure> {
    let hdr = Header::plain(vni).encode();
    match link {
        Link::Udp(sock) => {
            let dst = SocketAddr::new(peer, ctx.port);
            let sent = sock.send(&dst, &[IoSlice::new(&hdr), IoSlice::new(frame)], 0);
            sent.map(drop).map_err(|e| send_failed(peer, &e))
        }
        Link::Secure(s) => {
            scratch.clear();
            scratch.extend_from_slice(&hdr);
            scratch.extend_from_slice(frame);
            s.send(peer, scratch).then_some(()).ok_or(Failure::Send)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send_fragments(
    ctx: &Ctx,
    link: &Link<'_>,
    vni: u32,
    id: u16,
    peer: IpAddr,
    msg: &[u8],
    max: usize,
    scratch: &mut Vec<u8>,
) -> Result<(), Failure> {
    let plan = Chunking::plan(msg.len(), max).map_err(|_| Failure::Malformed)?;
    let mut headers = [[0u8; HEADER_LEN]; MAX_FRAGMENTS];
    for (i, h) in headers.iter_mut().enumerate().take(plan.count) {
        let frag = Frag { id, index: i as u8, count: plan.count as u8 };
        *h = Header { vni, frag: Some(frag) }.encode();
    }
    match link {
        Link::Udp(sock) => {
            let dst = SocketAddr::new(peer, ctx.port);
            let segment = (HEADER_LEN + plan.chunk) as u16;
            let mut iov = [IoSlice::new(&[]); 2 * MAX_GSO_SEGMENTS];
            for group in plan.groups(MAX_GSO_SEGMENTS, MAX_GSO_BYTES) {
                let n = group.len();
                for (k, i) in group.enumerate() {
                    iov[2 * k] = IoSlice::new(&headers[i]);
                    iov[2 * k + 1] = IoSlice::new(&msg[plan.range(i)]);
                }
                let seg = if n > 1 { segment } else { 0 };
                sock.send(&dst, &iov[..2 * n], seg).map_err(|e| send_failed(peer, &e))?;
            }
            Ok(())
        }
        Link::Secure(s) => {
            for (i, h) in headers.iter().enumerate().take(plan.count) {
                scratch.clear();
                scratch.extend_from_slice(h);
                scratch.extend_from_slice(&msg[plan.range(i)]);
                if !s.send(peer, scratch) {
                    return Err(Failure::Send);
                }
            }
            Ok(())
        }
    }
}

fn send_failed(peer: IpAddr, e: &std::io::Error) -> Failure {
    tracing::debug!(%peer, error = %e, "udp send failed");
    Failure::Send
}

/// Handles one datagram from `src`: checks it, reassembles fragments and writes
/// complete frames to the network's TAP (queue `queue`). `secure` tells whether it
/// came through the secure transport.
#[allow(clippy::too_many_arguments)]
pub(crate) fn receive(
    ctx: &Ctx,
    tables: &Tables,
    reasm: &mut Reassembler,
    now: Instant,
    src: IpAddr,
    datagram: &[u8],
    secure: bool,
    queue: usize,
) {
    let Ok((h, payload)) = Header::parse(datagram) else {
        ctx.malformed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Some(net) = tables.nets.get(&h.vni) else {
        ctx.unknown_vni.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let c = &net.counters;
    if net.encrypted != secure {
        LiveCounters::add(&c.dropped_wrong_transport, 1);
        return;
    }
    if !net.fdb.is_peer(src) {
        LiveCounters::add(&c.dropped_unknown_source, 1);
        return;
    }
    let Some(tap) = net.tap.queues.get(queue % net.tap.queues.len().max(1)) else {
        LiveCounters::add(&c.errors, 1);
        return;
    };
    match h.frag {
        None if payload.len() < ETH_LEN => LiveCounters::add(&c.dropped_malformed, 1),
        None => write_tap(tap, c, &[IoSlice::new(&vnet::ZERO), IoSlice::new(payload)]),
        Some(frag) => {
            let key = Key { src: src.to_canonical(), vni: h.vni, id: frag.id };
            match reasm.push(now, key, frag, payload) {
                Push::Pending => {}
                Push::Malformed => LiveCounters::add(&c.dropped_malformed, 1),
                Push::Complete(m) if m.len() < VNET_HDR_LEN + ETH_LEN => {
                    LiveCounters::add(&c.dropped_malformed, 1)
                }
                Push::Complete(m) => write_tap(tap, c, &[IoSlice::new(m)]),
            }
            if let Some(vni) = reasm.take_evicted() {
                if let Some(n) = tables.nets.get(&vni) {
                    LiveCounters::add(&n.counters.dropped_reassembly, 1);
                }
            }
        }
    }
}

/// Writes one message (vnet header + frame, possibly in pieces) to a TAP queue.
fn write_tap(tap: &File, c: &LiveCounters, parts: &[IoSlice<'_>]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    // A TAP takes a frame whole or not at all.
    match (&*tap).write_vectored(parts) {
        Ok(n) if n == len => {
            LiveCounters::add(&c.rx_frames, 1);
            LiveCounters::add(&c.rx_bytes, (len - VNET_HDR_LEN) as u64);
        }
        Ok(n) => {
            tracing::debug!(written = n, len, "short tap write");
            LiveCounters::add(&c.errors, 1);
        }
        Err(e) => {
            tracing::debug!(error = %e, "tap write failed");
            LiveCounters::add(&c.errors, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fwd::Fdb;
    use crate::reasm::DEFAULT_TIMEOUT;
    use crate::sys::RecvMeta;
    use proptest::prelude::*;
    use std::io::Read;
    use std::net::Ipv4Addr;
    use std::os::fd::OwnedFd;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn ctx(port: u16) -> Ctx {
        Ctx {
            port,
            mtu: 1500,
            next_id: AtomicU32::new(0),
            unknown_vni: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        }
    }

    fn tables(tap: File, encrypted: bool) -> Tables {
        let net = Net {
            vni: 5,
            encrypted,
            fdb: Fdb::new(&[LOCAL], &[]),
            tap: Arc::new(Tap { name: "test".into(), index: 0, queues: vec![tap] }),
            counters: Arc::default(),
        };
        Tables { nets: HashMap::from([(5, Arc::new(net))]), secure: None }
    }

    fn dev_null() -> File {
        File::options().write(true).open("/dev/null").expect("/dev/null")
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f: Vec<u8> =
            (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
        f
    }

    /// Sends `msg` through `transmit` over loopback and returns what the receiving
    /// side writes to its TAP.
    fn roundtrip(mut msg: Vec<u8>) -> (Vec<u8>, crate::VniCounters) {
        let a = UdpSock::bind("127.0.0.1:0".parse().expect("addr"), false).expect("bind");
        let b = UdpSock::bind("127.0.0.1:0".parse().expect("addr"), false).expect("bind");
        let ctx = ctx(b.local_addr().expect("addr").port());
        let tx = tables(dev_null(), false);
        let (mut reader, writer) = std::io::pipe().expect("pipe");
        let rx = tables(File::from(OwnedFd::from(writer)), false);
        let mut scratch = Vec::new();
        transmit(&ctx, &tx, &tx.nets[&5], &a, &mut msg, &mut scratch);
        assert_eq!(tx.nets[&5].counters.snapshot().tx_frames, 1);
        let mut buf = vec![0u8; 65536 * 4];
        let mut meta = [RecvMeta::default(); 4];
        let mut reasm = Reassembler::new(4, DEFAULT_TIMEOUT);
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        while rx.nets[&5].counters.snapshot().rx_frames == 0 && Instant::now() < deadline {
            let Ok(n) = b.recv_batch(&mut buf, 65536, &mut meta) else {
                std::thread::sleep(std::time::Duration::from_millis(2));
                continue;
            };
            for (i, m) in meta[..n].iter().enumerate() {
                let src = m.src.expect("source").ip();
                for d in buf[i * 65536..i * 65536 + m.len].chunks(m.segment) {
                    receive(&ctx, &rx, &mut reasm, Instant::now(), src, d, false, 0);
                }
            }
        }
        let counters = rx.nets[&5].counters.snapshot();
        drop(rx);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("pipe read");
        (out, counters)
    }

    #[test]
    fn gso_super_frame_arrives_whole_with_its_vnet_header() {
        let vh = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: 1,
            hdr_len: 66,
            gso_size: 1398,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut msg = vh.encode().to_vec();
        msg.extend_from_slice(&frame(30_000, 1));
        let (out, c) = roundtrip(msg.clone());
        assert_eq!(out, msg);
        assert_eq!((c.rx_frames, c.rx_bytes), (1, 30_000));
    }

    /// A non-GSO message whose checksum is left to the device, and its frame with
    /// the checksum finished.
    fn needs_csum(len: usize) -> (VnetHdr, Vec<u8>, Vec<u8>) {
        let vh =
            VnetHdr { flags: F_NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..VnetHdr::default() };
        let f = frame(len, len as u8);
        let mut msg = vh.encode().to_vec();
        msg.extend_from_slice(&f);
        let mut done = f;
        csum::finish(&mut done, 34, 6).expect("in range");
        (vh, msg, done)
    }

    #[test]
    fn plain_frame_gets_its_checksum_and_a_zero_vnet_header() {
        let (_, msg, done) = needs_csum(1464);
        assert_eq!(roundtrip(msg).0, [&vnet::ZERO[..], &done].concat());
    }

    #[test]
    fn big_non_gso_frame_is_fragmented_with_finished_checksum() {
        // One byte too big for a datagram: the vnet header travels, NEEDS_CSUM cleared.
        let (vh, msg, done) = needs_csum(1465);
        let hdr = VnetHdr { flags: 0, ..vh }.encode();
        assert_eq!(roundtrip(msg).0, [&hdr[..], &done].concat());
    }

    #[test]
    fn drops_are_counted() {
        let c = ctx(1);
        let mut reasm = Reassembler::new(2, DEFAULT_TIMEOUT);
        let mut d = Header::plain(5).encode().to_vec();
        d.extend_from_slice(&frame(60, 0));
        let now = Instant::now();
        let plain = tables(dev_null(), false);
        let stranger = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));
        receive(&c, &plain, &mut reasm, now, stranger, &d, false, 0);
        receive(&c, &plain, &mut reasm, now, LOCAL, &d, true, 0);
        receive(&c, &plain, &mut reasm, now, LOCAL, &d[..20], false, 0);
        receive(&c, &plain, &mut reasm, now, LOCAL, &d, false, 0);
        let s = plain.nets[&5].counters.snapshot();
        assert_eq!(
            (s.dropped_unknown_source, s.dropped_wrong_transport, s.dropped_malformed, s.rx_frames),
            (1, 1, 1, 1)
        );
        let secret = tables(dev_null(), true);
        receive(&c, &secret, &mut reasm, now, LOCAL, &d, false, 0);
        assert_eq!(secret.nets[&5].counters.snapshot().dropped_wrong_transport, 1);
        receive(&c, &secret, &mut reasm, now, LOCAL, &Header::plain(6).encode(), false, 0);
        receive(&c, &secret, &mut reasm, now, LOCAL, b"junk", false, 0);
        assert_eq!(c.unknown_vni.load(Ordering::Relaxed), 1);
        assert_eq!(c.malformed.load(Ordering::Relaxed), 1);
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(
            datagrams in proptest::collection::vec(
                (any::<bool>(), any::<u8>(), any::<u8>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..2000)),
                1..40,
            )
        ) {
            let c = ctx(1);
            let t = tables(dev_null(), false);
            let mut reasm = Reassembler::new(2, DEFAULT_TIMEOUT);
            let now = Instant::now();
            for (valid, flags, index, count, mut d) in datagrams {
                if valid && d.len() >= HEADER_LEN {
                    // A header naming our network, with arbitrary fragment fields.
                    d[..HEADER_LEN].copy_from_slice(&[FLAG_VNI | (flags & 1), 0, index & 3, index, 0, 0, 5, count]);
                }
                receive(&c, &t, &mut reasm, now, LOCAL, &d, false, 0);
            }
        }

        #[test]
        fn arbitrary_tap_reads_never_panic(msg in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let sock = UdpSock::bind("127.0.0.1:0".parse().expect("addr"), false).expect("bind");
            // Port 9 (discard) on loopback: nothing listens, nothing is delivered.
            let t = tables(dev_null(), false);
            let mut msg = msg;
            transmit(&ctx(9), &t, &t.nets[&5], &sock, &mut msg, &mut Vec::new());
        }
    }
}
