//! Outgoing raft traffic. The driver hands its messages to an [`Outbox`]; the real one,
//! [`Transport`], runs one task per peer holding a long-lived client stream over the
//! Peer gRPC service on that member's `--listen` address. Tests put a simulated network
//! behind the same trait ([`super::sim`]).
//!
//! Sending never blocks the driver: each peer has a bounded queue, and a message that
//! does not fit, or that is queued while the peer is unreachable, is dropped. Raft
//! tolerates lost messages (it retransmits from its own progress tracking).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use overlay_proto::pb;
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

use crate::cluster::Peers;

const QUEUE: usize = 8192;

/// Where the driver's outgoing raft messages go.
pub trait Outbox: Send {
    /// Sends (or drops) `messages`; must not block.
    fn send(&mut self, messages: Vec<Message>);
    /// The applied configuration's members and their addresses changed (this member
    /// may be among them).
    fn set_members(&mut self, addresses: &BTreeMap<u64, String>);
}

/// The gRPC transport.
pub struct Transport {
    self_id: u64,
    peers: Peers,
    /// Queue of each peer's sender task, and the address it sends to.
    queues: HashMap<u64, (String, mpsc::Sender<Message>)>,
}

impl Transport {
    /// Sends to the members in `peers` (as the driver sets them), other than `self_id`.
    pub fn new(self_id: u64, peers: Peers) -> Transport {
        Transport { self_id, peers, queues: HashMap::new() }
    }
}

impl Outbox for Transport {
    fn send(&mut self, messages: Vec<Message>) {
        for m in messages {
            if let Some((_, queue)) = self.queues.get(&m.to) {
                if queue.try_send(m).is_err() {
                    debug!("peer queue full; raft will retransmit");
                }
            }
        }
    }

    fn set_members(&mut self, addresses: &BTreeMap<u64, String>) {
        self.peers.set(addresses);
        // Dropping a queue ends its sender task.
        self.queues.retain(|id, (address, _)| addresses.get(id) == Some(address));
        for (&id, address) in addresses {
            if id == self.self_id || self.queues.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            self.queues.insert(id, (address.clone(), tx));
            tokio::spawn(peer_sender(self.self_id, id, self.peers.clone(), rx));
        }
    }
}

async fn peer_sender(self_id: u64, peer: u64, peers: Peers, mut queue: mpsc::Receiver<Message>) {
    let mut backoff = Duration::from_millis(50);
    let mut was_connected = true;
    loop {
        // None once the member left the configuration.
        let Some(mut client) = peers.client(peer) else { return };
        let (tx, rx) = mpsc::channel::<pb::RaftMessage>(1024);
        let call = tokio::spawn(async move { client.raft(ReceiverStream::new(rx)).await });
        // Forward queued messages until the stream breaks.
        let mut sent_any = false;
        loop {
            let Some(m) = queue.recv().await else { return };
            let data = match m.write_to_bytes() {
                Ok(d) => d,
                Err(e) => {
                    debug!(error = %e, "unencodable raft message dropped");
                    continue;
                }
            };
            if tx.send(pb::RaftMessage { data }).await.is_err() {
                break;
            }
            if !sent_any {
                sent_any = true;
            }
            if call.is_finished() {
                break;
            }
        }
        drop(tx);
        let outcome = call.await;
        if was_connected {
            info!(from = self_id, peer, result = ?outcome.map(|r| r.err().map(|s| s.message().to_string())).ok().flatten(), "raft stream to peer ended; reconnecting");
        }
        was_connected = sent_any;
        // Drop what queued up while the peer was away: it is stale by now.
        while queue.try_recv().is_ok() {}
        tokio::time::sleep(backoff).await;
        backoff = if sent_any {
            Duration::from_millis(50)
        } else {
            (backoff * 2).min(Duration::from_secs(1))
        };
    }
}
