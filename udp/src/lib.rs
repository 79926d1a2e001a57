//! `overlay-udp`: the user-space data plane of `--encap udp` networks. It carries the
//! Ethernet frames of each network's TAP device (`ovu-<VNI>`, on the network's bridge)
//! to the other hosts carrying the network, in UDP datagrams on one port (7470), and
//! writes what they send into the TAP. It never programs bridges, addresses or
//! routes (the agent does), never panics on what arrives from the network, and
//! accepts a network's frames only from the hosts the agent says carry it.
//!
//! # Wire format
//!
//! Every datagram starts with an 8-byte header ([`header`]): VXLAN's layout (flags
//! `0x08`, 24-bit VNI in bytes 4–6), plus a fragment flag `0x01` that gives bytes 1–2
//! (frame id), 3 (index) and 7 (count) a meaning.
//!
//! * A frame that fits one datagram (non-GSO, `8 + frame ≤ MTU − 28`) is sent as
//!   `header ++ frame`: 20 IPv4 + 8 UDP + 8 header + 14 Ethernet = **50 bytes** of
//!   overhead, so a network MTU of underlay − 50 never fragments. A checksum the
//!   kernel left to the device (`NEEDS_CSUM`) is finished by the sender ([`csum`]);
//!   the receiver writes the frame with an all-zero vnet header.
//! * A GSO super-frame (up to 64 KiB, read in one go thanks to `IFF_VNET_HDR` and TAP
//!   offloads) is not segmented in user space: the message `virtio_net_hdr ++ frame`
//!   is cut into equal chunks of `MTU − 28 − 8` bytes ([`frag`]), each sent as
//!   `fragment header ++ chunk`, all in one `sendmsg` with `UDP_SEGMENT` (two when
//!   the 64 KiB UDP limit is reached). The receiver reassembles ([`reasm`]: bounded
//!   table keyed by source, VNI and frame id, 500 ms timeout) and writes the whole
//!   super-frame with its vnet header to the TAP in one write, so the kernel keeps
//!   it a GSO packet all the way to the endpoint. Any other frame too big for one
//!   datagram takes the same path.
//! * The vnet header travels in the TAP's byte order: little endian (x86-64, aarch64).
//!
//! Outer packets carry DF (`IP_PMTUDISC_DO`): nothing IP-fragments.
//!
//! # Threads and namespaces
//!
//! [`Engine::start`] opens `queues` UDP sockets sharing the port (`SO_REUSEPORT`, with
//! `UDP_GRO`: one `recvmmsg` returns whole GSO trains) and one worker thread per
//! queue; every TAP is opened multi-queue with one queue per worker. Sockets and TAP
//! devices belong to the network namespace of the thread that creates them: call
//! [`Engine::start`] and [`Engine::set_networks`] from the host's namespace.
//!
//! Encrypted networks never use the UDP socket: their datagrams (same format) go to
//! a [`SecureTransport`] set with [`Engine::set_secure`], and come back through
//! [`Engine::deliver`]; a datagram of an encrypted network on the plain socket is
//! dropped and counted.

pub mod counters;
pub mod csum;
mod datapath;
mod engine;
pub mod frag;
pub mod fwd;
pub mod header;
pub mod reasm;
mod sys;
pub mod vnet;

pub use counters::{EngineCounters, VniCounters};
pub use engine::{
    Engine, EngineConfig, Error, SecureTransport, UdpNetwork, DEFAULT_PORT, MAX_QUEUES,
};
