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
