//! Per-network traffic counters: relaxed atomics bumped on the hot path, read as a
//! plain snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)*) => {
        /// A snapshot of one network's counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct VniCounters {
            $($(#[doc = $doc])+ pub $name: u64,)*
        }

        /// The live counters of one network.
        #[derive(Debug, Default)]
        pub(crate) struct LiveCounters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl LiveCounters {
            pub(crate) fn snapshot(&self) -> VniCounters {
                VniCounters { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Frames received from other hosts and written to the TAP.
    rx_frames,
    /// Bytes of those frames (Ethernet header on).
    rx_bytes,
    /// Frames read from the TAP and sent, counted once per destination host.
    tx_frames,
    /// Bytes of those frames.
    tx_bytes,
    /// Datagrams whose source is not a host carrying the network.
    dropped_unknown_source,
    /// Datagrams or frames that could not be parsed or reassembled.
    dropped_malformed,
    /// Frames with no host to go to (no peers, no secure transport, no address family).
    dropped_no_route,
    /// Datagrams of an encrypted network that arrived on the plain UDP socket (or of
    /// a plain network through the secure transport).
    dropped_wrong_transport,
    /// Fragmented messages given up incomplete (timeout, table full).
    dropped_reassembly,
    /// Send or TAP-write errors.
    errors,
}

impl LiveCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Drops the engine could not attribute to a network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineCounters {
    /// Datagrams naming a VNI this host does not carry.
    pub dropped_unknown_vni: u64,
    /// Datagrams without a valid header.
    pub dropped_malformed: u64,
}
